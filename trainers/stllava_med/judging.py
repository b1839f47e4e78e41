"""Stage 2, step 3: the expert scores all n answers of each question at once → `judged.jsonl`.

Row: the answers row + `scores: [s_1 … s_n]` (+ `category` when the expert knows the question's
category, e.g. the Phantom slot), or `skipped: reason`. The `openai` expert gets the n answers in
one request. Under several ranks each judges its share; an `openai` judge's SQLite cache is one
file for all ranks (SQLite locking), so no judgment is paid twice.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medvqa.distributed import Dist
from medvqa.errors import BadInput
from medvqa.trainers.stllava_med.stagefiles import iter_checked, read_rows, run_sharded

log = logging.getLogger("medvqa.train")


def build_expert(
    name: str,
    *,
    cache_path: str | Path | None = None,
    root: str = "",
    image_root: str = "",
    heldout_samples: Sequence[Any] = (),
    samples_file: str = "",
    seed: int = 0,
    options: Mapping[str, Any] | None = None,
) -> Any:
    """An expert from the registry, configured from the options that its config class has.

    `options` (`STLLaVAMedConfig.expert_options`, the `--expert-FIELD` flags: model, base_url,
    error_rate, ...) are fields of the expert's own config dataclass: checked against it by the one
    converter (an unknown field or a wrong type is BadInput); they win over the named arguments.
    """
    from medvqa.config import dataclass_from_mapping
    from medvqa.registry import experts

    cls = experts.get(name)
    config_cls = getattr(cls, "config_class", None)
    named = {
        "cache_path": str(cache_path) if cache_path else "",
        "root": root,
        "image_root": image_root or root,  # where an uploading judge may read images from
        "samples_file": samples_file,
        "seed": seed,
    }
    kwargs: dict[str, Any] = {}
    if getattr(cls, "wants_heldout_samples", False) and heldout_samples and not samples_file:
        kwargs["samples"] = list(heldout_samples)
    if config_cls is None:
        if options:
            raise BadInput(f"expert {name!r} has no settings; got {sorted(options)}")
        return cls(**kwargs)
    known = {f.name for f in dataclasses.fields(config_cls)}
    given = {k: v for k, v in named.items() if v and k in known}
    config = dataclass_from_mapping(
        config_cls, {**given, **(options or {})}, where=f"expert {name!r}", from_strings=True
    )
    return cls(config, **kwargs)


def _judge_chunk(expert: Any, chunk: list[dict[str, Any]]) -> list[tuple[Any, str, bool]]:
    items = [(r["image"], r["question"], list(r["answers"])) for r in chunk]
    if hasattr(expert, "judge_many_detailed"):
        results = expert.judge_many_detailed(items)
        return [(j.scores, j.skipped or "unjudgeable", j.status == "failed") for j in results]
    if hasattr(expert, "judge_many"):
        return [(s, "unjudgeable", False) for s in expert.judge_many(items)]
    return [(expert.judge(*it), "unjudgeable", False) for it in items]


def judge_answers(
    answers_path: Path,
    out_path: Path,
    expert: Any,
    *,
    chunk_size: int = 256,
    progress_log: Path | None = None,
    dist: Dist | None = None,
) -> dict[str, int]:
    """Score each question's answers with the expert → `judged.jsonl` (resumable; judged rows are kept)."""
    rows = iter_checked(answers_path, ("id", "image", "question", "answers"))
    category = getattr(expert, "category", None)
    failed = [0]

    def produce(chunk: list[Any]) -> list[dict[str, Any]]:
        out = [r for r in chunk if r.get("skipped")]
        todo = [r for r in chunk if not r.get("skipped")]
        for r, (scores, reason, fail) in zip(todo, _judge_chunk(expert, todo) if todo else [], strict=True):
            if fail:  # a request that failed after its retries is not an answer: a rerun asks again
                failed[0] += 1
                continue
            extra = {"category": category(r["question"])} if category is not None else {}
            if scores is None:
                out.append({**r, **extra, "skipped": reason})
            else:
                out.append({**r, **extra, "scores": [float(s) for s in scores]})
        order = {r["id"]: i for i, r in enumerate(chunk)}
        return sorted(out, key=lambda r: order[r["id"]])

    run_sharded(
        out_path,
        rows,
        produce,
        batch_size=chunk_size,
        dist=dist or Dist(),
        stage="judge",
        progress_log=progress_log,
    )
    if failed[0]:
        log.warning(
            "judge: %d requests failed after retries; rerun this step to ask for them again", failed[0]
        )
    return {**judge_counts(out_path), "failed": failed[0]}


def judge_counts(judged_path: Path) -> dict[str, int]:
    rows = read_rows(judged_path)
    return {
        "judged": sum("scores" in r for r in rows),
        "unjudgeable": sum("scores" not in r for r in rows),
    }
