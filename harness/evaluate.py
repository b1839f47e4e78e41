"""Generate + score one model on one benchmark split: resumable, batched, accelerate-aware.

    scores = evaluate(EvalConfig(model="hf:runs/x/checkpoint", benchmark="phantom", root="data/phantom"))

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

import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medvqa.errors import BadInput
from medvqa.io import (
    JsonlAppender,
    atomic_write_json,
    atomic_write_jsonl,
    iter_jsonl,
    library_versions,
    read_json,
)
from medvqa.types import GenerationRequest, GenerationSettings, VQASample, stable_hash

PREDICTIONS = "predictions.jsonl"
SCORES = "scores.json"
SCORED = "scored.jsonl"
KEY_VERSION = 1


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


# --- distributed ----------------------------------------------------------------------------


class _Dist:
    """Rank, world size and barriers: accelerate's PartialState when launched with >1 process."""

    def __init__(self) -> None:
        self.state: Any = None
        self.rank, self.world = 0, 1
        if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            from accelerate import PartialState

            self.state = PartialState()
            self.rank, self.world = self.state.process_index, self.state.num_processes

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> str | None:
        return str(self.state.device) if self.state is not None else None

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()


# --- helpers --------------------------------------------------------------------------------


def default_out_dir(model_spec: str, benchmark: str, split: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model_spec.split(",")[0]).strip("_")[-80:] or "model"
    return Path("runs") / "eval" / slug / f"{benchmark}-{split}"


def generation_settings(cfg: EvalConfig, policy: Any) -> GenerationSettings:
    """Harness defaults < the policy's published decoding < explicit flags."""
    values: dict[str, Any] = {**asdict(GenerationSettings()), **dict(policy.generation)}
    if cfg.max_new_tokens is not None:
        values["max_new_tokens"] = cfg.max_new_tokens
    if cfg.temperature is not None:
        values["temperature"] = cfg.temperature
        values["do_sample"] = cfg.temperature > 0
    if cfg.top_p is not None:
        values["top_p"] = cfg.top_p
    values["seed"] = cfg.seed
    if values["max_new_tokens"] < 1:
        raise BadInput("--max-new-tokens must be >= 1")
    if values.get("do_sample") and values.get("temperature", 0) <= 0:
        raise BadInput("sampling needs --temperature > 0")
    return GenerationSettings(**values)


def run_key(fingerprint: str, bench: Any, split: str, policy: Any, settings: GenerationSettings) -> str:
    """The cache key of every prediction row: model identity + benchmark + prompt + decoding."""
    return stable_hash(
        {
            "v": KEY_VERSION,
            "model": fingerprint,
            "benchmark": bench.name,
            "benchmark_version": bench.version,
            "split": split,
            "prompt_policy": policy.to_json(),
            "generation": settings.to_json(),
        }
    )


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


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [row for _, row in iter_jsonl(path, allow_truncated_tail=True) if isinstance(row, dict)]


def _consolidate(out: Path, key: str, order: dict[str, int], log: Callable[[str], None]) -> dict[str, dict]:
    """Merge predictions.jsonl and rank shards into predictions.jsonl (rows of `key`, benchmark order).

    Rows of another key are moved aside to `stale/`; questions not in this run are kept at the end.
    Returns {question_id: row} for this key.
    """
    main = out / PREDICTIONS
    shards = sorted(out.glob("predictions.rank*.jsonl"))
    rows = _read_rows(main)
    for shard in shards:
        rows += _read_rows(shard)
    keep: dict[str, dict] = {}
    stale: list[dict] = []
    for row in rows:
        if row.get("key") == key and "question_id" in row:
            keep.setdefault(str(row["question_id"]), row)
        else:
            stale.append(row)
    if stale:
        stale_dir = out / "stale"
        stale_dir.mkdir(exist_ok=True)
        dest = stale_dir / f"predictions-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.jsonl"
        atomic_write_jsonl(dest, stale)
        log(f"moved {len(stale)} predictions of another model/settings to {dest}")
    if shards or stale or (main.is_file() and len(keep) != len(rows)):
        ordered = sorted(keep.values(), key=lambda r: order.get(str(r["question_id"]), len(order)))
        atomic_write_jsonl(main, ordered)
    elif main.is_file():
        # re-write only if the tail was torn (JsonlAppender trims it on open anyway)
        data = main.read_bytes()
        if data and not data.endswith(b"\n"):
            atomic_write_jsonl(main, sorted(keep.values(), key=lambda r: order.get(str(r["question_id"]), 0)))
    for shard in shards:
        shard.unlink(missing_ok=True)
    return keep


def _progress(total: int, enabled: bool | None, desc: str) -> Any:
    from tqdm import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="q", disable=not enabled, dynamic_ncols=True, leave=False)


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


# --- the job --------------------------------------------------------------------------------


