"""The core: registry, config dataclasses, fractions, atomic files, the CLI's exit codes."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
from medvqa import registry
from medvqa.cli import main
from medvqa.config import add_dataclass_arguments, dataclass_from_args, dataclass_from_mapping
from medvqa.errors import BadInput
from medvqa.fractions import manifest_hash, select_fraction
from medvqa.io import JsonlAppender, atomic_write_json, iter_jsonl, read_json, read_jsonl
from medvqa.registry import Registry
from medvqa.types import VQASample


def test_registry_register_get_list_and_unknown_name_lists_known():
    reg: Registry[type] = Registry("widget", "medvqa.test-widgets")

    @reg.register("b")
    class B:
        """A widget called B."""

    reg.register("a")(int)
    assert reg.names() == ["a", "b"]
    assert reg.get("b") is B
    assert reg.describe("b") == "A widget called B."
    with pytest.raises(BadInput, match=r"unknown widget 'c'; known: a, b"):
        reg.get("c")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("b")(str)


def test_registry_lazy_target_is_imported_on_first_get_only(tmp_path, monkeypatch):
    """A module nobody has imported yet: listing and `in` leave it alone, the first get imports it
    once (it counts its own imports in a file), a second get reuses it."""
    (tmp_path / "medvqa_lazy_probe.py").write_text(
        "from pathlib import Path\n"
        "log = Path(__file__).with_suffix('.imports')\n"
        "log.write_text(log.read_text() + 'x' if log.exists() else 'x')\n"
        "def thing():\n    return 'probed'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "medvqa_lazy_probe", raising=False)
    reg: Registry[object] = Registry("thing", "medvqa.test-things", {"probe": "medvqa_lazy_probe:thing"})
    assert reg.names() == ["probe"] and "probe" in reg
    assert "medvqa_lazy_probe" not in sys.modules and not (tmp_path / "medvqa_lazy_probe.imports").exists()
    thing = reg.get("probe")
    assert thing() == "probed" and "medvqa_lazy_probe" in sys.modules
    assert reg.get("probe") is thing and (tmp_path / "medvqa_lazy_probe.imports").read_text() == "x"
    monkeypatch.delitem(sys.modules, "medvqa_lazy_probe")


PLUGIN_MODULE = '''"""A third-party benchmark, installed as a distribution with an entry point."""
from medvqa.types import Benchmark


class PluggedBench(Benchmark):
    """A plug-in benchmark found through its entry point."""

    name = "plugged"
'''


def _install_plugin_dist(site: Path) -> Path:
    """A real (tiny) installed distribution: a module plus a dist-info with METADATA and
    entry_points.txt, exactly what `pip install` leaves in site-packages."""
    info = site / "medvqa_plugged-0.1.dist-info"
    info.mkdir(parents=True)
    (site / "medvqa_plugged.py").write_text(PLUGIN_MODULE)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: medvqa-plugged\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[medvqa.benchmarks]\nplugged = medvqa_plugged:PluggedBench\n")
    (info / "RECORD").write_text("")
    return site


def test_registry_entry_point_plugins(tmp_path, monkeypatch):
    """The plug-in is found through importlib.metadata's own scan of an installed dist-info
    (nothing monkeypatched): in a fresh registry in-process, and by `medvqa benchmarks` in a new process."""
    from importlib.metadata import distribution

    from medvqa.types import Benchmark

    site = _install_plugin_dist(tmp_path / "site")
    monkeypatch.syspath_prepend(str(site))
    assert distribution("medvqa-plugged").entry_points.names == {"plugged"}
    reg: Registry[type] = Registry("benchmark", "medvqa.benchmarks", base=Benchmark)
    assert "plugged" in reg.names()
    bench = reg.get("plugged")
    assert issubclass(bench, Benchmark) and bench.__module__ == "medvqa_plugged"
    assert reg.describe("plugged") == "A plug-in benchmark found through its entry point."
    env = {**os.environ, "PYTHONPATH": str(site)}
    listed = subprocess.run(
        [sys.executable, "-m", "medvqa", "benchmarks", "--json"], env=env, capture_output=True, text=True
    )
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["plugged"] == "A plug-in benchmark found through its entry point."
    monkeypatch.delitem(sys.modules, "medvqa_plugged", raising=False)


@dataclass(frozen=True)
class _Knobs:
    lr: float = field(default=1e-3, metadata={"help": "learning rate"})
    steps: int = field(default=10, metadata={"help": "optimizer steps"})
    loss: Literal["sigmoid", "ipo"] = field(default="sigmoid", metadata={"help": "DPO loss"})
    lora: bool = field(default=False, metadata={"help": "train a LoRA adapter"})
    name: str | None = field(default=None, metadata={"help": "run name"})
    fractions: list[float] = field(default_factory=lambda: [1.0], metadata={"help": "fractions"})


def test_config_dataclass_to_flags_and_back():
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, _Knobs)
    assert "learning rate (default: 0.001)" in parser.format_help()
    args = parser.parse_args(["--lr", "0.5", "--loss", "ipo", "--lora", "--fractions", "0.1,0.5"])
    knobs = dataclass_from_args(_Knobs, args)
    assert knobs == _Knobs(lr=0.5, loss="ipo", lora=True, fractions=[0.1, 0.5])
    assert dataclass_from_args(_Knobs, parser.parse_args([])) == _Knobs()
    with pytest.raises(SystemExit):
        parser.parse_args(["--loss", "hinge"])


def test_config_from_mapping_checks_keys_and_types():
    assert dataclass_from_mapping(_Knobs, {"lr": 1, "name": None}) == _Knobs(lr=1.0)
    with pytest.raises(BadInput, match=r"sft\.toml: unknown key\(s\) \['lrr'\]"):
        dataclass_from_mapping(_Knobs, {"lrr": 1}, where="sft.toml")
    with pytest.raises(BadInput, match="'steps' must be"):
        dataclass_from_mapping(_Knobs, {"steps": "many"})
    with pytest.raises(BadInput, match="'loss' must be"):
        dataclass_from_mapping(_Knobs, {"loss": "hinge"})


def _samples(n_images: int) -> list[VQASample]:
    out = []
    for i in range(n_images):
        for j, kind in enumerate(["OPEN", "CLOSED", "CLOSED"] if i % 3 else ["OPEN"]):
            out.append(
                VQASample(f"q{i}-{j}", f"img{i}.png", "q?", "a", kind, "toy", "train", {"image_id": f"i{i}"})
            )
    return out


def test_fractions_are_nested_image_level_stratified_and_seeded():
    samples = _samples(300)
    small, mid, full = (select_fraction(samples, f, seed=3) for f in (0.09, 0.25, 1.0))
    assert {s.id for s in small} < {s.id for s in mid} < {s.id for s in full}
    assert len(full) == len(samples)
    # image level: an image is in or out with all its questions
    images = {s.image_id for s in mid}
    assert all(s.image_id not in images for s in samples if s not in mid)
    # stratified: the open-only images keep their share (100 of 300 images)
    share = sum(1 for s in mid if s.image_id in {f"i{i}" for i in range(0, 300, 3)}) / len(
        {s.image_id for s in mid}
    )
    assert abs(share - 1 / 3) < 0.02
    assert select_fraction(samples, 0.25, seed=3) == mid
    assert select_fraction(samples, 0.25, seed=4) != mid
    assert manifest_hash(mid) != manifest_hash(small)
    assert manifest_hash(list(reversed(mid))) == manifest_hash(mid)
    with pytest.raises(BadInput):
        select_fraction(samples, 0.0, seed=0)


def test_read_json_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[\n{"id": 1,}\n]')
    with pytest.raises(BadInput, match=r"bad\.json: malformed JSON at line 2"):
        read_json(bad)
    (tmp_path / "empty.json").write_text("  \n")
    with pytest.raises(BadInput, match="empty"):
        read_json(tmp_path / "empty.json")
    with pytest.raises(BadInput, match="file not found"):
        read_json(tmp_path / "missing.json")


def test_jsonl_appender_survives_a_torn_last_line(tmp_path):
    path = tmp_path / "log.jsonl"
    with JsonlAppender(path) as log:
        log.write([{"i": 0}, {"i": 1}])
    with open(path, "a") as fh:
        fh.write('{"i": 2, "tor')  # a killed writer
    with pytest.raises(BadInput, match="line 3"):
        read_jsonl(path)
    assert [r["i"] for _, r in iter_jsonl(path, allow_truncated_tail=True)] == [0, 1]
    with JsonlAppender(path) as log:
        log.write([{"i": 2}])
    assert [r["i"] for r in read_jsonl(path)] == [0, 1, 2]


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_json(tmp_path / "a" / "x.json", {"k": 1})
    assert read_json(tmp_path / "a" / "x.json") == {"k": 1}
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["x.json"]


def test_cli_unknown_registry_name_exits_2_with_one_line(tmp_path, capsys):
    assert main(["benchmarks", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {"vqa-rad", "slake", "pathvqa", "llava-med-json", "phantom"} <= set(listed)
    train = [
        "train",
        "--trainer",
        "nope",
        "--model",
        "hf:x",
        "--benchmark",
        "phantom",
        "--root",
        str(tmp_path),
    ]
    for argv, known in (
        (
            ["data", "inspect", "nope", "--root", str(tmp_path)],
            "llava-med-json, pathvqa, phantom, slake, vqa-rad",
        ),
        ([*train, "--out", str(tmp_path / "out")], "align, sft, stllava-med"),
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "'nope'" in err and f"known: {known}" in err, err
    assert not (tmp_path / "out").exists()


def test_cli_help_is_fast_and_imports_no_torch():
    code = (
        "import sys, medvqa.cli as c\n"
        "try:\n    c.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'trl', 'peft', 'datasets', 'pandas', 'matplotlib') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out, out


def test_read_toml_errors_name_the_file(tmp_path):
    from medvqa.io import read_toml

    (tmp_path / "ok.toml").write_text('name = "x"\n[train]\nsteps = 3\n')
    assert read_toml(tmp_path / "ok.toml") == {"name": "x", "train": {"steps": 3}}
    (tmp_path / "bad.toml").write_text("name = \n")
    with pytest.raises(BadInput, match=r"bad\.toml: malformed TOML"):
        read_toml(tmp_path / "bad.toml")
    with pytest.raises(BadInput, match=r"sweep config not found"):
        read_toml(tmp_path / "missing.toml", what="sweep config")


def test_train_config_file_errors_exit_2(tmp_path, capsys):
    (tmp_path / "sft.toml").write_text("learning_rate = [\n")
    argv = ["train", "--trainer", "sft", "--model", "hf:x", "--benchmark", "phantom", "--root", str(tmp_path)]
    assert (
        main([*argv, "--out", str(tmp_path / "o"), "--config", str(tmp_path / "sft.toml"), "--show-config"])
        == 2
    )
    assert "sft.toml: malformed TOML" in capsys.readouterr().err


# --- config dataclasses: help everywhere, said once, --flag_name too (issues 12, 13) --------------


@dataclass(frozen=True)
class _Tuned(_Knobs):
    lr: float = 0.01  # only the default changes: the base class's help still applies


def test_a_subclass_that_overrides_a_default_keeps_the_fields_help():
    from medvqa.config import field_help

    assert field_help(_Tuned, "lr") == "learning rate"
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, _Tuned)
    assert "learning rate (default: 0.01)" in parser.format_help()


def test_train_help_shows_learning_rate_help():
    from medvqa.cli import build_parser

    train = _subparsers(build_parser())["train"]
    (action,) = [a for a in train._actions if "--learning-rate" in a.option_strings]
    assert action.help and "learning rate" in action.help


def _subparsers(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every (sub)command's parser, by its command line ("train", "stllava judge", ...)."""
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out[(prefix + " " + name).strip()] = sub
                out.update(_subparsers(sub, prefix + " " + name))
    return out


