"""What the `openai:` model adapter and the `openai` expert share: one chat client for any
OpenAI-compatible endpoint (GPT-4o, or a local vLLM / SGLang server).

- The API key is read from the environment (`OPENAI_API_KEY`, or the variable the user names) and
  kept out of every log line, file, exception message and repr: `redact` scrubs it from anything
  the server echoes back, reply texts included (`safe_text` also replaces lone surrogates there).
- Images go out as base64 data URLs (PNG/JPEG/WEBP/GIF as they are; other formats re-encoded to PNG).
- Retries: exponential backoff with jitter on 408/409/429/5xx, timeouts and connection errors,
  honouring `Retry-After` / `retry-after-ms`. The `openai` package retries the same statuses, but its
  delays are module constants (0.5 s doubling to 8 s) and it does not report how often it retried;
  we disable it (`max_retries=0`) and run the loop here, so delays are configurable and counted.
- 401/403 (the key) and 404 (unknown model or wrong URL) are a `BadInput` naming the model and the
  base URL (never the key): the CLI prints one line and exits 2.
- Bounded concurrency: `map_bounded` runs requests on a thread pool of `max_concurrency` workers;
  one `openai.OpenAI` client (thread-safe) is shared by all of them.

The `openai` import is deferred to the first request, so importing this module is cheap.
"""

from __future__ import annotations

import base64
import logging
import math
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from medvqa.errors import BadInput, EndpointError

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"
# What vLLM / SGLang accept when they were started without --api-key.
PLACEHOLDER_KEY = "EMPTY"
RETRYABLE_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))
MAX_RETRY_AFTER = 120.0  # seconds: a server asking for longer is treated as a failure

T = TypeVar("T")
R = TypeVar("R")


# --------------------------------------------------------------------------------------------------
# Secrets


_KEYLIKE = re.compile(r"\b(sk)-[A-Za-z0-9_\-*.]{6,}")


def redact(text: object, secret: str | None = None) -> str:
    """`text` with `secret` (and anything shaped like an API key, e.g. `sk-...`) replaced by `***`."""
    out = str(text)
    if secret and secret != PLACEHOLDER_KEY and len(secret) >= 4:
        out = out.replace(secret, "***")
    return _KEYLIKE.sub(lambda m: m.group(1) + "-***", out)


class Secret:
    """Holds a key; its repr/str are `***`, so `vars()`, logs or tracebacks of an owner never show it."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("a Secret is not picklable (keys are read from the environment, never stored)")


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def safe_text(text: str) -> str:
    """`text` with lone UTF-16 surrogates (legal in JSON as `\\ud800`, not encodable as UTF-8)
    replaced by U+FFFD, so a reply can always be cached, written and scored."""
    return _LONE_SURROGATE.sub("\ufffd", text)


def normalize_base_url(base_url: str | None) -> str:
    """The endpoint's base URL without a trailing slash (`None` → the OpenAI API)."""
    url = (base_url or DEFAULT_BASE_URL).strip().rstrip("/")
    if not re.match(r"^https?://[^/\s]+", url):
        raise BadInput(f"base URL {base_url!r} is not an http(s) URL (e.g. http://127.0.0.1:8000/v1)")
    return url


def read_api_key(api_key_env: str, base_url: str | None) -> str:
    """The key from the environment variable `api_key_env`.

    A missing key is an error for the OpenAI API; for any other base URL (a local vLLM/SGLang
    server usually runs without a key) the placeholder `EMPTY` is sent instead, and a server that
    does want a key answers 401, which becomes a clear error.
    """
    if not api_key_env or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", api_key_env):
        raise BadInput(f"api_key_env {api_key_env!r} is not an environment variable name")
    key = os.environ.get(api_key_env, "").strip()
    if key:
        return key
    if base_url is None or normalize_base_url(base_url) == DEFAULT_BASE_URL:
        raise BadInput(
            f"environment variable {api_key_env} is not set: export your API key there "
            f"(or name another variable with api_key_env=NAME)"
        )
    log.info("%s is not set; sending a placeholder key to %s", api_key_env, normalize_base_url(base_url))
    return PLACEHOLDER_KEY


