"""Stage files: seeds, rows read back (checked, de-duplicated by id), locks, and rank sharding.

Every stage-2 step appends rows to one JSONL file and resumes by skipping ids already there. Under
`accelerate launch` each rank takes every N-th pending item and appends to its own shard
(`questions.rank<r>.jsonl`); rank 0 then merges the shards into the stage file in the canonical
order (the order one process would have written), so 1 and N processes leave the same bytes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from medvqa.distributed import Dist
from medvqa.types import stable_hash

log = logging.getLogger("medvqa.train")


def seed_for(*parts: Any) -> int:
    """A sampling seed from names (never from paths or batch positions): same parts, same seed."""
    return int(stable_hash(list(parts), 8), 16) % (2**31 - 1)


def image_key(image: str) -> str:
    return Path(image).stem


def progress(log_path: Path | None, stage: str, done: int, total: int) -> None:
    """A `train_log.jsonl` row for the sweep's heartbeat (stage, step, max_steps)."""
    if log_path is None:
        return
    from medvqa.io import JsonlAppender

    with JsonlAppender(log_path) as out:
        out.write([{"stage": stage, "step": done, "max_steps": total}])


def iter_checked(path: Path, keys: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The rows of a stage file, each a JSON object with `keys`; a repeated id is kept once (the first).

    (Two processes that wrote one file, or a hand-merged file, must not double a pair or a count.)
    """
    from medvqa.io import read_rows as read_objects

    out, seen = [], set()
    for row in read_objects(path, keys, missing_ok=False):
        if "id" in row:
            rid = str(row["id"])
            if rid in seen:
                continue
            seen.add(rid)
        out.append(row)
    return out


def read_rows(path: Path) -> list[dict[str, Any]]:
    return iter_checked(path) if path.is_file() else []


# --- ranks -----------------------------------------------------------------------------------


def shard_path(path: Path, rank: int) -> Path:
    return path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def _shards(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.stem}.rank*{path.suffix}"))


def done_ids(path: Path) -> set[str]:
    """Ids already written to the stage file or to any rank's shard of it."""
    ids: set[str] = set()
    for p in [path, *_shards(path)]:
        if p.is_file():
            ids.update(str(r["id"]) for r in read_rows(p) if "id" in r)
    return ids


def consolidate(path: Path, order: Sequence[str]) -> list[dict[str, Any]]:
    """Merge the shards into `path`, rows in `order` of their ids (unknown ids last); main rank only."""
    from medvqa.io import atomic_write_jsonl

    shards = _shards(path)
    rows: list[dict[str, Any]] = []
    for p in [path, *shards]:
        rows += read_rows(p)
    index = {rid: i for i, rid in enumerate(order)}
    merged: dict[str, dict[str, Any]] = {}
    for r in rows:
        merged.setdefault(str(r.get("id")), r)  # the first occurrence wins
    ordered = sorted(merged.values(), key=lambda r: index.get(str(r.get("id")), len(index)))
    on_disk = read_rows(path)
    torn = path.is_file() and not path.read_bytes().endswith(b"\n")
    if (shards or ordered != on_disk or torn) and (ordered or path.is_file()):
        atomic_write_jsonl(path, ordered)
    for p in shards:
        p.unlink(missing_ok=True)
    return ordered


@contextlib.contextmanager
def locked(path: Path, dist: Dist) -> Iterator[Path]:
    """Hold the stage's output lock(s): a second process on the same file fails at once (BadInput).

    Rank 0 locks the stage file itself; each rank also locks the shard it appends to.
    """
    from medvqa.io import output_lock

    with contextlib.ExitStack() as stack:
        if dist.main:
            stack.enter_context(output_lock(path))
        target = path if dist.world == 1 else shard_path(path, dist.rank)
        if target != path:
            stack.enter_context(output_lock(target))
        yield target


def run_sharded(
    path: Path,
    items: Sequence[Mapping[str, Any]],
    produce: Callable[[list[Mapping[str, Any]]], list[dict[str, Any]]],
    *,
    batch_size: int,
    dist: Dist,
    stage: str,
    progress_log: Path | None = None,
) -> list[dict[str, Any]]:
    """Produce rows for the items (`id` each) not yet in `path`, this rank's share, then merge.

    Returns the stage file's rows (every rank, after the merge).
    """
    from medvqa.io import JsonlAppender

    done = done_ids(path)
    pending = [it for it in items if str(it["id"]) not in done]
    mine = pending[dist.rank :: dist.world]
    log.info("%s: %d items, %d to do (%d done), %d on rank %d", stage, len(items), len(pending),
             len(items) - len(pending), len(mine), dist.rank)  # fmt: skip
    bs = max(1, batch_size)
    with locked(path, dist) as target, JsonlAppender(target) as out:
        for start in range(0, len(mine), bs):
            out.write(produce(list(mine[start : start + bs])))
            if dist.main:
                n = min(len(pending), (start + bs) * dist.world)
                progress(progress_log, stage, len(items) - len(pending) + n, len(items))
    dist.barrier()
    if dist.main:
        consolidate(path, [str(it["id"]) for it in items])
    dist.barrier()
    return read_rows(path)
