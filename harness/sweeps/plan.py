"""The job plan of a sweep: prepare → base → train × fraction × seed → eval, each an ordinary
`medvqa` command with a key (the hash of its command, its settings files, the keys of the jobs it
depends on, the digest of what the `[[prepare]]` steps it reads made, and for training the data
manifest of its fraction)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medvqa.errors import BadInput
from medvqa.layout import fraction_dirname, seed_dirname
from medvqa.sweeps.config import (
    EvalSpec,
    SweepConfig,
    check_trainer_settings,
    checkpoint_refs,
    resolve_checkpoint_refs,
    settings_toml,
)
from medvqa.sweeps.made import made_digest, made_path
from medvqa.types import stable_hash

SWEEP_FORMAT = 1


@dataclass
class Job:
    id: str  # e.g. "train/sft/f0.09/s0"
    kind: str  # prepare | base | train | eval
    args: list[str]  # medvqa arguments (without the launcher)
    deps: list[str]
    title: str
    output: Path  # the folder (or file) the job creates
    launcher: str = ""
    manifest_hash: str = ""
    creates: str = ""
    # filled by `plan`: hash of the command, its dependencies' keys, what its prepare steps made
    key: str = ""
    # the key the previous release computed (no prepare digests): a marker of that release holding it
    # still counts as done; "" once a job this one reads has run again (then only `key` counts)
    legacy_key: str = ""
    # prepare step id -> digest of what it made (in the key)
    made: dict[str, str] = field(default_factory=dict)
    priority: int = 0  # among ready jobs, higher starts first (then config order)
    after: list[str] = field(default_factory=list)  # jobs it waits for without depending on (not in the key)
    early: bool = False  # a set-up step run before the plan (the training data may come from it)

    @property
    def reads(self) -> list[str]:
        """The jobs whose output this one reads: its dependencies, and for a set-up step its `needs`."""
        return [*self.deps, *self.after] if self.kind == "prepare" else list(self.deps)

    @property
    def file_stem(self) -> str:
        """The job's name in the state folder (markers, logs, settings files)."""
        return self.id.replace("/", "__")


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower() or "ref"


