"""The checkpoint folder: `save_pretrained` model + processor, and the `checkpoint.json` contract.

`checkpoint.json` is written atomically and last: its presence marks a finished checkpoint.
Only the main process writes (under a distributed launch every rank calls these).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medvqa.distributed import is_main_process
from medvqa.io import atomic_write_json, library_versions, read_json

CHECKPOINT_FILE = "checkpoint.json"


def policy_name(name: str) -> str:
    from medvqa.prompts import get_policy

    return get_policy(name or None).name


def save_model(model: Any, processor: Any, out_dir: Path) -> None:
    """`save_pretrained` of the model (or PEFT adapter) and its processor (main process only)."""
    if not is_main_process():
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def checkpoint_meta(
    *,
    trainer: str,
    request: Any,
    config: Any,
    n_labeled: int,
    n_pairs: int = 0,
    loss: str,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "trainer": trainer,
        "fraction": request.fraction,
        "seed": request.seed,
        "manifest_hash": request.manifest_hash,
        "n_labeled": n_labeled,
        "n_pairs": n_pairs,
        "base_model": request.base_model,
        "config": dataclasses.asdict(config),
        "versions": library_versions(),
        "loss": loss,
        **extra,
    }


def write_checkpoint(out_dir: Path, meta: Mapping[str, Any]) -> Path:
    """Write `checkpoint.json` atomically (its presence marks a finished checkpoint; main process only)."""
    path = Path(out_dir) / CHECKPOINT_FILE
    if not is_main_process():
        return path
    atomic_write_json(path, dict(meta))
    return path


def read_checkpoint(out_dir: Path) -> dict[str, Any] | None:
    path = Path(out_dir) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    return read_json(path)