# --------------------------------------------------------------------------------------------------
# Images


_MIME_BY_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


def read_image_bytes(image: str | os.PathLike[str] | bytes) -> bytes:
    """The encoded bytes of an image given as a path or as bytes (a missing file is BadInput)."""
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    path = Path(image)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise BadInput("image file not found", path=path, field="image") from None
    except IsADirectoryError:
        raise BadInput("is a folder, expected an image file", path=path, field="image") from None


def image_mime(data: bytes) -> str | None:
    """MIME type of PNG/JPEG/GIF/WEBP bytes (the formats the OpenAI API takes), else None."""
    for magic, mime in _MIME_BY_MAGIC:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def image_data_url(image: str | os.PathLike[str] | bytes) -> str:
    """`data:image/...;base64,...` for an image path or bytes; other formats (BMP, TIFF...) → PNG.

    The image is checked with PIL first (`verify`, cheap: no full decode), so a corrupt file is a
    BadInput here rather than an HTTP 400 from the server.
    """
    import io

    from PIL import Image, UnidentifiedImageError

    data = read_image_bytes(image)
    mime = image_mime(data)
    where = image if not isinstance(image, bytes | bytearray | memoryview) else None
    try:
        with Image.open(io.BytesIO(data)) as img:
            if mime is not None:
                img.verify()
            else:
                img.load()
                buf = io.BytesIO()
                img.convert("RGBA" if "A" in img.getbands() else "RGB").save(buf, format="PNG")
                data, mime = buf.getvalue(), "image/png"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise BadInput(
            f"image cannot be decoded ({exc.__class__.__name__})", path=where, field="image"
        ) from None
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


# --------------------------------------------------------------------------------------------------
# Errors


def _status_of(exc: BaseException) -> int | None:
    return getattr(exc, "status_code", None)


def _server_message(exc: BaseException) -> str:
    """The `error.message` of an OpenAI-style error body, else a short status text."""
    body = getattr(exc, "body", None)
    if isinstance(body, Mapping):
        err = body.get("error", body)
        if isinstance(err, Mapping) and err.get("message"):
            return str(err["message"])[:300]
        if isinstance(err, str):
            return err[:300]
        if body.get("message"):
            return str(body["message"])[:300]
        if body.get("detail"):
            return str(body["detail"])[:300]
    response = getattr(exc, "response", None)
    text = getattr(response, "text", "") if response is not None else ""
    return (text or exc.__class__.__name__)[:300]


