"""The project's file helpers: atomic writes keep the umask's mode (issue 11, item 14)."""

from __future__ import annotations

import os
import stat

import pytest
from medvqa.io import atomic_write_json, atomic_write_jsonl, atomic_write_text, current_umask


@pytest.fixture
def umask():
    """Set a umask for one test and restore the old one."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize(("mask", "mode"), [(0o002, 0o664), (0o022, 0o644), (0o077, 0o600)])
def test_atomic_writes_respect_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    assert current_umask() == mask
    atomic_write_text(tmp_path / "a.txt", "x")
    atomic_write_json(tmp_path / "sub" / "b.json", {"a": 1})
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what open() gives: the reference
    for p in (tmp_path / "a.txt", tmp_path / "sub" / "b.json"):
        assert stat.S_IMODE(p.stat().st_mode) == mode == stat.S_IMODE(plain.stat().st_mode)


def test_a_rewrite_keeps_the_content_whole_and_leaves_no_temp_file(tmp_path, umask):
    umask(0o002)
    p = tmp_path / "r.txt"
    atomic_write_text(p, "old")
    atomic_write_text(p, "new")
    assert p.read_text() == "new" and sorted(x.name for x in tmp_path.iterdir()) == ["r.txt"]
    assert stat.S_IMODE(p.stat().st_mode) == 0o664


def test_a_lone_surrogate_is_stored_and_read_back_exactly(tmp_path):
    """JSON allows "\\ud800" (a lone UTF-16 surrogate) in a string; a UTF-8 file cannot hold it raw."""
    from medvqa.io import JsonlAppender, read_json, read_jsonl

    row = {"text": "yes\ud800no", "other": "é"}
    atomic_write_jsonl(tmp_path / "a.jsonl", [row, {"text": "plain é"}])
    atomic_write_json(tmp_path / "b.json", row)
    with JsonlAppender(tmp_path / "c.jsonl") as app:
        app.write([row])
    assert read_jsonl(tmp_path / "a.jsonl") == [row, {"text": "plain é"}]
    assert read_json(tmp_path / "b.json") == row and read_jsonl(tmp_path / "c.jsonl") == [row]
    assert "plain é" in (tmp_path / "a.jsonl").read_text(encoding="utf-8")  # readable UTF-8 where it can be


def test_read_rows_is_the_one_reader_of_appended_files(tmp_path):
    """Predictions, stage files and skip lists are read by `medvqa.io.read_rows`: no file yet is no
    rows, a torn tail (kill -9 mid-write) is dropped, anything else wrong names file and line."""
    from medvqa.errors import BadInput
    from medvqa.io import read_rows

    path = tmp_path / "rows.jsonl"
    assert read_rows(path) == []
    with pytest.raises(BadInput, match="file not found"):
        read_rows(path, missing_ok=False)
    path.write_text('{"id": 1, "x": 2}\n{"id": 2}\n{"id": 3, "x"')
    assert read_rows(path) == [{"id": 1, "x": 2}, {"id": 2}]
    with pytest.raises(BadInput, match="missing field") as err:
        read_rows(path, ("id", "x"))
    assert "line 2" in str(err.value) and "rows.jsonl" in str(err.value)
    path.write_text('{"id": 1}\n[1, 2]\n')
    with pytest.raises(BadInput, match="expected a JSON object") as err:
        read_rows(path)
    assert "line 2" in str(err.value)
