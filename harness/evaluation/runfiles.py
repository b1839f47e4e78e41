"""The files of an eval run folder and the few operations on them that every step shares.

`predictions.jsonl` rows carry the run `key`; rows of another key are moved aside to `stale/`,
so a new checkpoint never gets an old checkpoint's answers. Rank shards
(`predictions.rank<r>.jsonl`, `skipped.rank<r>.jsonl`) exist only while a multi-process run works.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from medvqa.errors import BadInput
from medvqa.io import atomic_write_jsonl, iter_jsonl

PREDICTIONS = "predictions.jsonl"
SCORES = "scores.json"
SCORED = "scored.jsonl"
SKIPPED = "skipped.jsonl"


def read_predictions(path: Path) -> list[dict[str, Any]]:
    """The rows of a predictions file; a row that is not a prediction (a hand edit, another tool)
    is a BadInput naming file, line and field, never a traceback at scoring time."""
    if not path.is_file():
        return []
    rows = []
    for lineno, row in iter_jsonl(path, allow_truncated_tail=True):
        if not isinstance(row, dict):
            raise BadInput(
                f"a prediction row must be a JSON object, got {type(row).__name__}",
                path=path,
                record=f"line {lineno}",
            )
        qid = row.get("question_id")
        if not isinstance(qid, str | int) or isinstance(qid, bool):
            raise BadInput(
                "question_id must be a string or an integer",
                path=path,
                record=f"line {lineno}",
                field="question_id",
            )
        if not isinstance(row.get("text"), str):
            raise BadInput("the answer must be a string", path=path, record=f"line {lineno}", field="text")
        rows.append(row)
    return rows


def prediction_shards(out: Path) -> list[Path]:
    return sorted(out.glob("predictions.rank*.jsonl"))


def consolidate(out: Path, key: str, order: dict[str, int], log: Callable[[str], None]) -> dict[str, dict]:
    """Merge predictions.jsonl and rank shards into predictions.jsonl (rows of `key`, benchmark order).

    Rows of another key are moved aside to `stale/`; questions not in this run are kept at the end.
    Returns {question_id: row} for this key.
    """
    main = out / PREDICTIONS
    shards = prediction_shards(out)
    rows = read_predictions(main)
    for shard in shards:
        rows += read_predictions(shard)
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


def answered_ids(out: Path, key: str) -> set[str]:
    """The questions that already have a prediction of `key` (in predictions.jsonl or rank shards)."""
    have: set[str] = set()
    for path in [out / PREDICTIONS, *prediction_shards(out)]:
        have.update(str(r.get("question_id")) for r in read_predictions(path) if r.get("key") == key)
    return have


def is_complete(out: Path, key: str, ids: Sequence[str]) -> bool:
    """Whether every question already has a prediction of this key (then no model is needed)."""
    have = answered_ids(out, key)
    return all(qid in have for qid in ids)


def remove_run(out: str | Path) -> None:
    """Delete a run folder's eval files (used by `--fresh`)."""
    out = Path(out)
    for name in (PREDICTIONS, SCORES, SCORED, SKIPPED):
        (out / name).unlink(missing_ok=True)
    for shard in [*prediction_shards(out), *out.glob("skipped.rank*.jsonl")]:
        shard.unlink()
    if (out / "stale").is_dir():
        shutil.rmtree(out / "stale")
