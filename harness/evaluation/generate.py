"""Step 2 of an eval: the model answers the plan's questions into `predictions.jsonl`.

Rows are appended and flushed per batch, so a killed run continues from the last flushed batch.
Under `accelerate launch` the remaining questions are sharded across ranks (rank r takes every
N-th), each rank appends to `predictions.rank<r>.jsonl`, and rank 0 merges them (in benchmark
order) before scoring: the same files as one process.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from medvqa.errors import BadInput
from medvqa.evaluation.plan import EvalPlan
from medvqa.evaluation.runfiles import PREDICTIONS, read_rows
from medvqa.io import JsonlAppender, atomic_write_jsonl
from medvqa.types import GenerationRequest, GenerationSettings, VQASample


class Dist:
    """Rank, world size, device and barriers of this launch (`medvqa.distributed` decides)."""

    def __init__(self) -> None:
        from medvqa import distributed

        self.state: Any = distributed.state()
        self.rank = distributed.rank()
        self.world = int(self.state.num_processes) if self.state is not None else 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> str | None:
        return str(self.state.device) if self.state is not None else None

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()


@dataclass
class Generated:
    """What one rank's generation left: the images it skipped, and whether it stopped early."""

    skipped: list[dict[str, str]] = field(default_factory=list)
    stopped: bool = False


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
    stop_after_batches: int | None = None,
) -> Generated:
    """Answer this rank's share of the questions that have no prediction of `key` yet.

    Expects `consolidate` to have merged earlier runs' files (every rank then reads one state).
    `stop_after_batches` stops after that many batches (tests simulate a kill with it).
    """
    out = plan.out
    done = {str(r["question_id"]) for r in read_rows(out / PREDICTIONS) if r.get("key") == key}
    pending = [s for s in plan.samples if s.id not in done]
    mine = pending[dist.rank :: dist.world]
    n_done = sum(qid in done for qid in plan.ids)
    if n_done and dist.main:
        log(f"resuming: {n_done} of {len(plan.samples)} questions already answered in {out / PREDICTIONS}")

    result = Generated()
    if mine:
        target = out / (PREDICTIONS if dist.world == 1 else f"predictions.rank{dist.rank}.jsonl")
        bar = _progress(len(pending), progress if dist.main else False, f"eval {plan.benchmark.name}")
        fingerprint = model.fingerprint
        policy = plan.generation_policy
        with JsonlAppender(target) as appender:
            for b, start in enumerate(range(0, len(mine), batch_size)):
                if stop_after_batches is not None and b >= stop_after_batches:
                    result.stopped = True
                    break
                batch = mine[start : start + batch_size]
                answers, bad = _generate_batch(model, policy, batch, plan.settings, skip_bad)
                # the convention's own answer extraction (e.g. LLaVA-Med v1.0 cuts at "###")
                answers = [None if a is None else policy.postprocess(a) for a in answers]
                result.skipped += bad
                appender.write(
                    _row(s, a, policy, plan.spec, key, fingerprint)
                    for s, a in zip(batch, answers)
                    if a is not None
                )
                bar.update(len(batch) * dist.world)
        bar.close()
    if not result.stopped and dist.world > 1:  # rank 0 lists every rank's skipped images
        atomic_write_jsonl(out / f"skipped.rank{dist.rank}.jsonl", result.skipped)
    return result


def _progress(total: int, enabled: bool | None, desc: str) -> Any:
    from tqdm import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="q", disable=not enabled, dynamic_ncols=True, leave=False)


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
            bad.append({"stage": "generate", "id": sample.id, "error": str(exc)})
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
