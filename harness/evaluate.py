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

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medvqa.errors import BadInput
from medvqa.evaluation.generate import Dist, generate_predictions
from medvqa.evaluation.plan import default_out_dir, generation_settings, make_plan, run_key
from medvqa.evaluation.runfiles import PREDICTIONS, SCORED, SCORES, consolidate, is_complete, remove_run
from medvqa.evaluation.score import finished_scores, score_run
from medvqa.io import read_json

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
    benchmark: str = field(metadata={"help": "registered benchmark name (medvqa benchmarks)"})
    root: str = field(metadata={"help": "the benchmark's data folder"})
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
    scorers: str = field(default="all", metadata={"help": "llava-med, strict or all"})
    n_boot: int = field(default=1000, metadata={"help": "bootstrap resamples for the CIs (0 = none)"})
    device: str = field(
        default="", metadata={"help": "device for hf: models (default: the spec's, else auto)"}
    )
    progress: bool | None = field(
        default=None, metadata={"help": "progress bar (default: only when stderr is a terminal)"}
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
    stop_after_batches: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) one eval and return the `scores.json` content.

    `model` may be an already loaded VQAModel (a sweep reusing it); else `cfg.model` is loaded,
    and only when some question still needs an answer. `stop_after_batches` stops after that
    many batches on this rank without scoring (tests simulate a kill with it; the returned dict
    is then empty).
    """
    started = time.perf_counter()
    dist = Dist()
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
    key = plan.key(fingerprint) if fingerprint else None

    # A finished run (same key, same questions) needs no model and no work.
    if (previous := finished(key)) is not None:
        return previous
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

    # Merge what earlier (possibly multi-process) runs left, then everyone reads the same state.
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
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
        stop_after_batches=stop_after_batches,
    )
    if generated.stopped:
        return {}
    dist.barrier()

    scores: dict[str, Any] = {}
    if dist.main:
        rows = consolidate(out, key, plan.order, say)
        details = model.describe() if hasattr(model, "describe") else None
        scores = score_run(
            plan, key, fingerprint, rows, skipped=generated.skipped, model_details=details, log=say
        )
        say(_summary_line(scores, out, time.perf_counter() - started))
    dist.barrier()
    if not dist.main:
        scores = read_json(out / SCORES)
    return scores


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
