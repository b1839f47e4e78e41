"""The sweep TOML: one dataclass per table, each checking its own values, loaded and validated whole.

Keys and types are checked by `medvqa.config.dataclass_from_mapping` (unknown keys refused, list
elements and dict values typed); ranges by each class's `__post_init__`; names that become folders
by `medvqa.layout`. `medvqa.sweeps.plan.check_jobs` then checks every planned job's full settings,
so a week-long GPU sweep fails at load (and `--dry-run` shows it), never after its first job.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from medvqa.config import dataclass_from_mapping
from medvqa.errors import BadInput
from medvqa.fractions import check_fraction, check_seed
from medvqa.io import read_toml
from medvqa.layout import check_folder_name

C = TypeVar("C")


def _at_least(obj: Any, name: str, low: float) -> None:
    value = getattr(obj, name)
    if value < low:
        raise BadInput(f"key {name!r} must be >= {low:g}, got {value!r}")


@dataclass
class SlurmSettings:
    """`[slurm]`: resources of each job when `[run] executor = "slurm"` (submitted through submitit)."""

    partition: str = field(default="", metadata={"help": "SLURM partition (empty = the cluster's default)"})
    account: str = field(default="", metadata={"help": "SLURM account to charge (empty = your default)"})
    qos: str = field(default="", metadata={"help": "SLURM quality of service (empty = default)"})
    time_min: int = field(default=240, metadata={"help": "time limit of each job, minutes"})
    nodes: int = field(default=1, metadata={"help": "nodes per train job (multi-node: see docs/cluster.md)"})
    gpus_per_node: int = field(default=1, metadata={"help": "GPUs per node of a train job"})
    eval_gpus: int = field(
        default=-1, metadata={"help": "GPUs of an eval job (one node); -1 = gpus_per_node"}
    )
    cpus_per_task: int = field(default=8, metadata={"help": "CPUs per job (also its OMP/MKL threads)"})
    mem_gb: int = field(default=0, metadata={"help": "memory per node, GB (0 = the cluster's default)"})
    constraint: str = field(default="", metadata={"help": "SLURM --constraint, e.g. 'h100' (empty = none)"})
    setup: list[str] = field(
        default_factory=list,
        metadata={
            "help": "shell lines run before each job, e.g. ['module load cuda', 'source venv/bin/activate']"
        },
    )
    additional: dict[str, str] = field(
        default_factory=dict, metadata={"help": "other sbatch options, e.g. { mail-type = 'FAIL' }"}
    )
    cluster: Literal["slurm", "local"] = field(
        default="slurm",
        metadata={"help": "submitit backend: slurm, or local (submitit's LocalExecutor on this machine)"},
    )
    folder: str = field(
        default="", metadata={"help": "submitit's job folder (default: <out>/.sweep/submitit)"}
    )

    def __post_init__(self) -> None:
        for name in ("time_min", "nodes", "cpus_per_task"):
            _at_least(self, name, 1)
        for name in ("gpus_per_node", "mem_gb"):
            _at_least(self, name, 0)
        _at_least(self, "eval_gpus", -1)


@dataclass
class RunSettings:
    """`[run]`: where and how side by side jobs run."""

    executor: Literal["local", "slurm"] = field(
        default="local",
        metadata={
            "help": "local (subprocesses on this machine) or slurm (one SLURM job per job, via submitit)"
        },
    )
    jobs: int = field(
        default=0,
        metadata={
            "help": "jobs run side by side; 0 = auto (local: one per `threads` CPU cores, 1 with a launcher "
            "or a GPU; slurm: no limit)"
        },
    )
    threads: int = field(
        default=0,
        metadata={
            "help": "CPU threads per local job (OMP/MKL/torch); 0 = cores // jobs (1 when jobs is auto)"
        },
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
    preload: bool = field(
        default=True,
        metadata={
            "help": "local jobs without a launcher fork from one process that imported torch, transformers "
            "and trl once (~4 CPU-s saved per job; off where a GPU is visible)"
        },
    )

    def __post_init__(self) -> None:
        _at_least(self, "jobs", 0)
        _at_least(self, "threads", 0)
        for key in self.env:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise BadInput(f"key 'env': {key!r} is not an environment variable name")


@dataclass
class TrainData:
    """`[train]`: the labeled training set that fractions are drawn from."""

    benchmark: str = field(metadata={"help": "registered benchmark name (medvqa benchmarks)"})
    root: str = field(metadata={"help": "its data folder"})
    split: str = field(default="train", metadata={"help": "training split"})
    args: list[str] = field(
        default_factory=list, metadata={"help": "extra `medvqa train` flags for every job"}
    )

    def __post_init__(self) -> None:
        if self.split == "test":
            raise BadInput("key 'split': trainers never train on the test split")


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

    def __post_init__(self) -> None:
        self.name = check_folder_name(self.name or self.benchmark, "[[eval]] name")
        _at_least(self, "limit", 0)


@dataclass
class Generation:
    """`[generation]`: decoding settings of every eval job."""

    max_new_tokens: int = field(default=16, metadata={"help": "tokens generated per answer"})
    batch_size: int = field(default=16, metadata={"help": "questions per generation batch"})

    def __post_init__(self) -> None:
        _at_least(self, "max_new_tokens", 1)
        _at_least(self, "batch_size", 1)


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
    model: str = field(
        default="",
        metadata={
            "help": "the model it trains from (default: the sweep's base model, after [base]); e.g. "
            "'hf:{checkpoint:sft}' continues the 'sft' line's checkpoint of the same fraction and seed"
        },
    )

    def __post_init__(self) -> None:
        self.label = check_folder_name(self.label or self.name, "trainer label", top_level=True)
        self.fractions = [check_fraction(f, f"trainer {self.label!r}: fraction") for f in self.fractions]
        self.seeds = [check_seed(s, f"trainer {self.label!r}: seed") for s in self.seeds]


@dataclass
class BaseStep:
    """`[base]`: a shared step (e.g. `align`) whose checkpoint becomes the base of every swept job."""

    trainer: str = field(metadata={"help": "registered trainer, e.g. align"})
    fraction: float = field(default=1.0, metadata={"help": "fraction of the training data it sees"})
    seed: int = field(default=0, metadata={"help": "its seed"})
    preset: str = field(default="", metadata={"help": "the trainer's named preset"})
    config: dict[str, Any] = field(default_factory=dict, metadata={"help": "the trainer's config fields"})
    args: list[str] = field(default_factory=list, metadata={"help": "extra raw `medvqa train` flags"})

    def __post_init__(self) -> None:
        check_folder_name(self.trainer, "[base] trainer")
        self.fraction = check_fraction(self.fraction, "key 'fraction'")
        check_seed(self.seed, "key 'seed'")


@dataclass
class PrepareStep:
    """`[[prepare]]`: a set-up command (`medvqa ARGS...`), skipped once it has succeeded."""

    name: str = field(metadata={"help": "job name"})
    args: list[str] = field(metadata={"help": "the medvqa arguments, e.g. ['data', 'phantom', '--out', ...]"})
    creates: str = field(default="", metadata={"help": "a path it creates; if it is missing the step reruns"})
    needs: list[str] | None = field(
        default=None,
        metadata={
            "help": "names of earlier [[prepare]] steps it needs (default: all earlier ones, so the steps "
            "run in order; [] = none: it runs beside them)"
        },
    )
    needed_by: list[str] = field(
        default_factory=list,
        metadata={
            "help": "labels of the trainers whose training reads its output; then it runs beside the "
            "sweep's other jobs (only those trainers wait for it), not before all of them"
        },
    )

    def __post_init__(self) -> None:
        if not self.args:
            raise BadInput("key 'args' must name a medvqa command")


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

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise BadInput("key 'name' must not be empty")
        _at_least(self, "data_used", 0)
        if bool(self.model) == bool(self.eval_dirs):
            raise BadInput(f"[[reference]] {self.name!r} needs exactly one of 'model' or 'eval_dirs'")
        for key in self.eval_dirs:
            check_folder_name(key, "[[reference]] eval_dirs key")


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
    slurm: SlurmSettings = field(default_factory=SlurmSettings)
    source: str = ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_TOP_KEYS = {
    "include",
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
    "slurm",
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


def _build(cls: type[C], data: Mapping[str, Any], where: str) -> C:
    """`dataclass_from_mapping`, with the table named in the range errors of `__post_init__` too."""
    try:
        return dataclass_from_mapping(cls, data, where=where)
    except BadInput as exc:
        if str(exc).startswith(where):
            raise
        raise BadInput(f"{where}: {exc}") from None


def _subst(value: Any, mapping: Mapping[str, str]) -> Any:
    """`{out}` and `{config_dir}` in every string of a config value."""
    if isinstance(value, str):
        return re.sub(r"\{(out|config_dir)\}", lambda m: mapping[m.group(1)], value)
    if isinstance(value, list):
        return [_subst(v, mapping) for v in value]
    if isinstance(value, dict):
        return {k: _subst(v, mapping) for k, v in value.items()}
    return value


# `{checkpoint:LABEL}` in a trainer's model, args or config: the checkpoint folder of an earlier line's
# job at the same fraction and seed (the job then waits for that one and its key follows it)
CHECKPOINT_REF = re.compile(r"\{checkpoint:([^{}]*)\}")


def checkpoint_refs(value: Any) -> list[str]:
    """The line labels a config value names in `{checkpoint:LABEL}`, in order of first mention."""
    if isinstance(value, str):
        return list(dict.fromkeys(CHECKPOINT_REF.findall(value)))
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return list(dict.fromkeys(label for v in items for label in checkpoint_refs(v)))


def resolve_checkpoint_refs(value: Any, path_of: Callable[[str], str]) -> Any:
    """`value` with each `{checkpoint:LABEL}` replaced by `path_of(LABEL)`."""
    if isinstance(value, str):
        return CHECKPOINT_REF.sub(lambda m: path_of(m.group(1)), value)
    if isinstance(value, list):
        return [resolve_checkpoint_refs(v, path_of) for v in value]
    if isinstance(value, dict):
        return {k: resolve_checkpoint_refs(v, path_of) for k, v in value.items()}
    return value


def _check_checkpoint_refs(trainers: Sequence[TrainerSpec], fractions: Sequence[float],
                           seeds: Sequence[int], where: str) -> None:  # fmt: skip
    """Each `{checkpoint:LABEL}` names an earlier line (so the jobs form no cycle) that trains every
    fraction and seed of the line that names it."""
    for i, t in enumerate(trainers):
        earlier = {u.label: u for u in trainers[:i]}
        for label in checkpoint_refs([t.model, t.args, t.config]):
            if label not in earlier:
                raise BadInput(
                    f"{where} [[trainers]] {t.label!r}: '{{checkpoint:{label}}}' names no earlier [[trainers]] "
                    f"label; earlier: {sorted(earlier)}"
                )
            u = earlier[label]
            mine = {(f, s) for f in t.fractions or fractions for s in t.seeds or seeds}
            theirs = {(f, s) for f in u.fractions or fractions for s in u.seeds or seeds}
            missing = sorted(mine - theirs)
            if missing:
                f, s = missing[0]
                raise BadInput(
                    f"{where} [[trainers]] {t.label!r}: '{{checkpoint:{label}}}' has no job at fraction {f!r} "
                    f"seed {s}: line {label!r} does not train it"
                )


def _abs_path(p: str) -> str:
    """A local path made absolute; an `hf://` data root as it is (the commands resolve it)."""
    if not p or p.startswith("hf://"):
        return p
    return str(Path(p).expanduser().resolve())


def _abs_spec(spec: str) -> str:
    """`hf:relative/dir[,opts]` -> absolute path when it exists locally (hub ids are left alone)."""
    if not spec.startswith("hf:"):
        return spec
    path, sep, opts = spec[3:].partition(",")
    local = Path(path).expanduser()
    if local.exists() or path.startswith((".", "/", "~")) or "{" in path:
        path = str(local.resolve())
    return f"hf:{path}{sep}{opts}"


# Arrays of tables an including config adds to (after the included file's); any other key it sets
# replaces the included value, and tables ([run], [base.config], ...) merge key by key.
_APPENDED = ("prepare", "trainers", "eval", "reference")
_MAX_INCLUDES = 8


def read_sweep_toml(path: Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A sweep TOML with its `include` (a config it extends, relative to it) merged in, recursively.

    As lm-evaluation-harness's task `include`: the included file is the base; this file's
    `[[trainers]]`, `[[prepare]]`, `[[eval]]` and `[[reference]]` come after the base's, its
    other keys override (tables merged key by key). A cycle or a chain deeper than 8 is refused.
    """
    raw = read_toml(path, what="sweep config")
    if "include" not in raw:
        return raw
    parent = raw.pop("include")
    if not isinstance(parent, str) or not parent:
        raise BadInput(
            f"'include' must be the path of a sweep config (relative to this one), got {parent!r}", path=path
        )
    chain = (*_chain, path.resolve())
    base_path = (path.parent / parent).resolve()
    if base_path in chain:
        raise BadInput(
            f"'include' = {parent!r} includes itself: {' -> '.join(str(p) for p in (*chain, base_path))}",
            path=path,
        )
    if len(chain) >= _MAX_INCLUDES:
        raise BadInput(f"'include' chain deeper than {_MAX_INCLUDES} files", path=path)
    return _merged(read_sweep_toml(base_path, chain), raw)


