"""Generate + score one model on one benchmark split: resumable, batched, accelerate-aware.

    scores = evaluate(EvalConfig(model="hf:runs/x/checkpoint", benchmark="phantom", root="data/phantom"))

Three steps with files in between (`medvqa.evaluation`): **plan** (questions, prompt, decoding,
scoring options, run folder; no model) → **generate** (`predictions.jsonl`) → **score**
(`scores.json`, `scored.jsonl`). This module runs them in order and decides what can be skipped.

Run folder (`out`):
- `predictions.jsonl` — one LLaVA-Med answer-file row per question (`question_id`, `prompt`, `text`,
  `answer_id`, `model_id`, `metadata`) plus ours (`answer_type`, `image_id`, `key`), appended and
  flushed per batch. Rows carry the cache `key` = hash(model fingerprint, benchmark + version +
  split, prompt policy, generation settings): a rerun reuses rows with the same key only, so a new
  checkpoint never gets an old checkpoint's answers (rows of another key are moved aside to
  `stale/`).
- `scores.json` — the scores (both scorers, 95% CIs) and every setting that produced them.
- `scored.jsonl` — per-question metrics, for paired tests in reports.

A killed eval continues from the last flushed batch; a finished one (scores.json with the same key
and the same questions) is returned without loading the model.

Multi-process (`accelerate launch [--cpu] --num_processes N -m medvqa eval ...`): the
remaining questions are sharded across ranks (rank r takes every N-th), each rank appends to
`predictions.rank<r>.jsonl`, and rank 0 merges them into `predictions.jsonl` (in benchmark order)
and scores: the same files and scores as one process.
"""

from __future__ import annotations

import errno
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from medvqa.distributed import Dist
from medvqa.errors import BadInput
from medvqa.evaluation.generate import generate_predictions
from medvqa.evaluation.plan import EvalPlan, default_out_dir, generation_settings, make_plan, run_key
from medvqa.evaluation.runfiles import (
    PREDICTIONS,
    SCORED,
    SCORES,
    SKIPPED,
    consolidate,
    is_complete,
    remove_run,
)
from medvqa.evaluation.score import finished_scores, previous_model_details, score_run
from medvqa.io import output_lock, read_json, read_rows

# OS errors that mean "this output cannot be written", wherever the library reports them
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}

__all__ = [
    "PREDICTIONS",
    "SCORED",
    "SCORES",
    "EvalConfig",
    "default_out_dir",
    "evaluate",
    "generation_settings",
    "remove_run",
    "run_key",
]


@dataclass
class EvalConfig:
    """One `medvqa eval` job. Every field is one flag."""

    model: str = field(metadata={"help": "model spec: hf:PATH_OR_ID[,adapter=DIR,...] or openai:MODEL[@URL]"})
    benchmark: str = field(
        metadata={"help": "registered benchmark name (medvqa benchmarks); several: a,b,c (one --root each)"}
    )
    root: str = field(metadata={"help": "the benchmark's data folder; several: A,B,C in --benchmark order"})
    split: str = field(default="test", metadata={"help": "split to evaluate"})
    benchmark_options: list[str] = field(
        default_factory=list,
        metadata={"help": "the benchmark's options as KEY=VALUE[,KEY=VALUE], e.g. lang=zh for slake"},
    )
    limit: int = field(default=0, metadata={"help": "evaluate the first N questions only (0 = all)"})
    batch_size: int = field(default=8, metadata={"help": "questions per generation batch"})
    max_new_tokens: int | None = field(
        default=None, metadata={"help": "tokens generated per answer (default: the policy's, else 32)"}
    )
    temperature: float | None = field(
        default=None,
        metadata={"help": "sampling temperature; 0 = greedy (default: the policy's, else greedy)"},
    )
    top_p: float | None = field(
        default=None, metadata={"help": "nucleus sampling top-p (with temperature > 0)"}
    )
    seed: int = field(default=0, metadata={"help": "sampling seed, and the bootstrap seed of the CIs"})
    prompt_policy: str = field(
        default="", metadata={"help": "prompt policy (default: the benchmark's, else short-answer)"}
    )
    out: str = field(
        default="", metadata={"help": "run folder (default: runs/eval/<model>/<benchmark>-<split>)"}
    )
    skip_bad: bool = field(
        default=False,
        metadata={"help": "skip records and images that fail to load (counted) instead of stopping"},
    )
    max_pixels: int | None = field(
        default=None,
        metadata={
            "help": "refuse an image of more than N pixels before decoding it (a decompression bomb; "
            "default: 50,000,000; 0: no cap)"
        },
    )
    scorers: str = field(default="all", metadata={"help": "llava-med, strict or all"})
    n_boot: int = field(default=1000, metadata={"help": "bootstrap resamples for the CIs (0 = none)"})
    device: str = field(
        default="", metadata={"help": "device for hf: models (default: the spec's, else auto)"}
    )
    progress: bool | None = field(
        default=None, metadata={"help": "progress bar (default: only when stderr is a terminal)"}
    )
    rescore: bool = field(
        default=False,
        metadata={
            "help": "score the run folder's predictions.jsonl again (other --scorers, --n-boot, +think) "
            "without loading the model or generating"
        },
    )

    def __post_init__(self) -> None:
        """Ranges, checked when the config is built (so a sweep refuses a bad eval job at load)."""
        checks = [
            ("--batch-size", self.batch_size, self.batch_size >= 1, ">= 1"),
            ("--limit", self.limit, self.limit >= 0, ">= 0"),
            ("--max-new-tokens", self.max_new_tokens, (self.max_new_tokens or 1) >= 1, ">= 1"),
            ("--n-boot", self.n_boot, self.n_boot >= 0, ">= 0"),
            ("--seed", self.seed, 0 <= self.seed < 2**32, "in [0, 2^32)"),
            ("--temperature", self.temperature, self.temperature is None or self.temperature >= 0, ">= 0"),
            ("--top-p", self.top_p, self.top_p is None or 0 < self.top_p <= 1, "in (0, 1]"),
        ]
        for flag, value, ok, rule in checks:
            if not ok:
                raise BadInput(f"{flag} must be {rule}, got {value!r}")


