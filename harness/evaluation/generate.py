"""Step 2 of an eval: the model answers the plan's questions into `predictions.jsonl`.

Rows are appended and flushed per batch, so a killed run continues from the last flushed batch.
Under `accelerate launch` the remaining questions are sharded across ranks (rank r takes every
N-th), each rank appends to `predictions.rank<r>.jsonl`, and rank 0 merges them (in benchmark
order) before scoring: the same files as one process.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

from medvqa.distributed import Dist
from medvqa.errors import BadInput
from medvqa.evaluation.plan import EvalPlan
from medvqa.evaluation.runfiles import PREDICTIONS, read_predictions
from medvqa.io import JsonlAppender, atomic_write_jsonl, json_lines
from medvqa.types import GenerationRequest, GenerationSettings, VQASample

# Rows reach the OS after every batch (a kill -9 loses nothing flushed); fsync at most this often.
SYNC_INTERVAL_S = 5.0


@dataclass
class Generated:
    """What one rank's generation left: the images it skipped."""

    skipped: list[dict[str, str]] = field(default_factory=list)


def generate_predictions(
    plan: EvalPlan,
    model: Any,
    key: str,
    dist: Dist,
    *,
    batch_size: int,
    skip_bad: bool,
    progress: bool | None,
    log: Callable[[str], None],
) -> Generated:
    """Answer this rank's share of the questions that have no prediction of `key` yet.

    Expects `consolidate` to have merged earlier runs' files (every rank then reads one state).
    """
    out = plan.out
    done = {str(r["question_id"]) for r in read_predictions(out / PREDICTIONS) if r.get("key") == key}
    pending = [s for s in plan.samples if s.id not in done]
    mine = pending[dist.rank :: dist.world]
    n_done = sum(qid in done for qid in plan.ids)
    if n_done and dist.main and pending:
        log(f"resuming: {n_done} of {len(plan.samples)} questions already answered in {out / PREDICTIONS}")
    elif n_done and dist.main:
        log(f"all {n_done} questions already answered in {out / PREDICTIONS}: scoring them again")
    if dist.world > 1 and dist.main and pending:
        log(f"{len(pending)} questions sharded across {dist.world} processes")

    result = Generated()
    if mine:
        target = out / (PREDICTIONS if dist.world == 1 else f"predictions.rank{dist.rank}.jsonl")
        bar = _progress(len(pending), progress if dist.main else False, f"eval {plan.benchmark.name}")
        fingerprint = model.fingerprint
        policy = plan.generation_policy
        batches = [mine[start : start + batch_size] for start in range(0, len(mine), batch_size)]
        prompts: dict[tuple[str, str], str] = {}  # the answer rows' prompt texts (few distinct ones)

        def rows_text(index: int, answers: Sequence[str | None]) -> str:
            """Batch `index`'s answer rows as JSON lines; a None answer (a skipped image) has none.
            Built where the model's tokens are decoded (`_answer_stream`): in a worker process."""
            rows = []
            for sample, answer in zip(batches[index], answers):
                if answer is None:
                    continue
                # the convention's own answer extraction (e.g. LLaVA-Med v1.0 cuts at "###")
                answer = policy.postprocess(answer)
                shown = (sample.question, sample.prompt_answer_type)
                if shown not in prompts:
                    prompts[shown] = policy.render_text(*shown)
                rows.append(_row(sample, answer, prompts[shown], policy, plan.spec, key, fingerprint))
            return json_lines(rows)

        requests = ([_request(policy, s) for s in batch] for batch in batches)
        stream = _answer_stream(model, requests, plan.settings, rows_text)
        with JsonlAppender(target, sync_interval=SYNC_INTERVAL_S) as appender, closing(stream):
            for index, (batch, answered) in enumerate(zip(batches, stream)):
                if isinstance(answered, BadInput):
                    answers, bad = _settle_batch(model, answered, batch, policy, plan.settings, skip_bad)
                    result.skipped += bad
                    answered = rows_text(index, answers)
                appender.write_lines(answered)
                bar.update(len(batch) * dist.world)
        bar.close()
    if dist.world > 1:  # rank 0 lists every rank's skipped images
        atomic_write_jsonl(out / f"skipped.rank{dist.rank}.jsonl", result.skipped)
    return result


def _progress(total: int, enabled: bool | None, desc: str) -> Any:
    from tqdm import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="q", disable=not enabled, dynamic_ncols=True, leave=False)


def _request(policy: Any, sample: VQASample) -> GenerationRequest:
    return GenerationRequest(
        image=sample.image, prompt=policy.render(sample.question, sample.prompt_answer_type), id=sample.id
    )


def _answer_stream(
    model: Any,
    batches: Iterable[list[GenerationRequest]],
    settings: GenerationSettings,
    finish: Callable[[int, list[str]], str],
) -> Iterator[str | BadInput]:
    """`finish(i, answers)` (or the BadInput of a batch that failed) per batch: the adapter's
    `generate_many` where it has one (it prepares the next batch while generating, and finishes
    the last one in the same worker), else `generate` batch by batch."""
    many = getattr(model, "generate_many", None)
    if many is not None:
        yield from many(batches, settings, finish)
        return
    for index, batch in enumerate(batches):
        try:
            answers = list(model.generate(batch, settings))
        except BadInput as exc:
            yield exc
            continue
        yield finish(index, answers)


def _settle_batch(
    model: Any,
    answered: list[str] | BadInput,
    batch: Sequence[VQASample],
    policy: Any,
    settings: GenerationSettings,
    skip_bad: bool,
) -> tuple[list[str | None], list[dict[str, str]]]:
    """A batch's answers; with `--skip-bad` a batch with a bad image is answered one by one, the bad
    ones skipped (counted)."""
    if not isinstance(answered, BadInput):
        return list(answered), []
    if not skip_bad or answered.field != "image":
        raise answered
    answers: list[str | None] = []
    bad: list[dict[str, str]] = []
    for sample in batch:
        try:
            answers.append(model.generate([_request(policy, sample)], settings)[0])
        except BadInput as exc:
            if exc.field != "image":
                raise
            answers.append(None)
            bad.append({"stage": "generate", "id": sample.id, "error": str(exc)})
    return answers, bad


def _row(
    sample: VQASample, text: str, prompt: str, policy: Any, spec: str, key: str, fingerprint: str
) -> dict[str, Any]:
    from medvqa.answer_files import answer_row

    return answer_row(
        sample,
        text,
        model_id=spec,
        prompt=prompt,
        metadata={"benchmark": sample.benchmark, "split": sample.split, "prompt_policy": policy.name},
        key=key,
        fingerprint=fingerprint,
    )
