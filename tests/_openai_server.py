"""A real OpenAI-compatible chat-completions server on 127.0.0.1 (pytest-httpserver, threaded),
with scripted faults, for the `openai:` adapter and the `openai` expert tests.

    server = FakeOpenAI(httpserver)
    server.reply = lambda body: "8 3"            # content of the next completions
    server.faults.append(Fault(status=429, headers={"retry-after-ms": "10"}))
    server.faults.append(Fault(sleep=0.5))        # answer late (the client times out)
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

FAKE_KEY = "sk-medvqa-TEST-9f3c1e7a5b2d4c6e8a0b1c3d5e7f9a1b"


@dataclass
class Fault:
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    message: str = "injected fault"
    sleep: float = 0.0


class FakeOpenAI:
    def __init__(self, server: HTTPServer):
        self.server = server
        self.bodies: list[dict[str, Any]] = []
        self.auth: list[str] = []
        self.faults: deque[Fault] = deque()
        # the content of a reply (None: `content: null`)
        self.reply: Callable[[dict[str, Any]], str | None] = lambda body: "yes"
        self.delay = 0.0
        # a server's capacity: at most this many requests are served at once, the rest queue
        # (None: unbounded), so throughput stops scaling with the client's concurrency there
        self.capacity: int | None = None
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        server.expect_request("/v1/chat/completions", method="POST").respond_with_handler(self.handle)

    @property
    def base_url(self) -> str:
        return self.server.url_for("/v1")

    @property
    def n_requests(self) -> int:
        return len(self.bodies)

    def handle(self, request: Request) -> Response:
        body = json.loads(request.get_data(as_text=True))
        with self._lock:
            self.bodies.append(body)
            self.auth.append(request.headers.get("Authorization", ""))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            fault = self.faults.popleft() if self.faults else None
        try:
            if fault is not None and fault.sleep:
                time.sleep(fault.sleep)
            elif fault is not None and fault.status is not None:
                payload = {"error": {"message": fault.message, "type": "test", "code": fault.status}}
                return Response(
                    json.dumps(payload),
                    status=fault.status,
                    headers=fault.headers,
                    content_type="application/json",
                )
            if self.delay:
                with self._slot():
                    time.sleep(self.delay)
            content = self.reply(body)
            return Response(
                json.dumps(completion(body, content)), status=200, content_type="application/json"
            )
        finally:
            with self._lock:
                self.in_flight -= 1

    def _slot(self) -> Any:
        import contextlib

        if self.capacity is None:
            return contextlib.nullcontext()
        with self._lock:
            if getattr(self, "_sem_size", None) != self.capacity:
                self._sem, self._sem_size = threading.BoundedSemaphore(self.capacity), self.capacity
        return self._sem


def completion(body: dict[str, Any], content: str | None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "test"),
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12},
    }


@pytest.fixture(scope="module")
def openai_server() -> Iterator[HTTPServer]:
    """One threaded loopback server per test module (stopping one takes up to 0.5 s)."""
    server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
    server.start()
    try:
        yield server
    finally:
        server.clear()
        server.stop()


@pytest.fixture
def fake_openai(openai_server: HTTPServer) -> Iterator[FakeOpenAI]:
    """A fresh script (handler, faults, request log) on the module's server."""
    openai_server.clear()
    fake = FakeOpenAI(openai_server)
    yield fake
    fake.faults.clear()
    fake.delay = 0.0
    fake.capacity = None


@pytest.fixture
def fake_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("MEDVQA_TEST_KEY", FAKE_KEY)
    return FAKE_KEY


def write_png(path, color=(200, 30, 30), size=(8, 8)) -> bytes:
    from PIL import Image

    Image.new("RGB", size, color).save(path, format="PNG")
    return path.read_bytes()


def files_containing(root, needle: str) -> list[str]:
    """Every file under `root` whose bytes contain `needle`."""
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and needle.encode() in p.read_bytes():
            hits.append(str(p))
    return hits
