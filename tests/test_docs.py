"""The docs that name tests name tests that exist (docs/guarantees.md is a list of promises and proofs)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _named_tests(doc: str) -> list[tuple[str, str | None]]:
    """(`test_x.py`, test name or None) for every reference; a bare `::name` belongs to the last file."""
    refs, current = [], ""
    for m in re.finditer(r"`(test_[a-z0-9_]+\.py)?(?:::([a-z0-9_]+))?`", doc):
        current = m.group(1) or current
        if m.group(1) or m.group(2):
            refs.append((current, m.group(2)))
    return refs


def test_every_test_the_guarantees_page_names_exists() -> None:
    refs = _named_tests((ROOT / "docs" / "guarantees.md").read_text(encoding="utf-8"))
    assert len(refs) > 30
    missing = []
    for file, name in refs:
        path = ROOT / "tests" / file
        if not path.is_file() or (name and not re.search(rf"^def {name}\(", path.read_text(), re.M)):
            missing.append(f"{file}::{name}" if name else file)
    assert missing == []