def _merged(base: Mapping[str, Any], over: Mapping[str, Any], top: bool = True) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        below = base.get(key)
        if top and key in _APPENDED and isinstance(below, list) and isinstance(value, list):
            out[key] = [*below, *value]
        elif isinstance(below, dict) and isinstance(value, dict):
            out[key] = _merged(below, value, top=False)
        else:
            out[key] = value
    return out


def load_config(path: str | Path, *, out: str | Path | None = None) -> tuple[SweepConfig, Path]:
    """Parse and validate a sweep TOML; returns the config and the run folder (`--out` or runs/<name>)."""
    path = Path(path)
    where = str(path)
    raw = read_sweep_toml(path)
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise BadInput(f"{where}: unknown top-level key(s) {unknown}; known: {sorted(_TOP_KEYS)}")
    for key in ("name", "base_model", "train", "eval", "trainers"):
        if key not in raw:
            raise BadInput(f"{where}: missing required key {key!r}")
    try:
        name = check_folder_name(raw["name"], "'name'")
    except BadInput as exc:
        raise BadInput(f"{where}: {exc}") from None
    if not isinstance(raw["base_model"], str) or not raw["base_model"]:
        raise BadInput(f"{where}: 'base_model' must be a model spec string, got {raw['base_model']!r}")
    run_dir = Path(out) if out else Path("runs") / name
    run_dir = run_dir.expanduser().resolve()
    raw = _subst(raw, {"out": str(run_dir), "config_dir": str(path.resolve().parent)})

    train = _build(TrainData, _table(raw["train"], "train", where), f"{where} [train]")
    train.root = _abs_path(train.root)
    evals = []
    for i, t in enumerate(_tables(raw["eval"], "eval", where)):
        e = _build(EvalSpec, t, f"{where} [[eval]] #{i + 1}")
        e.root = _abs_path(e.root)
        evals.append(e)
    if not evals:
        raise BadInput(f"{where}: at least one [[eval]] benchmark is needed")
    if len({e.name for e in evals}) != len(evals):
        raise BadInput(f"{where}: two [[eval]] tables share a name; set 'name' to tell them apart")
    trainers = [
        _build(TrainerSpec, t, f"{where} [[trainers]] #{i + 1}")
        for i, t in enumerate(_tables(raw["trainers"], "trainers", where))
    ]
    if not trainers:
        raise BadInput(f"{where}: at least one [[trainers]] table is needed")
    if len({t.label for t in trainers}) != len(trainers):
        raise BadInput(f"{where}: two [[trainers]] share a label; set 'label' to tell them apart")
    fractions = raw.get("fractions", [1.0])
    seeds = raw.get("seeds", [0])
    if not isinstance(fractions, list) or not fractions:
        raise BadInput(f"{where}: 'fractions' must be a list of numbers in (0, 1], got {fractions!r}")
    if not isinstance(seeds, list) or not seeds:
        raise BadInput(f"{where}: 'seeds' must be a list of integers in [0, 2^32), got {seeds!r}")
    try:
        fractions = [check_fraction(f, "'fractions': fraction") for f in fractions]
        seeds = [check_seed(s, "'seeds': seed") for s in seeds]
    except BadInput as exc:
        raise BadInput(f"{where}: {exc}") from None
    _check_checkpoint_refs(trainers, fractions, seeds, where)
    for t in trainers:  # a checkpoint reference becomes an absolute path when planned
        t.model = t.model if checkpoint_refs(t.model) else _abs_spec(t.model)
    base = _build(BaseStep, _table(raw["base"], "base", where), f"{where} [base]") if "base" in raw else None
    prepare = [
        _build(PrepareStep, t, f"{where} [[prepare]] #{i + 1}")
        for i, t in enumerate(_tables(raw.get("prepare"), "prepare", where))
    ]
    labels = [t.label for t in trainers]
    for i, p in enumerate(prepare):
        # an early step (no needed_by) runs before the plan: it can wait only for early steps
        earlier = [q.name for q in prepare[:i] if p.needed_by or not q.needed_by]
        unknown = [n for n in p.needs or [] if n not in earlier]
        if unknown:
            raise BadInput(
                f"{where} [[prepare]] {p.name!r}: 'needs' names no earlier step it can wait for: {unknown}; "
                f"earlier: {earlier}"
            )
        if p.needs is None:
            p.needs = earlier
        strangers = [lab for lab in p.needed_by if lab not in labels]
        if strangers:
            raise BadInput(
                f"{where} [[prepare]] {p.name!r}: 'needed_by' names no trainer label: {strangers}; labels: {labels}"
            )
    refs = []
    for i, t in enumerate(_tables(raw.get("reference"), "reference", where)):
        r = _build(ReferenceSpec, t, f"{where} [[reference]] #{i + 1}")
        r.model = _abs_spec(r.model)
        r.eval_dirs = {k: _abs_path(v) for k, v in r.eval_dirs.items()}
        refs.append(r)
    cfg = SweepConfig(
        name=name,
        base_model=_abs_spec(str(raw["base_model"])),
        train=train,
        evals=evals,
        trainers=trainers,
        fractions=fractions,
        seeds=seeds,
        generation=_build(
            Generation, _table(raw.get("generation", {}), "generation", where), f"{where} [generation]"
        ),
        run=_build(RunSettings, _table(raw.get("run", {}), "run", where), f"{where} [run]"),
        base=base,
        prepare=prepare,
        references=refs,
        slurm=_build(SlurmSettings, _table(raw.get("slurm", {}), "slurm", where), f"{where} [slurm]"),
        source=str(path.resolve()),
    )
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
    steps = [(f"[[trainers]] {t.label!r}", t.name, t.preset, t.config) for t in cfg.trainers]
    if cfg.base:
        steps.append(("[base]", cfg.base.trainer, cfg.base.preset, cfg.base.config))
    for label, name, preset, settings in steps:
        if name not in trainers:
            raise BadInput(f"{where} {label}: unknown trainer {name!r}; known: {', '.join(trainers.names())}")
        check_trainer_settings(name, settings, f"{where} {label} [config]", preset=preset)


