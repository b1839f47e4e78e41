"""Data-efficiency sweeps: trainer × fraction × seed, then eval of every checkpoint on every benchmark.

A sweep is a list of jobs, each an ordinary `medvqa` command run as a subprocess (so a multi-GPU
user sets a launcher such as `accelerate launch --num_processes 8 -m medvqa`):

```
prepare   medvqa data phantom / model init-tiny ...        (optional set-up steps of the config)
base      medvqa train --trainer align ...                 (optional shared base step)
train     medvqa train --trainer T --fraction F --seed S   -> <out>/<T>/f<F>/s<S>/checkpoint/
eval      medvqa eval --model hf:<checkpoint> ...          -> <out>/<T>/f<F>/s<S>/eval/<benchmark>/
reference medvqa eval --model <spec> ...                   -> <out>/reference/<slug>/eval/<benchmark>/
report    (in process) results.csv, data_efficiency.{md,csv,png} under <out>/report/
```

Resumability: a job that finishes writes a done-marker (`<out>/.sweep/done/<job>.json`) holding its
key — the hash of its command, of the keys of the jobs it depends on, and for training of the data
manifest hash of its fraction. A job whose marker has the same key (and whose outputs exist, with
the same manifest hash in `checkpoint.json`) is skipped; anything else is (re)run, and `medvqa
train`/`medvqa eval` resume their own partial work. So `kill -9` at any moment and a rerun gives
the same `results.csv` as an uninterrupted run. One sweep at a time per folder (an flock).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medvqa.config import dataclass_from_mapping
from medvqa.errors import BadInput
from medvqa.io import atomic_write_json, atomic_write_text, read_json, read_toml
from medvqa.types import stable_hash

SWEEP_FORMAT = 1
HEARTBEAT_S = 30.0  # print what is running (and the training step) this often


# --------------------------------------------------------------------------------------------
# Config (one dataclass per TOML table; keys and types are checked, unknown keys refused)
# --------------------------------------------------------------------------------------------


@dataclass
class RunSettings:
    """`[run]`: how jobs are run."""

    jobs: int = field(default=1, metadata={"help": "jobs run side by side (2 on a 2-core CPU: ~15% faster)"})
    threads: int = field(
        default=0, metadata={"help": "CPU threads per job (OMP/MKL); 0 = cores // jobs (at least 1)"}
    )
    launcher: str = field(
        default="",
        metadata={
            "help": "command that runs `medvqa` for train jobs; empty = this Python's "
            "`-m medvqa`. Multi-GPU: 'accelerate launch --num_processes 8 -m medvqa'"
        },
    )
    eval_launcher: str = field(default="", metadata={"help": "the same for eval jobs; empty = `launcher`"})
    eval_base: bool = field(
        default=True, metadata={"help": "also evaluate the base model (a 'no medical QA' reference line)"}
    )
    stop_on_error: bool = field(
        default=False,
        metadata={
            "help": "stop starting jobs after a failure (default: run every job that does not need the failed one)"
        },
    )
    env: dict[str, str] = field(default_factory=dict, metadata={"help": "extra environment for every job"})


@dataclass
class TrainData:
    """`[train]`: the labeled training set that fractions are drawn from."""

    benchmark: str = field(metadata={"help": "registered benchmark name (medvqa benchmarks)"})
    root: str = field(metadata={"help": "its data folder"})
    split: str = field(default="train", metadata={"help": "training split"})
    args: list[str] = field(
        default_factory=list, metadata={"help": "extra `medvqa train` flags for every job"}
    )


@dataclass
class EvalSpec:
    """`[[eval]]`: one benchmark every checkpoint is evaluated on."""

    benchmark: str = field(metadata={"help": "registered benchmark name"})
    root: str = field(metadata={"help": "its data folder"})
    split: str = field(default="test", metadata={"help": "evaluation split"})
    name: str = field(default="", metadata={"help": "folder name under eval/ (default: the benchmark)"})
    options: dict[str, str] = field(
        default_factory=dict, metadata={"help": 'the benchmark\'s options, e.g. { lang = "zh" } for slake'}
    )
    limit: int = field(default=0, metadata={"help": "evaluate the first N questions only (0 = all)"})
    prompt_policy: str = field(
        default="", metadata={"help": "prompt policy; empty = the benchmark's default"}
    )
    args: list[str] = field(default_factory=list, metadata={"help": "extra `medvqa eval` flags"})


@dataclass
class Generation:
    """`[generation]`: decoding settings of every eval job."""

    max_new_tokens: int = field(default=16, metadata={"help": "tokens generated per answer"})
    batch_size: int = field(default=16, metadata={"help": "questions per generation batch"})


@dataclass
class TrainerSpec:
    """`[[trainers]]`: one swept trainer with its settings."""

    name: str = field(metadata={"help": "registered trainer (medvqa trainers)"})
    label: str = field(default="", metadata={"help": "its line in the report and folder (default: name)"})
    fractions: list[float] = field(default_factory=list, metadata={"help": "override the sweep's fractions"})
    seeds: list[int] = field(default_factory=list, metadata={"help": "override the sweep's seeds"})
    preset: str = field(default="", metadata={"help": "the trainer's named preset (e.g. phantom, paper)"})
    priority: int = field(
        default=0,
        metadata={
            "help": "jobs of higher priority start first (give the longest trainer the highest: less idle time)"
        },
    )
    config: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "the trainer's config fields over the preset (its dataclass, checked)"},
    )
    args: list[str] = field(default_factory=list, metadata={"help": "extra raw `medvqa train` flags"})


@dataclass
class BaseStep:
    """`[base]`: a shared step (e.g. `align`) whose checkpoint becomes the base of every swept job."""

    trainer: str = field(metadata={"help": "registered trainer, e.g. align"})
    fraction: float = field(default=1.0, metadata={"help": "fraction of the training data it sees"})
    seed: int = field(default=0, metadata={"help": "its seed"})
    preset: str = field(default="", metadata={"help": "the trainer's named preset"})
    config: dict[str, Any] = field(default_factory=dict, metadata={"help": "the trainer's config fields"})
    args: list[str] = field(default_factory=list, metadata={"help": "extra raw `medvqa train` flags"})


@dataclass
class PrepareStep:
    """`[[prepare]]`: a set-up command (`medvqa ARGS...`), skipped once it has succeeded."""

    name: str = field(metadata={"help": "job name"})
    args: list[str] = field(metadata={"help": "the medvqa arguments, e.g. ['data', 'phantom', '--out', ...]"})
    creates: str = field(default="", metadata={"help": "a path it creates; if it is missing the step reruns"})


@dataclass
class ReferenceSpec:
    """`[[reference]]`: an external checkpoint placed beside the swept trainers."""

    name: str = field(metadata={"help": "its line in the report, e.g. 'LLaVA-Med v1.5'"})
    data_used: float = field(metadata={"help": "medical samples it was trained on (the x of the plot)"})
    data_label: str = field(
        default="", metadata={"help": "how the table shows it, e.g. '530K medical samples'"}
    )
    model: str = field(default="", metadata={"help": "a model spec the sweep evaluates on every [[eval]]"})
    eval_dirs: dict[str, str] = field(
        default_factory=dict, metadata={"help": "or: existing eval folders, benchmark name -> folder"}
    )
    prompt_policy: str = field(default="", metadata={"help": "prompt policy for its evals (its convention)"})
    launcher: str = field(
        default="",
        metadata={
            "help": "launcher of its evals (default: [run] eval_launcher); e.g. 'python -m medvqa' for openai:"
        },
    )
    args: list[str] = field(default_factory=list, metadata={"help": "extra `medvqa eval` flags"})


@dataclass
class SweepConfig:
    name: str
    base_model: str
    train: TrainData
    evals: list[EvalSpec]
    trainers: list[TrainerSpec]
    fractions: list[float]
    seeds: list[int]
    generation: Generation
    run: RunSettings
    base: BaseStep | None = None
    prepare: list[PrepareStep] = field(default_factory=list)
    references: list[ReferenceSpec] = field(default_factory=list)
    source: str = ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_TOP_KEYS = {
    "name",
    "base_model",
    "train",
    "eval",
    "trainers",
    "fractions",
    "seeds",
    "generation",
    "run",
    "base",
    "prepare",
    "reference",
    "description",
}


def _table(data: Any, key: str, where: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise BadInput(f"{where}: [{key}] must be a table")
    return data


def _tables(data: Any, key: str, where: str) -> list[Mapping[str, Any]]:
    if data is None:
        return []
    if isinstance(data, Mapping):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(t, Mapping) for t in data):
        raise BadInput(f"{where}: [[{key}]] must be an array of tables")
    return data


def _subst(value: Any, mapping: Mapping[str, str]) -> Any:
    """`{out}` and `{config_dir}` in every string of a config value."""
    if isinstance(value, str):
        return re.sub(r"\{(out|config_dir)\}", lambda m: mapping[m.group(1)], value)
    if isinstance(value, list):
        return [_subst(v, mapping) for v in value]
    if isinstance(value, dict):
        return {k: _subst(v, mapping) for k, v in value.items()}
    return value


def _abs_path(p: str) -> str:
    return str(Path(p).expanduser().resolve()) if p else p


def _abs_spec(spec: str) -> str:
    """`hf:relative/dir[,opts]` -> absolute path when it exists locally (hub ids are left alone)."""
    if not spec.startswith("hf:"):
        return spec
    path, sep, opts = spec[3:].partition(",")
    local = Path(path).expanduser()
    if local.exists() or path.startswith((".", "/", "~")) or "{" in path:
        path = str(local.resolve())
    return f"hf:{path}{sep}{opts}"


def load_config(path: str | Path, *, out: str | Path | None = None) -> tuple[SweepConfig, Path]:
    """Parse and validate a sweep TOML; returns the config and the run folder (`--out` or runs/<name>)."""
    path = Path(path)
    where = str(path)
    raw = read_toml(path, what="sweep config")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise BadInput(f"{where}: unknown top-level key(s) {unknown}; known: {sorted(_TOP_KEYS)}")
    for key in ("name", "base_model", "train", "eval", "trainers"):
        if key not in raw:
            raise BadInput(f"{where}: missing required key {key!r}")
    name = raw["name"]
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise BadInput(f"{where}: 'name' must be a folder-safe string, got {name!r}")
    run_dir = Path(out) if out else Path("runs") / name
    run_dir = run_dir.expanduser().resolve()
    raw = _subst(raw, {"out": str(run_dir), "config_dir": str(path.resolve().parent)})

    train = dataclass_from_mapping(TrainData, _table(raw["train"], "train", where), where=f"{where} [train]")
    train.root = _abs_path(train.root)
    evals = []
    for i, t in enumerate(_tables(raw["eval"], "eval", where)):
        e = dataclass_from_mapping(EvalSpec, t, where=f"{where} [[eval]] #{i + 1}")
        e.root = _abs_path(e.root)
        e.name = e.name or e.benchmark
        evals.append(e)
    if not evals:
        raise BadInput(f"{where}: at least one [[eval]] benchmark is needed")
    if len({e.name for e in evals}) != len(evals):
        raise BadInput(f"{where}: two [[eval]] tables share a name; set 'name' to tell them apart")
    trainers = [
        dataclass_from_mapping(TrainerSpec, t, where=f"{where} [[trainers]] #{i + 1}")
        for i, t in enumerate(_tables(raw["trainers"], "trainers", where))
    ]
    if not trainers:
        raise BadInput(f"{where}: at least one [[trainers]] table is needed")
    for t in trainers:
        t.label = t.label or t.name
        if not re.fullmatch(r"[A-Za-z0-9._-]+", t.label) or t.label in ("reference", "report", "base"):
            raise BadInput(f"{where}: trainer label {t.label!r} cannot be a folder name")
    if len({t.label for t in trainers}) != len(trainers):
        raise BadInput(f"{where}: two [[trainers]] share a label; set 'label' to tell them apart")
    fractions = raw.get("fractions", [1.0])
    seeds = raw.get("seeds", [0])
    if not isinstance(fractions, list) or not all(
        isinstance(f, int | float) and not isinstance(f, bool) and 0 < f <= 1 for f in fractions
    ):
        raise BadInput(f"{where}: 'fractions' must be a list of numbers in (0, 1], got {fractions!r}")
    if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise BadInput(f"{where}: 'seeds' must be a list of integers, got {seeds!r}")
    for t in trainers:
        for f in t.fractions:
            if not 0 < f <= 1:
                raise BadInput(f"{where}: trainer {t.label!r}: fraction {f} is not in (0, 1]")
    base = None
    if "base" in raw:
        base = dataclass_from_mapping(BaseStep, _table(raw["base"], "base", where), where=f"{where} [base]")
    prepare = [
        dataclass_from_mapping(PrepareStep, t, where=f"{where} [[prepare]] #{i + 1}")
        for i, t in enumerate(_tables(raw.get("prepare"), "prepare", where))
    ]
    refs = []
    for i, t in enumerate(_tables(raw.get("reference"), "reference", where)):
        r = dataclass_from_mapping(ReferenceSpec, t, where=f"{where} [[reference]] #{i + 1}")
        if bool(r.model) == bool(r.eval_dirs):
            raise BadInput(f"{where}: [[reference]] {r.name!r} needs exactly one of 'model' or 'eval_dirs'")
        r.model = _abs_spec(r.model)
        r.eval_dirs = {k: _abs_path(v) for k, v in r.eval_dirs.items()}
        refs.append(r)
    cfg = SweepConfig(
        name=name,
        base_model=_abs_spec(str(raw["base_model"])),
        train=train,
        evals=evals,
        trainers=trainers,
        fractions=[float(f) for f in fractions],
        seeds=list(seeds),
        generation=dataclass_from_mapping(
            Generation, _table(raw.get("generation", {}), "generation", where), where=f"{where} [generation]"
        ),
        run=dataclass_from_mapping(
            RunSettings, _table(raw.get("run", {}), "run", where), where=f"{where} [run]"
        ),
        base=base,
        prepare=prepare,
        references=refs,
        source=str(path.resolve()),
    )
    if cfg.run.jobs < 1:
        raise BadInput(f"{where} [run]: jobs must be >= 1")
    _check_names(cfg, where)
    return cfg, run_dir


def _check_names(cfg: SweepConfig, where: str) -> None:
    """Registered trainer/benchmark names and trainer settings, checked before any job runs."""
    from medvqa.registry import benchmarks, trainers

    for label, name in [("[train]", cfg.train.benchmark)] + [
        (f"[[eval]] {e.name!r}", e.benchmark) for e in cfg.evals
    ]:
        if name not in benchmarks:
            raise BadInput(
                f"{where} {label}: unknown benchmark {name!r}; known: {', '.join(benchmarks.names())}"
            )
    steps = [(f"[[trainers]] {t.label!r}", t.name, t.config) for t in cfg.trainers]
    if cfg.base:
        steps.append(("[base]", cfg.base.trainer, cfg.base.config))
    for label, name, settings in steps:
        if name not in trainers:
            raise BadInput(f"{where} {label}: unknown trainer {name!r}; known: {', '.join(trainers.names())}")
        check_trainer_settings(name, settings, f"{where} {label} [config]")


# --------------------------------------------------------------------------------------------
# Trainer settings -> `medvqa train` flags (validated against the trainer's config dataclass)
# --------------------------------------------------------------------------------------------


def trainer_config_class(name: str) -> type | None:
    """The config dataclass of a registered trainer (`config_class` attribute), if it declares one."""
    from medvqa.registry import trainers

    cls = trainers.get(name)
    cfg_cls = getattr(cls, "config_class", None) or getattr(cls, "config_cls", None)
    return cfg_cls if dataclasses.is_dataclass(cfg_cls) else None


def check_trainer_settings(trainer: str, settings: Mapping[str, Any], where: str) -> None:
    """Refuse unknown keys and wrong types now, not an hour into the sweep."""
    cfg_cls = trainer_config_class(trainer)
    if cfg_cls is not None:
        dataclass_from_mapping(cfg_cls, settings, where=where)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise BadInput(f"trainer setting value {value!r} cannot be written to TOML")


def settings_toml(settings: Mapping[str, Any]) -> str:
    """The `--config` file of `medvqa train`: a [trainer] table of scalar/list settings."""
    lines = ["[trainer]"] + [f"{k} = {_toml_value(v)}" for k, v in sorted(settings.items()) if v is not None]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Jobs
# --------------------------------------------------------------------------------------------


@dataclass
class Job:
    id: str  # e.g. "train/sft/f0.09/s0"
    kind: str  # prepare | base | train | eval | reference
    args: list[str]  # medvqa arguments (without the launcher)
    deps: list[str]
    title: str
    output: Path  # the folder (or file) the job creates
    launcher: str = ""
    manifest_hash: str = ""
    creates: str = ""
    key: str = ""  # filled by `plan`: hash of the command and the keys of its dependencies
    priority: int = 0  # among ready jobs, higher starts first (then config order)


def fraction_tag(f: float) -> str:
    return f"f{float(f)!r}"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower() or "ref"


class Sweep:
    def __init__(self, cfg: SweepConfig, run_dir: Path, *, log: Callable[[str], None] = print):
        self.cfg = cfg
        self.run_dir = run_dir
        self.log = log
        self.state_dir = run_dir / ".sweep"
        self._manifest_cache: dict[tuple[float, int], tuple[str, int]] = {}
        self._n_full: int | None = None
        self._files: dict[Path, str] = {}  # settings files the planned commands read

    # -- data manifests (computed here, compared with what the trainer recorded) -------------

    def _train_samples(self) -> list[Any]:
        from medvqa.registry import benchmarks

        bench = benchmarks.get(self.cfg.train.benchmark)()
        return bench.load(self.cfg.train.split, Path(self.cfg.train.root))

    def manifest(self, fraction: float, seed: int) -> tuple[str, int]:
        """(manifest hash, n labeled) of a fraction; "" if the training data is not there yet."""
        key = (float(fraction), int(seed))
        if key not in self._manifest_cache:
            if not Path(self.cfg.train.root).exists():
                return ("", 0)
            from medvqa.fractions import manifest_hash, select_fraction

            if not hasattr(self, "_samples"):
                self._samples = self._train_samples()
                self._n_full = len(self._samples)
            subset = select_fraction(self._samples, float(fraction), int(seed))
            self._manifest_cache[key] = (manifest_hash(subset), len(subset))
        return self._manifest_cache[key]

    # -- the plan ------------------------------------------------------------------------------

    def _eval_args(
        self, model: str, e: EvalSpec, out: Path, extra: Sequence[str], policy: str = ""
    ) -> list[str]:
        g = self.cfg.generation
        args = [
            "eval",
            "--model",
            model,
            "--benchmark",
            e.benchmark,
            "--root",
            e.root,
            "--split",
            e.split,
            "--batch-size",
            str(g.batch_size),
            "--max-new-tokens",
            str(g.max_new_tokens),
            "--out",
            str(out),
        ]
        if e.limit:
            args += ["--limit", str(e.limit)]
        if e.options:
            args += ["--benchmark-options", ",".join(f"{k}={v}" for k, v in sorted(e.options.items()))]
        if policy or e.prompt_policy:
            args += ["--prompt-policy", policy or e.prompt_policy]
        return args + list(e.args) + list(extra)

    def _train_args(
        self,
        job_id: str,
        trainer: str,
        base_model: str,
        fraction: float,
        seed: int,
        out: Path,
        preset: str,
        settings: Mapping[str, Any],
        extra: Sequence[str],
    ) -> list[str]:
        args = [
            "train",
            "--trainer",
            trainer,
            "--model",
            base_model,
            "--benchmark",
            self.cfg.train.benchmark,
            "--root",
            self.cfg.train.root,
            "--split",
            self.cfg.train.split,
            "--fraction",
            repr(float(fraction)),
            "--seed",
            str(seed),
            "--out",
            str(out),
        ]
        if preset:
            args += ["--preset", preset]
        if settings:
            check_trainer_settings(trainer, settings, f"{self.cfg.source}: {job_id} [config]")
            text = settings_toml(settings)
            path = self.state_dir / "configs" / (job_id.replace("/", "__") + ".toml")
            self._files[path] = text
            args += ["--config", str(path)]
        return args + list(self.cfg.train.args) + list(extra)

    def jobs(self, *, with_manifests: bool = True) -> list[Job]:
        cfg, run = self.cfg, self.run_dir
        eval_launcher = cfg.run.eval_launcher or cfg.run.launcher
        jobs: list[Job] = []
        prep_ids = []
        for p in cfg.prepare:
            jid = f"prepare/{slug(p.name)}"
            prep_ids.append(jid)
            out = Path(p.creates) if p.creates else run
            jobs.append(Job(jid, "prepare", list(p.args), [], f"prepare {p.name}", out, creates=p.creates))
        base_model, base_deps = cfg.base_model, list(prep_ids)
        if cfg.base is not None:
            b = cfg.base
            out = run / "base" / b.trainer / "checkpoint"
            args = self._train_args(
                f"base/{b.trainer}",
                b.trainer,
                cfg.base_model,
                b.fraction,
                b.seed,
                out,
                b.preset,
                b.config,
                b.args,
            )
            jobs.append(
                Job(
                    f"base/{b.trainer}",
                    "base",
                    args,
                    list(prep_ids),
                    f"base step {b.trainer}",
                    out,
                    cfg.run.launcher,
                )
            )
            base_model, base_deps = f"hf:{out}", [f"base/{b.trainer}"]
        if cfg.run.eval_base:
            for e in cfg.evals:
                out = run / "reference" / "base" / "eval" / e.name
                jobs.append(
                    Job(
                        f"eval/base/{e.name}",
                        "eval",
                        self._eval_args(base_model, e, out, ()),
                        list(base_deps),
                        f"eval base model on {e.name}",
                        out,
                        eval_launcher,
                    )
                )
        for t in cfg.trainers:
            for f in t.fractions or cfg.fractions:
                for s in t.seeds or cfg.seeds:
                    job_dir = run / t.label / fraction_tag(f) / f"s{s}"
                    ckpt = job_dir / "checkpoint"
                    tid = f"train/{t.label}/{fraction_tag(f)}/s{s}"
                    args = self._train_args(tid, t.name, base_model, f, s, ckpt, t.preset, t.config, t.args)
                    mh = self.manifest(f, s)[0] if with_manifests else ""
                    jobs.append(
                        Job(
                            tid,
                            "train",
                            args,
                            list(base_deps),
                            f"train {t.label} @ {float(f)!r} seed {s}",
                            ckpt,
                            cfg.run.launcher,
                            manifest_hash=mh,
                            priority=t.priority,
                        )
                    )
                    for e in cfg.evals:
                        out = job_dir / "eval" / e.name
                        jobs.append(
                            Job(
                                f"eval/{t.label}/{fraction_tag(f)}/s{s}/{e.name}",
                                "eval",
                                self._eval_args(f"hf:{ckpt}", e, out, ()),
                                [tid],
                                f"eval {t.label} @ {float(f)!r} seed {s} on {e.name}",
                                out,
                                eval_launcher,
                            )
                        )
        for r in cfg.references:
            if not r.model:
                continue
            for e in cfg.evals:
                out = run / "reference" / slug(r.name) / "eval" / e.name
                jobs.append(
                    Job(
                        f"eval/reference/{slug(r.name)}/{e.name}",
                        "eval",
                        self._eval_args(r.model, e, out, r.args, r.prompt_policy),
                        list(prep_ids),
                        f"eval {r.name} on {e.name}",
                        out,
                        r.launcher or eval_launcher,
                    )
                )
        by_id = {j.id: j for j in jobs}
        for j in jobs:  # keys in dependency order (deps always come first in the list)
            dep_keys = [by_id[d].key for d in j.deps]
            files = {self._portable(str(p)): t for p, t in self._files.items() if str(p) in j.args}
            j.key = stable_hash(
                {
                    "args": [self._portable(a) for a in j.args],
                    "files": files,
                    "deps": dep_keys,
                    "manifest": j.manifest_hash,
                    "versions": self._versions(j),
                    "format": SWEEP_FORMAT,
                }
            )
        return jobs

    def _versions(self, job: Job) -> dict[str, str]:
        """Versions of the benchmarks a job reads (a new generator or loader version reruns it)."""
        from medvqa.registry import benchmarks

        names = [job.args[i + 1] for i, a in enumerate(job.args[:-1]) if a == "--benchmark"]
        return {n: str(getattr(benchmarks.get(n), "version", "")) for n in names if n in benchmarks}

    def _portable(self, arg: str) -> str:
        """An argument with the run folder written as `{out}`: a moved or copied run keeps its keys."""
        return arg.replace(str(self.run_dir), "{out}")

    # -- done markers ------------------------------------------------------------------------

    def _marker(self, job: Job) -> Path:
        return self.state_dir / "done" / (job.id.replace("/", "__") + ".json")

    def is_done(self, job: Job) -> bool:
        marker = self._marker(job)
        if not marker.is_file():
            return False
        try:
            if read_json(marker).get("key") != job.key:
                return False
        except BadInput:
            return False
        if job.kind in ("train", "base"):
            meta_file = job.output / "checkpoint.json"
            if not meta_file.is_file():
                return False
            if job.manifest_hash and read_json(meta_file).get("manifest_hash") != job.manifest_hash:
                return False
        elif job.kind == "eval":
            if not (job.output / "scores.json").is_file():
                return False
        elif job.kind == "prepare" and job.creates and not Path(job.creates).exists():
            return False
        return True

    def mark_done(self, job: Job, seconds: float) -> None:
        atomic_write_json(
            self._marker(job), {"id": job.id, "key": job.key, "args": job.args, "seconds": round(seconds, 1)}
        )

    def _started(self, job: Job) -> Path:
        return self.state_dir / "started" / (job.id.replace("/", "__") + ".json")

    def _clear_stale(self, job: Job) -> None:
        """Output left by a different command (the config changed): move it out of the way.

        The same command's partial output (a killed job) stays: `medvqa train`/`eval` resume it.
        """
        if job.kind == "prepare":
            return
        old = None
        for marker in (self._marker(job), self._started(job)):
            if marker.is_file():
                try:
                    old = read_json(marker).get("key")
                except BadInput:
                    old = "unknown"
                if old != job.key:
                    break
        if old is not None and old != job.key and job.output.exists():
            stale = job.output.with_name(f"{job.output.name}.stale-{old}")
            shutil.rmtree(stale, ignore_errors=True)
            job.output.rename(stale)
            self.log(f"  {job.id}: settings changed since the last run; old output moved to {stale.name}")
        self._marker(job).unlink(missing_ok=True)
        atomic_write_json(self._started(job), {"id": job.id, "key": job.key})

    # -- running -----------------------------------------------------------------------------

    def _command(self, job: Job) -> list[str]:
        if job.launcher:
            return [*shlex.split(job.launcher), *job.args]
        return [sys.executable, "-m", "medvqa.cli", *job.args]

    def _env(self, job: Job) -> dict[str, str]:
        """The job's environment: `threads` CPU threads (the same for every job, so a rerun of any
        job computes with the same thread count; more threads than free cores stall OpenMP)."""
        env = dict(os.environ)
        threads = self.cfg.run.threads or max(1, (os.cpu_count() or 1) // self.cfg.run.jobs)
        env.update(
            {
                "OMP_NUM_THREADS": str(threads),
                "MKL_NUM_THREADS": str(threads),
                "MEDVQA_NUM_THREADS": str(threads),
                "TOKENIZERS_PARALLELISM": "false",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update({k: str(v) for k, v in self.cfg.run.env.items()})
        return env

    def _lock(self) -> Any:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        fh = open(self.state_dir / "lock", "w")  # noqa: SIM115 - held for the whole sweep
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise BadInput("another sweep is running on this folder", path=self.run_dir) from None
        return fh

    def write_metadata(self) -> None:
        meta = {
            "format": SWEEP_FORMAT,
            "name": self.cfg.name,
            "config": self.cfg.to_json(),
            "trainers": [{"name": t.name, "label": t.label} for t in self.cfg.trainers],
            "n_train_full": self._n_full,
        }
        atomic_write_json(self.run_dir / "sweep.json", meta)
        for r in self.cfg.references:
            atomic_write_json(
                self.run_dir / "reference" / slug(r.name) / "reference.json",
                {
                    "name": r.name,
                    "kind": "reference",
                    "data_used": r.data_used,
                    "data_label": r.data_label,
                    "model": r.model,
                    "eval_dirs": r.eval_dirs,
                },
            )
        if self.cfg.run.eval_base:
            base = self.cfg.base.trainer if self.cfg.base else ""
            atomic_write_json(
                self.run_dir / "reference" / "base" / "reference.json",
                {
                    "name": f"base model{f' ({base})' if base else ''}, no medical QA",
                    "kind": "base",
                    "data_used": 0,
                    "model": self.cfg.base_model,
                },
            )

    def run(self, *, dry_run: bool = False, verbose: bool = False) -> int:
        """Run every job not done yet; returns the number of failed jobs."""
        lock = None if dry_run else self._lock()
        try:
            return self._run(dry_run=dry_run, verbose=verbose)
        finally:
            if lock is not None:
                lock.close()

    def _run(self, *, dry_run: bool, verbose: bool) -> int:
        t0 = time.perf_counter()
        self._n_ok = 0
        failed = self._run_all(dry_run=dry_run, verbose=verbose)
        if not dry_run:
            self.log(
                f"sweep: {self._n_ok} job(s) ok, {failed} failed or not run, {time.perf_counter() - t0:.0f} s"
            )
        return failed

    def _run_all(self, *, dry_run: bool, verbose: bool) -> int:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # prepare jobs first (they may create the training data the manifests are computed from)
        plan = self.jobs(with_manifests=False)
        prepare = [j for j in plan if j.kind == "prepare"]
        failed = self._execute(prepare, dry_run=dry_run, verbose=verbose, total=len(plan), offset=0)
        if failed:
            return failed
        try:
            plan = self.jobs(with_manifests=not dry_run)
        except BadInput as exc:
            # Set-up output that the current code refuses (e.g. data built by an older generator):
            # rebuild it once, then plan again (a second failure is the user's to see).
            if not prepare or dry_run:
                raise
            self.log(f"the training data does not load ({exc}); rerunning the [[prepare]] steps")
            for job in prepare:
                self._marker(job).unlink(missing_ok=True)
            self._manifest_cache.clear()
            self.__dict__.pop("_samples", None)
            failed = self._execute(
                prepare, dry_run=False, verbose=verbose, total=len(plan), offset=0, force=True
            )
            if failed:
                return failed
            plan = self.jobs(with_manifests=True)
        if not dry_run:
            self.write_metadata()
        rest = [j for j in plan if j.kind != "prepare"]
        return self._execute(rest, dry_run=dry_run, verbose=verbose, total=len(plan), offset=len(prepare))

    def _execute(
        self, jobs: list[Job], *, dry_run: bool, verbose: bool, total: int, offset: int, force: bool = False
    ) -> int:
        logs = self.state_dir / "logs"
        pending = list(jobs)
        done: set[str] = set()
        failed: set[str] = set()
        running: dict[str, tuple[subprocess.Popen[bytes], Job, float, Any]] = {}
        counter = offset
        ids = {j.id for j in jobs}
        last_beat = time.perf_counter()
        while pending or running:
            # start what can start
            progressed = False
            # short evals first (they unblock nothing long but finish lines early), then by priority
            order = sorted(pending, key=lambda j: (j.kind != "eval", -j.priority))
            for job in order:
                if len(running) >= self.cfg.run.jobs:
                    break
                if any(d in failed for d in job.deps):
                    pending.remove(job)
                    failed.add(job.id)
                    self.log(f"[skip] {job.title}: a job it needs failed")
                    progressed = True
                    continue
                if any(d in ids and d not in done for d in job.deps):
                    continue
                pending.remove(job)
                counter += 1
                progressed = True
                if not force and self.is_done(job):
                    done.add(job.id)
                    self.log(f"[{counter}/{total}] {job.title}: done before, skipped")
                    continue
                if dry_run:
                    done.add(job.id)
                    self.log(f"[{counter}/{total}] {job.title}: would run: {shlex.join(self._command(job))}")
                    continue
                if failed and self.cfg.run.stop_on_error:
                    failed.add(job.id)
                    self.log(f"[skip] {job.title}: not started after a failure (stop_on_error)")
                    continue
                self._clear_stale(job)
                for path, text in self._files.items():
                    if str(path) in job.args and (not path.is_file() or path.read_text() != text):
                        atomic_write_text(path, text)
                logs.mkdir(parents=True, exist_ok=True)
                log_path = logs / (job.id.replace("/", "__") + ".log")
                log_fh = None if verbose else open(log_path, "ab")  # noqa: SIM115 - closed when the job ends
                self.log(f"[{counter}/{total}] {job.title} ...")
                proc = subprocess.Popen(
                    self._command(job),
                    env=self._env(job),
                    stdout=log_fh,
                    stderr=subprocess.STDOUT if log_fh else None,
                    preexec_fn=_die_with_parent,
                )
                running[job.id] = (proc, job, time.perf_counter(), log_fh)
            # reap finished jobs
            for jid, (proc, job, t0, log_fh) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                progressed = True
                del running[jid]
                if log_fh is not None:
                    log_fh.close()
                dt = time.perf_counter() - t0
                problem = self._check_outputs(job) if rc == 0 else f"exit code {rc}"
                if problem is None:
                    self.mark_done(job, dt)
                    done.add(jid)
                    self.log(f"  done: {job.title} ({dt:.0f} s)")
                else:
                    failed.add(jid)
                    log_path = logs / (job.id.replace("/", "__") + ".log")
                    tail = _tail(log_path) if log_path.is_file() else ""
                    self.log(f"  FAILED: {job.title}: {problem}; log: {log_path}\n{tail}")
            if not progressed:
                time.sleep(0.2)
            if running and time.perf_counter() - last_beat > HEARTBEAT_S:
                last_beat = time.perf_counter()
                self.log("  running: " + "; ".join(_progress(j, t0) for _, j, t0, _ in running.values()))
        self._n_ok += len(done)
        return len(failed)

    def _check_outputs(self, job: Job) -> str | None:
        """None if the job left what it promised (and the training data it used is the expected one)."""
        if job.kind in ("train", "base"):
            meta_file = job.output / "checkpoint.json"
            if not meta_file.is_file():
                return f"no checkpoint.json in {job.output}"
            got = read_json(meta_file).get("manifest_hash")
            if job.manifest_hash and got != job.manifest_hash:
                return f"trained on data manifest {got}, expected {job.manifest_hash} (fraction selection differs)"
        elif job.kind == "eval" and not (job.output / "scores.json").is_file():
            return f"no scores.json in {job.output}"
        elif job.kind == "prepare" and job.creates and not Path(job.creates).exists():
            return f"did not create {job.creates}"
        return None


def _progress(job: Job, t0: float) -> str:
    """`train sft @ 0.09 seed 0 (step 1200/3000, 45 s)` from the trainer's train_log.jsonl."""
    text = f"{job.title} ({time.perf_counter() - t0:.0f} s"
    log_file = job.output / "train_log.jsonl"
    if job.kind in ("train", "base") and log_file.is_file():
        try:
            with open(log_file, "rb") as fh:
                fh.seek(max(0, log_file.stat().st_size - 4096))
                last = fh.read().decode("utf-8", "replace").strip().splitlines()[-1]
            row = json.loads(last)
            text += f", {row.get('stage', 'step')} step {row.get('step')}/{row.get('max_steps')}"
        except (OSError, ValueError, IndexError):
            pass
    return text + ")"