def evaluate(
    cfg: EvalConfig,
    *,
    model: Any = None,
    log: Callable[[str], None] | None = None,
    stop_after_batches: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) one eval and return the `scores.json` content.

    `model` may be an already loaded VQAModel (a sweep reusing it); else `cfg.model` is loaded.
    `stop_after_batches` stops after that many batches on this rank without scoring (tests
    simulate a kill with it; the returned dict is then empty).
    """
    from medvqa.benchmarks import make_benchmark, parse_options
    from medvqa.prompts import get_policy
    from medvqa.scoring import resolve_scorers, score_samples

    started = time.perf_counter()
    dist = _Dist()
    say = log or (lambda msg: print(msg, file=sys.stderr))

    def log_main(msg: str) -> None:
        if dist.main:
            say(msg)

    if cfg.batch_size < 1:
        raise BadInput("--batch-size must be >= 1")
    if cfg.limit < 0:
        raise BadInput("--limit must be >= 0")
    scorers = resolve_scorers(cfg.scorers.split(",") if isinstance(cfg.scorers, str) else cfg.scorers)
    bench = make_benchmark(cfg.benchmark, parse_options(cfg.benchmark_options, flag="--benchmark-options"))
    if cfg.split not in bench.splits:
        raise BadInput(
            f"benchmark {cfg.benchmark!r} has no split {cfg.split!r}; splits: {', '.join(bench.splits)}"
        )
    root = Path(cfg.root).expanduser()
    if not root.exists():
        raise BadInput("benchmark data folder does not exist", path=root, field="--root")
    samples: list[VQASample] = bench.load(cfg.split, root, skip_bad=cfg.skip_bad)
    n_skipped_records = int(getattr(bench, "n_skipped", 0) or 0)
    if cfg.limit:
        samples = samples[: cfg.limit]
    if not samples:
        raise BadInput(f"benchmark {cfg.benchmark!r} split {cfg.split!r} has no questions", path=root)
    policy = get_policy(cfg.prompt_policy or getattr(bench, "prompt_policy", None) or None)
    settings = generation_settings(cfg, policy)
    spec = cfg.model if model is None else getattr(model, "spec", cfg.model)
    out = Path(cfg.out) if cfg.out else default_out_dir(spec, bench.name, cfg.split)
    ids = [s.id for s in samples]
    ids_hash = stable_hash(ids)
    order = {qid: i for i, qid in enumerate(ids)}

    device = cfg.device or dist.device
    fingerprint = model.fingerprint if model is not None else _model_fingerprint_light(spec, device or None)
    key = run_key(fingerprint, bench, cfg.split, policy, settings) if fingerprint else None

    def finished() -> dict[str, Any] | None:
        """scores.json of this key and these questions (a finished run), else None."""
        if not key or not (out / SCORES).is_file():
            return None
        try:
            previous = read_json(out / SCORES)
        except BadInput:
            return None
        if previous.get("key") == key and previous.get("questions_hash") == ids_hash:
            log_main(_summary_line(previous, out, time.perf_counter() - started, " (already done)"))
            return previous
        return None

    # A finished run (same key, same questions) needs no model and no work.
    if (previous := finished()) is not None:
        return previous
    if key is None or not _is_complete(out, key, ids):
        if model is None:
            from medvqa.models import load_model

            overrides = {"device": device} if device and spec_adapter(spec) == "hf" else {}
            model = load_model(spec, **overrides)
        light_key = key
        fingerprint = model.fingerprint
        key = run_key(fingerprint, bench, cfg.split, policy, settings)
        if key != light_key and (previous := finished()) is not None:
            return previous

    # Merge what earlier (possibly multi-process) runs left, then everyone reads the same state.
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / SCORES).unlink(missing_ok=True)  # no stale scores beside changing predictions
        _consolidate(out, key, order, say)
    dist.barrier()
    done = {str(r["question_id"]): r for r in _read_rows(out / PREDICTIONS) if r.get("key") == key}
    pending = [s for s in samples if s.id not in done]
    mine = pending[dist.rank :: dist.world]
    n_done = sum(qid in done for qid in ids)
    if n_done and dist.main:
        say(f"resuming: {n_done} of {len(samples)} questions already answered in {out / PREDICTIONS}")

    skipped: list[dict[str, str]] = []
    stopped = False
    if mine:
        target = out / (PREDICTIONS if dist.world == 1 else f"predictions.rank{dist.rank}.jsonl")
        bar = _progress(len(pending), cfg.progress if dist.main else False, f"eval {bench.name}")
        with JsonlAppender(target) as appender:
            for b, start in enumerate(range(0, len(mine), cfg.batch_size)):
                if stop_after_batches is not None and b >= stop_after_batches:
                    stopped = True
                    break
                batch = mine[start : start + cfg.batch_size]
                answers, bad = _generate_batch(model, policy, batch, settings, cfg.skip_bad)
                # the convention's own answer extraction (e.g. LLaVA-Med v1.0 cuts at "###")
                answers = [None if a is None else policy.postprocess(a) for a in answers]
                skipped += bad
                appender.write(
                    _row(s, a, policy, spec, key, fingerprint)
                    for s, a in zip(batch, answers)
                    if a is not None
                )
                bar.update(len(batch) * dist.world)
        bar.close()
    if stopped:
        return {}
    if dist.world > 1:  # rank 0 lists every rank's skipped images
        atomic_write_jsonl(out / f"skipped.rank{dist.rank}.jsonl", skipped)
    dist.barrier()

    scores: dict[str, Any] = {}
    if dist.main:
        rows = _consolidate(out, key, order, say)
        answered = [s for s in samples if s.id in rows]
        n_unanswered = len(samples) - len(answered)
        if not answered:
            raise BadInput("no question could be answered (every image failed to load)", path=root)
        result = score_samples(
            answered,
            {s.id: rows[s.id]["text"] for s in answered},
            scorers=scorers,
            seed=cfg.seed,
            n_boot=cfg.n_boot,
        )
        scored_rows = [{**r, "key": key} for r in result.rows]
        atomic_write_jsonl(out / SCORED, scored_rows)
        summary = result.to_json()
        scores = {
            "benchmark": bench.name,
            "benchmark_version": bench.version,
            "split": cfg.split,
            "closed_rule": bench.closed_rule(root),
            "prompt_policy": policy.name,
            "prompt_policy_config": policy.to_json(),
            "model": {"spec": spec, "fingerprint": fingerprint},
            "generation": settings.to_json(),
            "versions": library_versions(),
            "n": summary["n"],
            "n_open": summary["n_open"],
            "n_closed": summary["n_closed"],
            "n_skipped": n_skipped_records + n_unanswered,
            "limit": cfg.limit,
            "root": str(root),
            "key": key,
            # the questions asked (a rerun with images that still fail to decode is "already done")
            "questions_hash": ids_hash,
            "ci": summary["ci"],
            "scorers": summary["scorers"],
        }
        if hasattr(model, "describe"):
            scores["model"]["details"] = model.describe()
        for shard in sorted(out.glob("skipped.rank*.jsonl")):
            skipped += [] if shard.name == f"skipped.rank{dist.rank}.jsonl" else _read_rows(shard)
            shard.unlink()
        (out / "skipped.jsonl").unlink(missing_ok=True)
        if skipped:
            atomic_write_jsonl(out / "skipped.jsonl", sorted(skipped, key=lambda r: order.get(r["id"], 0)))
        atomic_write_json(out / SCORES, scores)
        say(_summary_line(scores, out, time.perf_counter() - started))
    dist.barrier()
    if not dist.main:
        scores = read_json(out / SCORES)
    return scores


def spec_adapter(spec: str) -> str:
    from medvqa.models import parse_model_spec

    return parse_model_spec(spec)[0]


def _is_complete(out: Path, key: str, ids: Sequence[str]) -> bool:
    """Whether every question already has a prediction of this key (then no model is needed)."""
    have: set[str] = set()
    for path in [out / PREDICTIONS, *sorted(out.glob("predictions.rank*.jsonl"))]:
        have.update(str(r.get("question_id")) for r in _read_rows(path) if r.get("key") == key)
    return all(qid in have for qid in ids)


def _generate_batch(
    model: Any, policy: Any, batch: Sequence[VQASample], settings: GenerationSettings, skip_bad: bool
) -> tuple[list[str | None], list[dict[str, str]]]:
    requests = [
        GenerationRequest(image=s.image, prompt=policy.render(s.question, s.prompt_answer_type), id=s.id)
        for s in batch
    ]
    try:
        return list(model.generate(requests, settings)), []
    except BadInput as exc:
        if not skip_bad or exc.field != "image":
            raise
    # one bad image in the batch: answer the others one by one, skip the bad ones (counted)
    answers: list[str | None] = []
    bad: list[dict[str, str]] = []
    for sample, request in zip(batch, requests):
        try:
            answers.append(model.generate([request], settings)[0])
        except BadInput as exc:
            if exc.field != "image":
                raise
            answers.append(None)
            bad.append({"id": sample.id, "error": str(exc)})
    return answers, bad


def _row(sample: VQASample, text: str, policy: Any, spec: str, key: str, fingerprint: str) -> dict[str, Any]:
    from medvqa.answer_files import answer_row

    return answer_row(
        sample,
        text,
        model_id=spec,
        prompt=policy.render_text(sample.question, sample.prompt_answer_type),
        metadata={"benchmark": sample.benchmark, "split": sample.split, "prompt_policy": policy.name},
        key=key,
        fingerprint=fingerprint,
    )


def remove_run(out: str | Path) -> None:
    """Delete a run folder's eval files (used by `--fresh`)."""
    out = Path(out)
    for name in (PREDICTIONS, SCORES, SCORED, "skipped.jsonl"):
        (out / name).unlink(missing_ok=True)
    for shard in [*out.glob("predictions.rank*.jsonl"), *out.glob("skipped.rank*.jsonl")]:
        shard.unlink()
    if (out / "stale").is_dir():
        shutil.rmtree(out / "stale")
