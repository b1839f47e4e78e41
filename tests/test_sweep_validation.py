"""Sweep configs are validated whole before any job runs (issue 11 items 4 and 9): every name that
becomes a path, every value's type (list elements, dict values) and range, and every planned job's
full settings as its own command will check them, so `--dry-run` catches what would otherwise
crash a job hours in."""

from __future__ import annotations

from pathlib import Path

import pytest
from medvqa.cli import main
from medvqa.errors import BadInput
from medvqa.layout import RESERVED_NAMES, check_folder_name
from medvqa.sweeps import Sweep, load_config

from tests.test_sweep import MINIMAL


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "sweep.toml"
    p.write_text(text)
    return p


def _dry_run(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    path = _write(tmp_path, text)
    rc = main(["sweep", str(path), "--out", str(tmp_path / "run"), "--dry-run"])
    return rc, capsys.readouterr().err


def _with(table: str, line: str) -> str:
    """MINIMAL with `line` added to `table` (created if MINIMAL has none)."""
    if f"\n{table}\n" in MINIMAL:
        return MINIMAL.replace(f"\n{table}\n", f"\n{table}\n{line}\n", 1)
    return MINIMAL + f"\n{table}\n{line}\n"


@pytest.mark.parametrize(
    "text, message",
    [
        # types of dict values and list elements (passed --dry-run before, then crashed the run)
        (_with("[run]", 'env = "X=1"'), "'env' must be dict"),
        (_with("[run]", "env = { X = 1 }"), "'env' must be dict"),
        (_with("[run]", 'env = { "X Y" = "1" }'), "not an environment variable name"),
        (MINIMAL.replace("max_steps = 5", "max_steps = 5\n[[trainers]]\nname = 'sft'\nlabel = 'b'\nseeds = ['0']"),
         "'seeds' must be list"),
        (MINIMAL.replace("limit = 40", "limit = 40\nargs = [1]"), "'args' must be list"),
        # ranges, refused at load (before: by the job itself, for evals after every training job)
        (_with("[generation]", "batch_size = -1"), "'batch_size' must be >= 1"),
        (_with("[generation]", "max_new_tokens = 0"), "'max_new_tokens' must be >= 1"),
        (MINIMAL.replace("limit = 40", "limit = -1"), "'limit' must be >= 0"),
        (MINIMAL + "\n[base]\ntrainer = 'align'\nfraction = 7.0\n", "fraction' must be a number in (0, 1]"),
        (MINIMAL + "\n[base]\ntrainer = 'align'\nseed = -3\n", "in [0, 2^32)"),
        (MINIMAL.replace("seeds = [0, 1]", "seeds = [0, -1]"), "in [0, 2^32)"),
        (MINIMAL.replace("seeds = [0, 1]", f"seeds = [{2**32}]"), "in [0, 2^32)"),
        (_with("[run]", "jobs = -2"), "'jobs' must be >= 0"),
        (MINIMAL + "\n[slurm]\ntime_min = 0\n", "'time_min' must be >= 1"),
        (_with("[run]", 'executor = "pbs"'), "'executor' must be one of"),
        # the trainer's and the eval's own config classes check their ranges (__post_init__)
        (MINIMAL.replace("max_steps = 5", "max_steps = 5\nper_device_train_batch_size = -4"),
         "'per_device_train_batch_size' must be >= 1"),
        (MINIMAL.replace("max_steps = 5", "max_steps = 0"), "'max_steps' must be -1 or >= 1"),
        (MINIMAL.replace("limit = 40", 'limit = 40\nargs = ["--n-boot", "-1"]'), "--n-boot must be >= 0"),
        (MINIMAL.replace("limit = 40", 'limit = 40\nargs = ["--top-p", "1.5"]'), "--top-p must be in (0, 1]"),
        # the trainer's own settings: an unknown preset, and flags its command would refuse
        (MINIMAL.replace('name = "sft"', 'name = "sft"\npreset = "nope"'), "has no preset 'nope'"),
        (MINIMAL.replace('name = "sft"', 'name = "sft"\nargs = ["--no-such-flag"]'),
         "job train/sft/f0.5/s0: unrecognized arguments: --no-such-flag"),
        (MINIMAL.replace("limit = 40", 'limit = 40\nargs = ["--batch-size", "many"]'),
         "job eval/base/phantom: argument --batch-size: invalid int value: 'many'"),
    ],
)  # fmt: skip
def test_bad_values_are_refused_at_load(tmp_path, capsys, text, message):
    rc, err = _dry_run(tmp_path, text, capsys)
    assert rc == 2, err
    assert message in err and str(tmp_path / "sweep.toml") in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing ran, nothing was written


@pytest.mark.parametrize("name", ["../..", "/tmp/x", "a/b", "..", ".hidden", "a\\b", "a b"])
def test_eval_names_that_leave_the_run_folder_are_refused(tmp_path, capsys, name):
    text = MINIMAL.replace("limit = 40", f"limit = 40\nname = {name!r}")
    rc, err = _dry_run(tmp_path, text.replace(f"name = {name!r}", f'name = "{name}"'), capsys)
    assert rc == 2 and "[[eval]] name" in err and "cannot be a folder name" in err, err


@pytest.mark.parametrize("label", [*sorted(RESERVED_NAMES), "_private", "../x", "a/b"])
def test_trainer_labels_the_report_would_not_read_are_refused(tmp_path, capsys, label):
    """One list: a label the report skips (e.g. `models`) would train and then vanish from the table."""
    rc, err = _dry_run(tmp_path, MINIMAL.replace('name = "sft"', f'name = "sft"\nlabel = "{label}"'), capsys)
    assert rc == 2 and "trainer label" in err, err


def test_reserved_names_are_the_reports():
    """The report skips exactly the names the sweep refuses (and hidden/underscore folders)."""
    from medvqa.reports import results

    assert results.is_reserved is __import__("medvqa.layout").layout.is_reserved
    for name in RESERVED_NAMES:
        with pytest.raises(BadInput, match="reserved"):
            check_folder_name(name, "label", top_level=True)
    assert check_folder_name("sft-lora.2", "label", top_level=True) == "sft-lora.2"


def test_prepare_steps_are_parsed_too(tmp_path, capsys):
    text = (
        MINIMAL + '\n[[prepare]]\nname = "data"\nargs = ["data", "phantom", "--out", "x", "--sizee", "32"]\n'
    )
    rc, err = _dry_run(tmp_path, text, capsys)
    assert rc == 2 and "job prepare/data: unrecognized arguments: --sizee 32" in err, err


def test_sweep_name_cannot_leave_runs(tmp_path, capsys):
    rc, err = _dry_run(tmp_path, MINIMAL.replace('name = "mini"', 'name = ".."'), capsys)
    assert rc == 2 and "'name'" in err


def test_every_job_is_checked_not_only_the_first(tmp_path):
    """A flag only the last trainer's jobs carry is refused at load, before the first job runs."""
    text = MINIMAL + '\n[[trainers]]\nname = "sft"\nlabel = "late"\nseeds = [7]\nargs = ["--fraction", "3"]\n'
    cfg, run_dir = load_config(_write(tmp_path, text), out=tmp_path / "run")
    with pytest.raises(BadInput, match=r"job train/late/f0.5/s7: --fraction must be a number in \(0, 1\]"):
        Sweep(cfg, run_dir).run(dry_run=True)
    assert not run_dir.exists()


def test_good_configs_still_load(tmp_path):
    text = _with("[run]", 'env = { HF_HOME = "/tmp/hf" }\njobs = 2\nthreads = 1')
    cfg, run_dir = load_config(_write(tmp_path, text), out=tmp_path / "run")
    assert cfg.run.env == {"HF_HOME": "/tmp/hf"} and cfg.evals[0].name == "phantom"
    sweep = Sweep(cfg, run_dir)
    sweep.planner.check_jobs(sweep.jobs(with_manifests=False))


def test_a_config_can_include_another_and_add_lines_to_it(tmp_path):
    """`include`: the included config's lines first, then the including one's; its other keys
    override and its tables merge key by key; the included lines plan the same training jobs
    (same keys: the same bytes); evals differ only by what was overridden (batch size)."""
    base = _write(tmp_path, MINIMAL + "[generation]\nmax_new_tokens = 5\nbatch_size = 4\n")
    full = tmp_path / "sub" / "full.toml"
    full.parent.mkdir()
    full.write_text(
        'include = "../sweep.toml"\nname = "mini-full"\nseeds = [0, 1, 2]\n'
        "[generation]\nbatch_size = 8\n"
        '[[trainers]]\nname = "sft"\nlabel = "longer"\nfractions = [0.5]\n[trainers.config]\nmax_steps = 9\n'
    )
    small, small_dir = load_config(base, out=tmp_path / "run")
    big, big_dir = load_config(full, out=tmp_path / "run")
    assert big.name == "mini-full" and big.seeds == [0, 1, 2] and big.generation.batch_size == 8
    assert big.generation.max_new_tokens == 5  # [generation] merged, not replaced
    assert [t.label for t in big.trainers] == ["sft", "longer"]
    assert [e.name for e in big.evals] == [e.name for e in small.evals]
    keys = {j.id: j.key for j in Sweep(small, small_dir).jobs(with_manifests=False) if j.kind == "train"}
    big_keys = {j.id: j.key for j in Sweep(big, big_dir).jobs(with_manifests=False) if j.kind == "train"}
    assert keys and all(big_keys[i] == k for i, k in keys.items())
    assert any(i.startswith("train/longer/") for i in big_keys)


@pytest.mark.parametrize(
    ("include", "message"),
    [
        ('"sweep.toml"', "includes itself"),
        ('"missing.toml"', "sweep config not found"),
        ("3", "'include' must be"),
    ],
)
def test_bad_includes_are_refused(tmp_path, capsys, include, message):
    rc, err = _dry_run(tmp_path, f"include = {include}\n" + MINIMAL, capsys)
    assert rc == 2 and message in err and "Traceback" not in err, err