def _die_with_parent() -> None:
    """In the child: get SIGKILL when the sweep process dies (Linux), so a killed sweep leaves no orphans."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _tail(path: Path, n: int = 15) -> str:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:]
    return "\n".join("    | " + ln for ln in lines)


def run_sweep(
    config: str | Path,
    *,
    out: str | Path | None = None,
    dry_run: bool = False,
    verbose: bool = False,
    report: bool = True,
    log: Callable[[str], None] = print,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[int, Path, str]:
    """Run a sweep and its report; returns (failed jobs, run folder, markdown table or '')."""
    cfg, run_dir = load_config(config, out=out)
    if overrides:
        for key, value in overrides.items():
            setattr(cfg.run, key, value)
    sweep = Sweep(cfg, run_dir, log=log)
    failed = sweep.run(dry_run=dry_run, verbose=verbose)
    md = ""
    if report and not dry_run:
        from medvqa.reports.report import make_report

        try:
            md, written = make_report(run_dir)
            log(f"report: {', '.join(str(p) for p in written)}")
        except BadInput as exc:
            if not failed:
                raise
            log(f"report: not written ({exc})")
    return failed, run_dir, md


def job_summary(run_dir: str | Path) -> list[dict[str, Any]]:
    """The done-markers of a sweep folder (what ran, how long it took)."""
    done = Path(run_dir) / ".sweep" / "done"
    return [json.loads(p.read_text()) for p in sorted(done.glob("*.json"))] if done.is_dir() else []