def test_every_flag_of_every_command_has_help_and_states_its_default_once():
    from medvqa.cli import build_parser

    commands = _subparsers(build_parser())
    assert {"train", "eval", "stllava judge", "data phantom"} <= set(commands)
    problems = []
    for command, parser in commands.items():
        for action in parser._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            flag = action.option_strings[-1]
            if isinstance(action, argparse._HelpAction):
                continue
            if not (action.help or "").strip():
                problems.append(f"medvqa {command} {flag}: no help")
            elif action.help.count("(default") > 1:
                problems.append(f"medvqa {command} {flag}: {action.help!r}")
    assert problems == []


def test_every_field_of_every_registered_config_has_help():
    import dataclasses

    from medvqa.config import field_help

    checked, missing = 0, []
    for kind in ("trainers", "experts", "benchmarks"):
        reg = getattr(registry, kind)
        for name in reg.names():
            cls = reg.get(name)
            for attr in ("config_class", "Options"):
                cfg = getattr(cls, attr, None)
                if cfg is None or not dataclasses.is_dataclass(cfg):
                    continue
                for f in dataclasses.fields(cfg):
                    checked += 1
                    if f.init and not field_help(cfg, f.name).strip():
                        missing.append(f"{kind} {name}: {cfg.__name__}.{f.name}")
    assert checked > 50 and missing == []