def parse_retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds to wait from `retry-after-ms` or `retry-after` (seconds or an HTTP date), else None."""
    import email.utils

    if not headers:
        return None
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / divisor
        except ValueError:
            if name == "retry-after":
                parsed = email.utils.parsedate_tz(value)
                if parsed is not None:
                    return max(0.0, float(email.utils.mktime_tz(parsed) - time.time()))
            continue
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    return None


# --------------------------------------------------------------------------------------------------
# The client


@dataclass
class ClientStats:
    """Counters of one client (thread-safe increments through `ChatClient`)."""

    requests: int = 0  # HTTP attempts sent (retries included)
    completed: int = 0  # requests that returned a completion
    retries: int = 0
    failed: int = 0  # requests given up on (EndpointError)
    no_content: int = 0  # replies whose message had no text (content: null), among `failed`
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def to_json(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class ChatClient:
    """A thread-safe chat-completions client for one model on one OpenAI-compatible endpoint.

    `complete(messages, **params)` returns the reply text, retrying transient failures with
    exponential backoff and jitter (`backoff_initial` · 2^attempt, capped at `backoff_max`, each
    reduced by up to 25 %), or waiting what `Retry-After` says (up to 120 s).
    """

    model: str
    base_url: str | None = None
    api_key_env: str = DEFAULT_API_KEY_ENV
    timeout: float = 60.0
    max_retries: int = 5
    backoff_initial: float = 1.0
    backoff_max: float = 30.0
    max_concurrency: int = 8
    stats: ClientStats = field(default_factory=ClientStats, init=False)

    def __post_init__(self) -> None:
        if not self.model or not str(self.model).strip():
            raise BadInput("the model name is empty (e.g. openai:gpt-4o or openai:MODEL@http://HOST:PORT/v1)")
        self.base_url = normalize_base_url(self.base_url)
        for name in ("timeout", "backoff_initial", "backoff_max"):
            if not float(getattr(self, name)) >= 0:
                raise BadInput(f"{name} must be a number >= 0, got {getattr(self, name)!r}")
        if int(self.max_retries) < 0:
            raise BadInput(f"max_retries must be >= 0, got {self.max_retries!r}")
        if int(self.max_concurrency) < 1:
            raise BadInput(f"max_concurrency must be >= 1, got {self.max_concurrency!r}")
        # Read (and check) the key now, so a missing key fails before any work; the client holds it.
        self._secret = Secret(read_api_key(self.api_key_env, self.base_url))
        self._client: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # never the key
        return (
            f"ChatClient(model={self.model!r}, base_url={self.base_url!r}, api_key_env={self.api_key_env!r}, "
            f"max_concurrency={self.max_concurrency})"
        )

    @property
    def identity(self) -> dict[str, str]:
        """What names the model behind this client (for fingerprints and cache keys): never the key."""
        return {"model": self.model, "base_url": str(self.base_url)}

    def _get_client(self) -> Any:
        with self._lock:
            if self._client is None:
                import openai

                self._client = openai.OpenAI(
                    api_key=self._secret.reveal(),
                    base_url=self.base_url,
                    max_retries=0,  # our loop retries (configurable delays, counted)
                    timeout=openai.Timeout(self.timeout, connect=min(self.timeout, 10.0)),
                )
            return self._client

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self.stats, name, getattr(self.stats, name) + delta)

    def _where(self) -> str:
        return f"model {self.model!r} at {self.base_url}"

    def _backoff(self, attempt: int, headers: Mapping[str, str] | None) -> float:
        retry_after = parse_retry_after(headers)
        if retry_after is not None:
            return retry_after
        delay = min(self.backoff_initial * (2.0**attempt), self.backoff_max)
        return delay * (1.0 - 0.25 * random.random())

    def _reply_text(self, response: Any) -> str:
        """The first choice's text, made safe to store: no lone surrogates, no key echoed back.

        A choice without text (`content: null`: a refusal, a content filter, a reasoning model
        that spent its budget thinking) is not an empty answer: it fails, counted as `no_content`.
        """
        choices = getattr(response, "choices", None)
        choice = choices[0] if isinstance(choices, list) and choices else None
        message = getattr(choice, "message", None)
        if message is None:
            self._count(failed=1)
            raise EndpointError(
                f"{self._where()}: the reply is not a chat completion (no choices[0].message)"
            )
        content = getattr(message, "content", None)
        if not isinstance(content, str):
            self._count(failed=1, no_content=1)
            why = f"finish_reason={getattr(choice, 'finish_reason', None)!r}"
            refusal = getattr(message, "refusal", None)
            if refusal:
                why += f", refusal={safe_text(str(refusal))[:120]!r}"
            raise EndpointError(
                f"{self._where()} replied with no content ({redact(why, self._secret.reveal())}); "
                f"not recorded as an answer (a larger max_new_tokens helps reasoning models)"
            )
        self._count(completed=1)
        return redact(safe_text(content), self._secret.reveal())

    def complete(self, messages: Sequence[Mapping[str, Any]], **params: Any) -> str:
        """The text of the first choice for `messages` (`params`: temperature, top_p, max_tokens, seed...)."""
        import openai

        client = self._get_client()
        attempt = 0
        while True:
            self._count(requests=1)
            headers: Mapping[str, str] | None = None
            try:
                response = client.chat.completions.create(model=self.model, messages=list(messages), **params)
            except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
                self._count(failed=1)
                raise BadInput(
                    f"{self._where()} refused the API key read from ${self.api_key_env} "
                    f"(HTTP {_status_of(exc)}: {redact(_server_message(exc), self._secret.reveal())}); "
                    f"check the key and that it may use this model"
                ) from None
            except openai.NotFoundError as exc:
                self._count(failed=1)
                raise BadInput(
                    f"{self._where()}: not found (HTTP 404: {redact(_server_message(exc), self._secret.reveal())}); "
                    f"check the model name and the base URL (it usually ends in /v1)"
                ) from None
            except openai.APIStatusError as exc:
                status = _status_of(exc)
                message = redact(_server_message(exc), self._secret.reveal())
                if status not in RETRYABLE_STATUS:
                    self._count(failed=1)
                    raise EndpointError(
                        f"{self._where()} rejected the request (HTTP {status}: {message})", status=status
                    ) from None
                headers = exc.response.headers
                retry_after = parse_retry_after(headers)
                if attempt >= self.max_retries or (retry_after is not None and retry_after > MAX_RETRY_AFTER):
                    self._count(failed=1)
                    raise EndpointError(
                        f"{self._where()} kept failing (HTTP {status}: {message}) after {attempt + 1} attempt(s)",
                        status=status,
                        retryable=True,
                    ) from None
                reason = f"HTTP {status}"
            except openai.APIConnectionError as exc:  # includes APITimeoutError
                timed_out = isinstance(exc, openai.APITimeoutError)
                if attempt >= self.max_retries:
                    self._count(failed=1)
                    what = f"timed out (timeout {self.timeout:g} s)" if timed_out else "could not be reached"
                    raise EndpointError(
                        f"{self._where()} {what} after {attempt + 1} attempt(s)", retryable=True
                    ) from None
                reason = "timeout" if timed_out else "connection error"
            except (openai.OpenAIError, ValueError) as exc:  # e.g. a body that is not JSON
                self._count(failed=1)
                raise EndpointError(
                    f"{self._where()}: the reply is not a chat completion ({exc.__class__.__name__}: "
                    f"{redact(str(exc)[:200], self._secret.reveal())})"
                ) from None
            else:
                usage = getattr(response, "usage", None)
                if usage is not None:
                    self._count(
                        prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
                        completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
                    )
                return self._reply_text(response)
            delay = self._backoff(attempt, headers)
            log.info(
                "%s: %s, retry %d of %d in %.2f s",
                self._where(),
                reason,
                attempt + 1,
                self.max_retries,
                delay,
            )
            self._count(retries=1)
            attempt += 1
            time.sleep(delay)


# --------------------------------------------------------------------------------------------------
# Bounded concurrency


def map_bounded(
    fn: Callable[[T], R],
    items: Iterable[T],
    max_concurrency: int,
    *,
    on_result: Callable[[int, R], None] | None = None,
) -> list[R]:
    """`[fn(x) for x in items]` on at most `max_concurrency` threads, results in input order.

    `on_result(index, result)` is called in the caller's thread as each result arrives. The first
    exception cancels the requests not yet started and is re-raised (those already done are kept
    by whatever `fn` stored, e.g. a cache).
    """
    from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

    items = list(items)
    if not items:
        return []
    results: list[Any] = [None] * len(items)
    if max_concurrency <= 1 or len(items) == 1:
        for i, item in enumerate(items):
            results[i] = fn(item)
            if on_result is not None:
                on_result(i, results[i])
        return results
    pool = ThreadPoolExecutor(max_workers=min(max_concurrency, len(items)), thread_name_prefix="openai")
    try:
        futures: dict[Future[R], int] = {pool.submit(fn, item): i for i, item in enumerate(items)}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in sorted(done, key=futures.__getitem__):
                exc = fut.exception()
                if exc is not None:
                    for other in pending:
                        other.cancel()
                    raise exc
                results[futures[fut]] = fut.result()
                if on_result is not None:
                    on_result(futures[fut], results[futures[fut]])
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return results
