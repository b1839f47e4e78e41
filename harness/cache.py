"""An on-disk response cache in the lmms-eval style: SQLite for lookup plus an append-only JSONL log.

- The key is a fingerprint of the request **and of the model's identity** (`request_key(identity,
  request)`: model name + endpoint, instruction version, image hash, prompt, sampling settings...),
  so one model's answers are never served to another.
- Only deterministic requests are cached — greedy/temperature 0, or a request whose key includes
  the sampling seed (`is_cacheable`). Callers check this before `get`/`put`.
- Each response is written as it arrives: appended (and fsynced) to `<path>.jsonl`, then upserted
  into the SQLite file (WAL mode, one transaction per write). A crash loses at most the response in
  flight; on open, log entries missing from the database (a crash between the two writes) are
  replayed. Safe under threads (one connection behind a lock) and across processes (SQLite locking,
  `busy_timeout`).
- Values are JSON (the raw reply text, usually), never secrets: callers put no API key in a request.

    cache = ResponseCache("judge-cache.sqlite")
    key = request_key({"model": "gpt-4o", "base_url": url}, {"question": q, "seed": 0, ...})
    reply = cache.get(key)
    if reply is None:
        reply = call_the_model(...)
        cache.put(key, reply, request={...})
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medvqa.errors import BadInput
from medvqa.io import JsonlAppender, iter_jsonl
from medvqa.types import stable_hash

SCHEMA_VERSION = 1


def request_key(identity: Mapping[str, Any], request: Mapping[str, Any]) -> str:
    """sha256 of (schema version, model identity, request), independent of dict order."""
    if not identity:
        raise ValueError("a cache key needs the model's identity (model name, endpoint, ...)")
    return stable_hash({"v": SCHEMA_VERSION, "model": dict(identity), "request": dict(request)}, length=64)


def is_cacheable(params: Mapping[str, Any]) -> bool:
    """Whether a request with these sampling parameters may be cached.

    Deterministic requests (no sampling: `do_sample` false or temperature 0, one completion) are;
    so are sampled ones whose key carries an explicit `seed` (the same seed asks for the same draw).
    """
    if int(params.get("n", 1) or 1) > 1 or int(params.get("best_of", 1) or 1) > 1:
        return False
    if "do_sample" in params:  # transformers semantics: greedy whatever the temperature
        sampling = bool(params["do_sample"])
    else:  # OpenAI semantics: temperature > 0 samples
        sampling = float(params.get("temperature", 0.0) or 0.0) > 0.0
    return not sampling or params.get("seed") is not None


def _storable(value: Any) -> Any:
    """`value` with every string made UTF-8-encodable (JSON allows lone surrogates; files do not)."""
    from medvqa.openai_support import safe_text

    if isinstance(value, str):
        return safe_text(value)
    if isinstance(value, Mapping):
        return {safe_text(str(k)): _storable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_storable(v) for v in value]
    return value


class ResponseCache:
    """SQLite (WAL) + JSONL-log response cache; `get`/`put` by key, thread- and process-safe."""

    def __init__(self, path: str | os.PathLike[str], *, log: bool = True):
        self.path = Path(path)
        self.log_path = self.path.with_name(self.path.name + ".jsonl") if log else None
        self.hits = 0
        self.misses = 0
        self.writes = 0
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, timeout=30.0
            )
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA busy_timeout=30000")
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS responses ("
                " key TEXT PRIMARY KEY, response TEXT NOT NULL, request TEXT, created REAL NOT NULL)"
            )
            self._conn.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT)")
            self._conn.execute(
                "INSERT OR IGNORE INTO meta(name, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
        except sqlite3.DatabaseError as exc:
            raise BadInput(f"not a usable response cache (SQLite: {exc})", path=self.path) from None
        self._log: JsonlAppender | None = None
        if self.log_path is not None:
            self._replay_log()
            self._log = JsonlAppender(self.log_path)

    def __repr__(self) -> str:
        return f"ResponseCache({str(self.path)!r}, entries={len(self)})"

    # -- reading ----------------------------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        """The cached response for `key` (JSON-decoded), else `default`; counts hits and misses."""
        with self._lock:
            row = self._conn.execute("SELECT response FROM responses WHERE key = ?", (key,)).fetchone()
            if row is None:
                self.misses += 1
                return default
            self.hits += 1
        return json.loads(row[0])

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return self._conn.execute("SELECT 1 FROM responses WHERE key = ?", (key,)).fetchone() is not None

    def __len__(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    def items(self) -> list[tuple[str, Any, Any]]:
        """All (key, response, request) rows, oldest first (for inspection and export)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT key, response, request FROM responses ORDER BY created"
            ).fetchall()
        return [(k, json.loads(r), json.loads(q) if q else None) for k, r, q in rows]

    # -- writing ----------------------------------------------------------------------------------

    def put(self, key: str, response: Any, *, request: Mapping[str, Any] | None = None) -> None:
        """Store `response` under `key` now: log append + fsync, then one SQLite transaction.

        Texts are stored safely whatever the server sent (a lone surrogate becomes U+FFFD), so a
        reply that was paid for is never lost to an encoding error.
        """
        response, request = _storable(response), _storable(request)
        blob = json.dumps(response, ensure_ascii=False)
        req = json.dumps(dict(request), ensure_ascii=False, sort_keys=True, default=str) if request else None
        now = time.time()
        with self._lock:
            if self._log is not None:
                self._log.write(
                    [{"key": key, "response": response, "request": dict(request or {}), "t": now}]
                )
            self._upsert(key, blob, req, now)
            self.writes += 1

    def _upsert(self, key: str, blob: str, req: str | None, created: float) -> None:
        self._conn.execute(
            "INSERT OR REPLACE INTO responses(key, response, request, created) VALUES (?, ?, ?, ?)",
            (key, blob, req, created),
        )

    def _replay_log(self) -> None:
        """Copy log entries that never reached the database (a crash between the two writes)."""
        assert self.log_path is not None
        if not self.log_path.exists():
            return
        have = {k for (k,) in self._conn.execute("SELECT key FROM responses")}
        for _, row in iter_jsonl(self.log_path, allow_truncated_tail=True):
            if not isinstance(row, dict) or "key" not in row or row["key"] in have:
                continue
            request = row.get("request") or None
            self._upsert(
                row["key"],
                json.dumps(row.get("response"), ensure_ascii=False),
                json.dumps(request, ensure_ascii=False, sort_keys=True) if request else None,
                float(row.get("t", time.time())),
            )
            have.add(row["key"])

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "writes": self.writes}

    def close(self) -> None:
        with self._lock:
            if self._log is not None:
                self._log.close()
                self._log = None
            self._conn.close()

    def __enter__(self) -> ResponseCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
