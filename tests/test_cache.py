"""The SQLite + JSONL response cache: keys carry the model identity, writes land as they arrive."""

from __future__ import annotations

import json
import multiprocessing
import sqlite3
import threading

import pytest
from medvqa.cache import ResponseCache, is_cacheable, request_key
from medvqa.errors import BadInput

GPT = {"model": "gpt-4o", "base_url": "https://api.openai.com/v1"}
LOCAL = {"model": "gpt-4o", "base_url": "http://127.0.0.1:8000/v1"}


def test_key_is_order_free_and_includes_model_identity() -> None:
    req = {"question": "Is there a fracture?", "answers": ["yes", "no"], "seed": 0}
    assert request_key(GPT, req) == request_key(dict(reversed(GPT.items())), dict(reversed(req.items())))
    assert request_key(GPT, req) != request_key(LOCAL, req)  # same name, another endpoint
    assert request_key(GPT, req) != request_key(GPT, {**req, "seed": 1})
    assert request_key(GPT, req) != request_key(GPT, {**req, "answers": ["no", "yes"]})
    assert len(request_key(GPT, req)) == 64
    with pytest.raises(ValueError, match="identity"):
        request_key({}, req)


def test_only_deterministic_or_seeded_requests_are_cacheable() -> None:
    assert is_cacheable({"temperature": 0.0})
    assert is_cacheable({"do_sample": False, "temperature": 0.7})  # greedy: temperature unused
    assert not is_cacheable({"temperature": 0.2})
    assert not is_cacheable({"do_sample": True, "temperature": 1.0, "seed": None})
    assert is_cacheable({"temperature": 0.2, "seed": 0})
    assert not is_cacheable({"temperature": 0.0, "n": 2})


def test_round_trip_persists_and_counts(tmp_path) -> None:
    path = tmp_path / "c" / "cache.sqlite"
    key = request_key(GPT, {"q": 1})
    with ResponseCache(path) as cache:
        assert cache.get(key) is None
        cache.put(key, "8 3\nreason", request={"q": 1})
        cache.put(request_key(GPT, {"q": 2}), {"structured": [1, 2]})
        assert cache.get(key) == "8 3\nreason"
        assert cache.stats() == {"hits": 1, "misses": 1, "writes": 2}
    with ResponseCache(path) as again:
        assert len(again) == 2 and key in again
        assert again.get(request_key(GPT, {"q": 2})) == {"structured": [1, 2]}
        assert again.items()[0] == (key, "8 3\nreason", {"q": 1})
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    log = [json.loads(line) for line in (tmp_path / "c" / "cache.sqlite.jsonl").read_text().splitlines()]
    assert [row["key"] for row in log] == [key, request_key(GPT, {"q": 2})]


def test_written_as_it_arrives_visible_to_another_connection(tmp_path) -> None:
    path = tmp_path / "cache.sqlite"
    cache = ResponseCache(path)
    cache.put("k1", "v1")
    # No close, no flush call: another reader (a later process after a crash) already sees it.
    reader = sqlite3.connect(path)
    assert reader.execute("SELECT response FROM responses WHERE key='k1'").fetchone() == ('"v1"',)
    reader.close()
    cache.close()


def test_thread_safe_writes(tmp_path) -> None:
    cache = ResponseCache(tmp_path / "cache.sqlite")

    def writer(t: int) -> None:
        for i in range(20):
            key = request_key(GPT, {"t": t, "i": i})
            cache.put(key, f"{t}-{i}")
            assert cache.get(key) == f"{t}-{i}"

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(cache) == 160 and cache.writes == 160
    cache.close()
    lines = (tmp_path / "cache.sqlite.jsonl").read_text().splitlines()
    assert len(lines) == 160 and all(json.loads(line)["key"] for line in lines)  # no interleaved lines


def _process_writer(path: str, worker: int) -> None:
    with ResponseCache(path) as cache:
        for i in range(25):
            cache.put(f"p{worker}-{i}", i)


def test_two_processes_share_one_cache(tmp_path) -> None:
    path = str(tmp_path / "cache.sqlite")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_process_writer, args=(path, w)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    with ResponseCache(path) as cache:
        assert len(cache) == 50


def test_log_replays_entries_missing_from_the_database(tmp_path) -> None:
    path = tmp_path / "cache.sqlite"
    with ResponseCache(path) as cache:
        cache.put("a", "reply a")
        cache.put("b", "reply b")
    # A crash between the log append and the SQLite write: the row is missing from the database.
    conn = sqlite3.connect(path)
    conn.execute("DELETE FROM responses WHERE key='b'")
    conn.commit()
    conn.close()
    # ... and a torn last log line from a kill mid-write.
    with open(tmp_path / "cache.sqlite.jsonl", "a") as fh:
        fh.write('{"key": "c", "respo')
    with ResponseCache(path) as cache:
        assert cache.get("b") == "reply b" and "c" not in cache and len(cache) == 2
        cache.put("d", "reply d")
    rows = (tmp_path / "cache.sqlite.jsonl").read_text().splitlines()
    assert [json.loads(r)["key"] for r in rows] == ["a", "b", "d"]


def test_not_a_cache_file_is_bad_input(tmp_path) -> None:
    bad = tmp_path / "cache.sqlite"
    bad.write_text("this is not a database, just text long enough to have a header" * 10)
    with pytest.raises(BadInput, match=r"cache\.sqlite.*not a usable response cache"):
        ResponseCache(bad, log=False)


def test_a_lone_surrogate_is_stored_not_lost(tmp_path) -> None:
    """A reply that was paid for is never lost to an encoding error: lone surrogates (legal JSON,
    not UTF-8) in the response or the request are stored as U+FFFD, in the database and the log."""
    path = tmp_path / "cache.sqlite"
    key = request_key(GPT, {"q": "x"})
    with ResponseCache(path) as cache:
        cache.put(key, "8 3\n\ud800 reason", request={"question": "q\udfff?"})
        assert cache.get(key) == "8 3\n\ufffd reason"
    log = (tmp_path / "cache.sqlite.jsonl").read_text(encoding="utf-8")
    assert "\\ufffd" in log or "\ufffd" in log
    with ResponseCache(path) as again:
        assert again.get(key) == "8 3\n\ufffd reason" and again.items()[0][2] == {"question": "q\ufffd?"}