# --------------------------------------------------------------------------------------------
# Trainer settings (validated against the trainer's config dataclass) -> the `--config` file
# --------------------------------------------------------------------------------------------


def trainer_config_class(name: str) -> type | None:
    """The config dataclass of a registered trainer (`config_class` attribute), if it declares one."""
    from medvqa.registry import trainers

    cls = trainers.get(name)
    cfg_cls = getattr(cls, "config_class", None)
    return cfg_cls if dataclasses.is_dataclass(cfg_cls) else None


def check_trainer_settings(
    trainer: str, settings: Mapping[str, Any], where: str, *, preset: str = ""
) -> None:
    """Refuse unknown keys, wrong types and out-of-range values now, not an hour into the sweep:
    the trainer's config is built as `medvqa train` builds it (preset, then these settings), so its
    own `__post_init__` checks run on the values the job will use."""
    from medvqa.registry import trainers

    cfg_cls = trainer_config_class(trainer)
    if cfg_cls is None:
        return
    presets = getattr(trainers.get(trainer), "presets", {}) or {}
    if preset and preset not in presets:
        raise BadInput(
            f"{where}: trainer {trainer!r} has no preset {preset!r}; known: {', '.join(sorted(presets)) or '(none)'}"
        )
    _build(cfg_cls, {**presets.get(preset, {}), **settings}, where)  # keys and types, over the preset
    try:
        values = dataclasses.asdict(dataclasses.replace(cfg_cls(), **dict(presets.get(preset, {}))))
        values.update(settings)
        cfg_cls(**values)
    except BadInput as exc:
        raise BadInput(f"{where}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise BadInput(f"{where}: {exc}") from None


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):  # an inline table (e.g. expert_options), keys as TOML strings
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise BadInput(f"trainer setting value {value!r} cannot be written to TOML")


def settings_toml(settings: Mapping[str, Any]) -> str:
    """The `--config` file of `medvqa train`: a [trainer] table of scalar/list settings."""
    lines = ["[trainer]"] + [f"{k} = {_toml_value(v)}" for k, v in sorted(settings.items()) if v is not None]
    return "\n".join(lines) + "\n"