class Planner:
    """Turns a config into jobs; computes the fraction manifests the trainers must reproduce."""

    def __init__(self, cfg: SweepConfig, run_dir: Path):
        self.cfg = cfg
        self.run_dir = run_dir
        self.state_dir = run_dir / ".sweep"
        self._manifest_cache: dict[tuple[float, int], tuple[str, int]] = {}
        self._samples: list[Any] | None = None
        self.n_train_full: int | None = None
        self.files: dict[Path, str] = {}  # settings files the planned commands read
        self._made: dict[str, str] = {}  # prepare job id -> digest of its output on disk (cached)
        self._by_id: dict[str, Job] = {}  # the last plan, for `rekey`

    # -- data manifests (computed here, compared with what the trainer recorded) -------------

    def forget_data(self) -> None:
        """Drop what was read from the training data (it is being rebuilt)."""
        self._manifest_cache.clear()
        self._samples = None

    def manifest(self, fraction: float, seed: int) -> tuple[str, int]:
        """(manifest hash, n labeled) of a fraction; "" if the training data is not there yet."""
        key = (float(fraction), int(seed))
        if key not in self._manifest_cache:
            from medvqa.benchmarks.hub import resolve_root

            root = resolve_root(self.cfg.train.root).path  # a folder, or hf:// from the local HF cache
            if not root.exists():
                return ("", 0)
            from medvqa.fractions import manifest_hash, select_fraction
            from medvqa.registry import benchmarks

            if self._samples is None:
                bench = benchmarks.get(self.cfg.train.benchmark)()
                self._samples = bench.load(self.cfg.train.split, root)
                self.n_train_full = len(self._samples)
            subset = select_fraction(self._samples, float(fraction), int(seed))
            self._manifest_cache[key] = (manifest_hash(subset), len(subset))
        return self._manifest_cache[key]

    # -- what the set-up steps made --------------------------------------------------------------

    def made(self, job: Job) -> str:
        """Digest of what a prepare step made, as it is on disk now ("" if nothing yet)."""
        if job.id not in self._made:
            self._made[job.id] = made_digest(made_path(job.creates, self.run_dir))
        return self._made[job.id]

    def forget_made(self, job_id: str) -> None:
        """A prepare step ran: its output is read again when next asked for."""
        self._made.pop(job_id, None)

    # -- commands ------------------------------------------------------------------------------

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
            check_trainer_settings(trainer, settings, f"{self.cfg.source}: {job_id} [config]", preset=preset)
            text = settings_toml(settings)
            path = self.state_dir / "configs" / (job_id.replace("/", "__") + ".toml")
            self.files[path] = text
            args += ["--config", str(path)]
        return args + list(self.cfg.train.args) + list(extra)

    # -- the plan ------------------------------------------------------------------------------

    def jobs(self, *, with_manifests: bool = True) -> list[Job]:
        cfg, run = self.cfg, self.run_dir
        eval_launcher = cfg.run.eval_launcher or cfg.run.launcher
        jobs: list[Job] = []
        prep_ids = []  # the early ones, which every other job follows
        late: dict[str, list[str]] = {}  # trainer label -> the set-up steps its training reads
        for p in cfg.prepare:
            jid = f"prepare/{slug(p.name)}"
            if p.needed_by:
                for label in p.needed_by:
                    late.setdefault(label, []).append(jid)
            else:
                prep_ids.append(jid)
            out = Path(p.creates) if p.creates else run
            after = [f"prepare/{slug(n)}" for n in p.needs or []]
            title = f"prepare {p.name}"
            job = Job(jid, "prepare", list(p.args), [], title, out, creates=p.creates, after=after)
            job.early = not p.needed_by
            # as urgent as the most urgent trainer waiting for it
            job.priority = max((t.priority for t in cfg.trainers if t.label in p.needed_by), default=0)
            jobs.append(job)
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
                    rel = _line_dir(t.label, f, s)
                    job_dir = run / rel
                    ckpt = job_dir / "checkpoint"
                    tid = f"train/{rel}"
                    # `{checkpoint:LABEL}`: that line's job at this fraction and seed, a dependency
                    refs = [
                        f"train/{_line_dir(label, f, s)}"
                        for label in checkpoint_refs([t.model, t.args, t.config])
                    ]
                    model, settings, extra = resolve_checkpoint_refs(
                        [t.model or base_model, t.config, t.args],
                        lambda label, f=f, s=s: str(run / _line_dir(label, f, s) / "checkpoint"),
                    )
                    args = self._train_args(tid, t.name, model, f, s, ckpt, t.preset, settings, extra)
                    mh = self.manifest(f, s)[0] if with_manifests else ""
                    jobs.append(
                        Job(
                            tid,
                            "train",
                            args,
                            [*base_deps, *late.get(t.label, []), *refs],
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
                                f"eval/{rel}/{e.name}",
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
        self._by_id = {j.id: j for j in jobs}
        for j in reversed(jobs):  # a job is as urgent as the most urgent one that reads it
            for d in j.deps:
                self._by_id[d].priority = max(self._by_id[d].priority, j.priority)
        for j in jobs:  # keys in dependency order (deps, and a step's needs, always come first)
            self.rekey(j)
        return jobs

    def rekey(self, job: Job) -> None:
        """(Re)compute a job's key from its dependencies' current keys and what the prepare steps it
        reads made now: the scheduler calls it again when the job's turn comes, after they ran."""
        by_id = self._by_id
        # a settings file may name the run folder too (`stage_cache = "{out}/stage-cache"`)
        files = {
            self._portable(str(p)): self._portable(t) for p, t in self.files.items() if str(p) in job.args
        }
        fields = {
            "args": [self._portable(a) for a in job.args],
            "files": files,
            "manifest": job.manifest_hash,
            "versions": self._versions(job),
            "format": SWEEP_FORMAT,
        }
        job.legacy_key = stable_hash({**fields, "deps": [by_id[d].legacy_key for d in job.deps]})
        job.made = {
            d: self.made(by_id[d]) for d in job.reads if by_id[d].kind == "prepare" and by_id[d].creates
        }
        key_fields = {**fields, "deps": [by_id[d].key for d in job.deps]}
        if job.made:  # left out when empty: the keys of jobs that read no set-up output did not change
            key_fields["made"] = job.made
        job.key = stable_hash(key_fields)

    def _versions(self, job: Job) -> dict[str, str]:
        """Versions of the benchmarks a job reads (a new generator or loader version reruns it)."""
        from medvqa.registry import benchmarks

        names = [job.args[i + 1] for i, a in enumerate(job.args[:-1]) if a == "--benchmark"]
        return {n: str(benchmarks.get(n).version) for n in names if n in benchmarks}

    def _portable(self, arg: str) -> str:
        """An argument with the run folder written as `{out}`: a moved or copied run keeps its keys."""
        return arg.replace(str(self.run_dir), "{out}")

    def check_jobs(self, jobs: Sequence[Job]) -> None:
        """Every train/eval job's full settings, checked as its own command will check them — its
        flags through the real `medvqa` parser, then the config object it builds (whose
        `__post_init__` checks the ranges) — before any job runs (`--dry-run` included)."""
        from medvqa.cli import build_parser

        parser = build_parser()
        with tempfile.TemporaryDirectory() as tmp:
            for job in jobs:
                where = f"{self.cfg.source}: job {job.id}"
                if job.kind == "prepare":  # a set-up command: its flags at least
                    _parse(parser, list(job.args), where)
                    continue
                args = list(job.args)
                for path, text in self.files.items():  # the settings files, as the job will read them
                    if str(path) in args:
                        local = Path(tmp) / path.name
                        local.write_text(text)
                        args[args.index(str(path))] = str(local)
                ns = _parse(parser, args, where)
                try:
                    _build_job_config(ns)
                except BadInput as exc:
                    raise BadInput(f"{where}: {exc}") from None
                except (TypeError, ValueError) as exc:
                    raise BadInput(f"{where}: {exc}") from None


def _line_dir(label: str, fraction: float, seed: int) -> str:
    """A trainer line's job folder, relative to the run folder: LABEL/f0.09/s0."""
    return f"{label}/{fraction_dirname(fraction)}/{seed_dirname(seed)}"


def _parse(parser: argparse.ArgumentParser, args: list[str], where: str) -> argparse.Namespace:
    """argparse, with its usage error (normally printed, then exit 2) turned into one BadInput line."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(args)
    except SystemExit:
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
        message = lines[-1].split(" error: ", 1)[-1] if lines else "bad arguments"
        raise BadInput(f"{where}: {message}") from None


def _build_job_config(ns: argparse.Namespace) -> Any:
    """The config object a `medvqa train` / `medvqa eval` with these flags builds before it runs."""
    from medvqa.registry import trainers
    from medvqa.trainers.config import resolve_trainer_config

    if ns.func.__module__.endswith(".train"):
        from medvqa.fractions import check_fraction, check_seed

        check_fraction(ns.fraction, "--fraction")
        check_seed(ns.seed, "--seed")
        flags = {d[4:]: v for d, v in vars(ns).items() if d.startswith("cfg_") and v is not None}
        return resolve_trainer_config(
            trainers.get(ns.trainer), preset=ns.preset or "", config_file=ns.config or "", settings=flags
        )
    from medvqa.evaluate import EvalConfig

    values = {
        f.name: getattr(ns, f.name) for f in dataclasses.fields(EvalConfig) if getattr(ns, f.name) is not None
    }
    return EvalConfig(**values)