def test_underscore_flags_are_accepted_beside_dashed_ones():
    from medvqa.cli import build_parser

    common = ["train", "--trainer", "sft", "--model", "hf:x", "--benchmark", "phantom", "--root", "r"]
    common += ["--out", "o"]
    dashed = build_parser().parse_args(
        [*common, "--learning-rate", "0.5", "--per-device-train-batch-size=4", "--no-use-lora"]
    )
    trl_style = build_parser().parse_args(
        [*common, "--learning_rate", "0.5", "--per_device_train_batch_size=4", "--no_use_lora"]
    )
    assert vars(dashed) == vars(trl_style)
    assert trl_style.cfg_learning_rate == 0.5 and trl_style.cfg_per_device_train_batch_size == 4
    assert trl_style.cfg_use_lora is False
    with pytest.raises(SystemExit):  # still only flags that exist
        build_parser().parse_args([*common, "--learning_rat", "0.5"])


def test_dict_fields_become_key_value_flags():
    from medvqa.config import ArgumentParser

    @dataclass
    class _WithEnv:
        env: dict[str, str] = field(default_factory=dict, metadata={"help": "environment"})

    parser = ArgumentParser()
    add_dataclass_arguments(parser, _WithEnv)
    assert dataclass_from_args(_WithEnv, parser.parse_args(["--env", "A=1,B=x"])) == _WithEnv(
        {"A": "1", "B": "x"}
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["--env", "A"])