def _summary_line(scores: dict[str, Any], out: Path, elapsed: float, note: str = "") -> str:
    parts = [f"{scores['benchmark']}/{scores['split']}", f"n={scores['n']}"]
    for scorer in ("llava-med", "strict"):
        metrics = scores["scorers"].get(scorer)
        if not metrics:
            continue
        closed = metrics.get("closed_accuracy", {}).get("value")
        recall = metrics.get("open_recall", {}).get("value")
        bits = []
        if closed is not None:
            bits.append(f"closed {closed:.1f}")
        if recall is not None:
            bits.append(f"open recall {recall:.1f}")
        if bits:
            parts.append(f"{scorer}: " + ", ".join(bits))
    return " | ".join(parts) + f" | {elapsed:.1f}s{note} → {out}"


def evaluate(
    cfg: EvalConfig,
    *,
    model: Any = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume, or rescore) one eval and return the `scores.json` content.

    `model` may be an already loaded VQAModel (a sweep reusing it); else `cfg.model` is loaded,
    and only when some question still needs an answer: a run whose predictions are complete but
    whose scoring options changed is rescored from predictions.jsonl.
    """
    started = time.perf_counter()
    dist = Dist.current()
    say = log or (lambda msg: print(msg, file=sys.stderr))
    spec = cfg.model if model is None else getattr(model, "spec", cfg.model)
    plan = make_plan(cfg, spec)
    out = plan.out

    def finished(key: str | None) -> dict[str, Any] | None:
        previous = finished_scores(plan, key)
        if previous is not None and dist.main:
            say(_summary_line(previous, out, time.perf_counter() - started, " (already done)"))
        return previous

    device = cfg.device or dist.device
    fingerprint = model.fingerprint if model is not None else _model_fingerprint_light(spec, device or None)
    if cfg.rescore and model is None and fingerprint is None:
        fingerprint = stored_fingerprint(out)
    key = plan.key(fingerprint) if fingerprint else None

    # A finished run (same key, same questions, same scoring) needs no model and no work.
    if (previous := finished(key)) is not None:
        return previous
    with ExitStack() as stack:
        if dist.main:  # before any model is loaded: the folder is writable and ours alone
            prepare_out_dir(out)
            stack.enter_context(output_lock(out))
        stack.enter_context(output_errors(out))
        if cfg.rescore:
            return _rescore(plan, key, fingerprint, dist, say, started)
        if key is None or not is_complete(out, key, plan.ids):
            if model is None:
                from medvqa.models import load_model

                overrides = {"device": device} if device and spec_adapter(spec) == "hf" else {}
                model = load_model(spec, **overrides)
            light_key = key
            fingerprint = model.fingerprint
            key = plan.key(fingerprint)
            if key != light_key and (previous := finished(key)) is not None:
                return previous
        assert key is not None and fingerprint is not None
        if model is not None and hasattr(model, "describe"):
            details = model.describe()
        else:  # a rescore: what the earlier scoring recorded of the model
            details = previous_model_details(plan, key)

        # Merge what earlier (possibly multi-process) runs left, then everyone reads the same state.
        if dist.main:
            (out / SCORES).unlink(missing_ok=True)  # no stale scores beside changing predictions
            consolidate(out, key, plan.order, say)
        dist.barrier()
        generated = generate_predictions(
            plan,
            model,
            key,
            dist,
            batch_size=cfg.batch_size,
            skip_bad=cfg.skip_bad,
            progress=cfg.progress,
            log=say,
        )
        dist.barrier()

        scores: dict[str, Any] = {}
        if dist.main:
            rows = consolidate(out, key, plan.order, say)
            scores = score_run(
                plan, key, fingerprint, rows, skipped=generated.skipped, model_details=details, log=say
            )
            say(_summary_line(scores, out, time.perf_counter() - started))
        dist.barrier()
    if not dist.main:
        scores = read_json(out / SCORES)
    return scores


def _rescore(
    plan: EvalPlan,
    key: str | None,
    fingerprint: str | None,
    dist: Dist,
    say: Callable[[str], None],
    started: float,
) -> dict[str, Any]:
    """`--rescore`: score predictions.jsonl again (new scorers, bootstrap, `+think`); no model, no generation."""
    out = plan.out
    if not key or not fingerprint:
        raise BadInput(
            "nothing to rescore: no scored or predicted rows of this model in the run folder",
            path=out,
            field="--out",
        )
    if not dist.main:
        return {}
    details = previous_model_details(plan, key)
    rows = consolidate(out, key, plan.order, say)
    listed = {str(r.get("id")) for r in read_rows(out / SKIPPED) if r.get("stage") != "load"}
    missing = [qid for qid in plan.ids if qid not in rows and qid not in listed]
    if missing:
        raise BadInput(
            f"--rescore: {len(missing)} of {len(plan.ids)} questions have no prediction of this model and "
            f"settings (e.g. {missing[0]!r}); run without --rescore to answer them",
            path=out / PREDICTIONS,
        )
    scores = score_run(plan, key, fingerprint, rows, skipped=[], model_details=details, log=say)
    say(_summary_line(scores, out, time.perf_counter() - started, " (rescored)"))
    return scores


def stored_fingerprint(out: Path) -> str | None:
    """The model fingerprint an earlier run recorded (for `--rescore` of a model that cannot tell
    its fingerprint without loading): from scores.json, else the predictions' one fingerprint."""
    path = out / SCORES
    if path.is_file():
        try:
            fingerprint = read_json(path).get("model", {}).get("fingerprint")
        except (BadInput, AttributeError):
            fingerprint = None
        if isinstance(fingerprint, str) and fingerprint:
            return fingerprint
    found = {r.get("fingerprint") for r in read_rows(out / PREDICTIONS)}
    return found.pop() if len(found) == 1 and isinstance(next(iter(found)), str) else None


def prepare_out_dir(out: Path) -> None:
    """Create the run folder and prove it writable, before a model is loaded (one line, exit 2)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        if isinstance(exc, FileExistsError | NotADirectoryError) or out.is_file():
            why = "is a file or lies under a file"
        else:
            why = f"is not writable ({exc.strerror or exc})"
        raise BadInput(f"the run folder {why}", path=out, field="--out") from None


@contextmanager
def output_errors(out: Path) -> Iterator[None]:
    """An OS error writing the run folder (full disk, read-only filesystem) is one line, exit 2.

    The files stay intact: rows are appended whole and flushed, the others replaced atomically.
    """
    try:
        yield
    except OSError as exc:
        filename = exc.filename if isinstance(exc.filename, str) else ""
        inside = bool(filename) and Path(filename).absolute().is_relative_to(out.absolute())
        if not inside and exc.errno not in WRITE_ERRNOS:
            raise
        where = filename if inside else out
        raise BadInput(
            f"cannot write the run folder ({exc.strerror or exc}); what was written is intact, rerun to resume",
            path=where,
            field="--out",
        ) from None


def per_benchmark(cfg: EvalConfig) -> list[EvalConfig]:
    """`--benchmark a,b --root A,B`: one job per benchmark (root i for benchmark i), every one planned
    (loaded and checked) before the first runs; with `--out`, b's run folder is `<out>/<b>-<split>`."""
    names = [n.strip() for n in cfg.benchmark.split(",")]
    if len(names) == 1:
        return [cfg]
    roots = [r.strip() for r in cfg.root.split(",")]
    if len(roots) != len(names):
        raise BadInput(
            f"--benchmark names {len(names)} benchmarks but --root gives {len(roots)} folders; "
            "give one root per benchmark, in the same order",
            field="--root",
        )
    if "" in names or len(set(names)) != len(names):
        raise BadInput(f"--benchmark {cfg.benchmark!r}: names must be non-empty and distinct")
    from medvqa.registry import benchmarks

    for name, root in zip(names, roots):
        benchmarks.get(name)  # an unknown name is a BadInput listing the known ones
        if not Path(root).expanduser().exists():
            raise BadInput(f"benchmark data folder of {name!r} does not exist", path=root, field="--root")
    jobs = [
        replace(
            cfg,
            benchmark=name,
            root=root,
            out=str(Path(cfg.out) / f"{name}-{cfg.split}") if cfg.out else "",
        )
        for name, root in zip(names, roots)
    ]
    for job in jobs:  # every benchmark loads (records, images, options) before any model runs
        make_plan(job, job.model)
    return jobs


def spec_adapter(spec: str) -> str:
    from medvqa.models import parse_model_spec

    return parse_model_spec(spec)[0]


def _model_fingerprint_light(spec: str, device: str | None) -> str | None:
    """The model's fingerprint without loading it (when its adapter can tell), else None."""
    from medvqa.models import parse_model_spec
    from medvqa.registry import models

    name, target, options = parse_model_spec(spec)
    cls = models.get(name)
    fn = getattr(cls, "spec_fingerprint", None)
    if fn is None:
        return None
    if device:
        options = {**options, "device": device}
    return fn(target, **options)