# --- python -m medvqa, and no process-wide side effects from library code (issues 12, 13) ----------


def test_python_dash_m_medvqa_is_the_medvqa_command():
    out = subprocess.run(
        [sys.executable, "-m", "medvqa", "benchmarks", "--json"], capture_output=True, text=True, check=True
    )
    assert "phantom" in json.loads(out.stdout)
    bad = subprocess.run(
        [sys.executable, "-m", "medvqa", "benchmarks", "--nope"], capture_output=True, text=True
    )
    assert bad.returncode == 2


def test_accelerate_launch_dash_m_medvqa(tmp_path):
    import os
    import shutil
    from pathlib import Path

    accelerate = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))
    if not os.path.exists(accelerate):
        pytest.skip("accelerate is not installed")
    env = {**os.environ, "HF_HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    cmd = [accelerate, "launch", "--cpu", "--num_processes", "1", "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", "-m", "medvqa", "prompts", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert any(p["name"] == "short-answer" for p in json.loads(out.stdout))


def test_only_the_cli_entry_point_configures_logging():
    """`logging.basicConfig` is process-wide: a command run from Python (the sweep, a notebook) must
    not reconfigure the caller's logging. Only `cli.main` may."""
    import ast

    root = Path(__file__).resolve().parents[1]  # the source tree
    offenders = []
    for folder in ("harness", "benchmarks", "trainers", "reports"):
        for path in sorted((root / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Attribute) and node.attr == "basicConfig":
                    offenders.append(str(path.relative_to(root)))
    assert offenders == ["harness/cli.py"]


def test_a_nested_config_becomes_flags_collected_into_one_dict():
    """A plug-in's own config (e.g. the chosen expert's): `--expert-FIELD` flags land in one dict,
    checked against the plug-in's class later; a flag the parser already has stays its own."""
    from medvqa.config import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--expert-name", default="")
    add_dataclass_arguments(parser, _Knobs, prefix="expert-", into="options")
    args = parser.parse_args(["--expert-lr", "0.5", "--expert-lora", "--expert-name", "x"])
    assert args.options == {"lr": 0.5, "lora": True} and args.expert_name == "x"
    assert parser.parse_args(["--no-expert-lora"]).options == {"lora": False}
    assert parser.parse_args([]).options is None
    assert dataclass_from_mapping(_Knobs, args.options) == _Knobs(lr=0.5, lora=True)
