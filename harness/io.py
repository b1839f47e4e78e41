"""Files: atomic writes, JSON/JSONL reading with errors that name file and line, append-as-you-go logs."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from medvqa.errors import BadInput


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc/self/status)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but only a fallback)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write via a temp file in the same folder + rename: readers never see a half-written file.

    The file gets the mode a plain `open(path, "w")` would give (0666 minus the umask), not
    mkstemp's 0600: results written to a group folder stay readable to the group.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        # a lone surrogate (legal in JSON, from a hostile file) is not UTF-8: written as the text \ud800
        with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def json_text(obj: Any, **kwargs: Any) -> str:
    """`json.dumps` that a UTF-8 file can always hold: readable UTF-8 as a rule, but `\\ud800`-style
    escapes when the value holds a lone surrogate (legal in JSON, not encodable), so it round-trips."""
    text = json.dumps(obj, ensure_ascii=False, **kwargs)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, ensure_ascii=True, **kwargs)
    return text


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, json_text(obj, indent=2, sort_keys=False) + "\n")


def json_lines(rows: Iterable[Any]) -> str:
    """Rows as JSON lines (`json_text`, one per line, each ending in a newline)."""
    return "".join(json_text(r) + "\n" for r in rows)


def atomic_write_jsonl(path: str | os.PathLike[str], rows: Iterable[Any]) -> None:
    atomic_write_text(path, json_lines(rows))


def read_json(path: str | os.PathLike[str]) -> Any:
    """Parse a JSON file; a missing, empty or malformed file is a BadInput naming file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInput("file not found", path=path) from None
    except IsADirectoryError:
        raise BadInput("is a folder, expected a JSON file", path=path) from None
    except UnicodeDecodeError as exc:
        raise BadInput(f"not UTF-8 text ({exc.reason})", path=path) from None
    if not text.strip():
        raise BadInput("file is empty", path=path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInput(
            f"malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}", path=path
        ) from None
    except (ValueError, RecursionError) as exc:
        raise BadInput(f"unreadable JSON: {_parse_limit(exc)}", path=path) from None


def _parse_limit(exc: Exception) -> str:
    """Why parseable-but-hostile JSON was refused (a 5,000-digit integer, 100k-deep nesting)."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc).split(";")[0]  # "Exceeds the limit (4300 digits) for integer string conversion..."


def read_toml(path: str | os.PathLike[str], *, what: str = "TOML file") -> dict[str, Any]:
    """Parse a TOML file; a missing or malformed file is a BadInput naming it."""
    import tomllib

    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInput(f"{what} not found", path=path) from None
    except UnicodeDecodeError as exc:
        raise BadInput(f"not UTF-8 text ({exc.reason})", path=path) from None
    except tomllib.TOMLDecodeError as exc:
        raise BadInput(f"malformed TOML: {exc}", path=path) from None


def iter_jsonl(
    path: str | os.PathLike[str], *, allow_truncated_tail: bool = False
) -> Iterator[tuple[int, Any]]:
    """Yield (line number, object) for each non-blank line.

    A malformed line is a BadInput naming file and line, except — with `allow_truncated_tail` — a
    last line without its newline, which is what a killed writer leaves behind and is dropped.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInput("file not found", path=path) from None
    except UnicodeDecodeError as exc:
        raise BadInput(f"not UTF-8 text ({exc.reason})", path=path) from None
    lines = text.split("\n")
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as exc:
            is_tail = lineno == len(lines)  # no newline after it
            if allow_truncated_tail and is_tail:
                return
            raise BadInput(f"malformed JSON at line {lineno}: {exc.msg}", path=path) from None
        except (ValueError, RecursionError) as exc:
            raise BadInput(f"unreadable JSON at line {lineno}: {_parse_limit(exc)}", path=path) from None


def read_jsonl(path: str | os.PathLike[str], **kwargs: Any) -> list[Any]:
    return [obj for _, obj in iter_jsonl(path, **kwargs)]


def read_rows(
    path: str | os.PathLike[str], keys: Sequence[str] = (), *, missing_ok: bool = True
) -> list[dict[str, Any]]:
    """The rows of a file a run appends to (predictions, stage files, skip lists): JSON objects,
    each with `keys`; a torn last line (a killed writer) is dropped; no file yet is [] (with
    `missing_ok`). A row that is not an object, or lacks a key, is a BadInput naming file and line."""
    path = Path(path)
    if missing_ok and not path.is_file():
        return []
    rows = []
    for lineno, row in iter_jsonl(path, allow_truncated_tail=True):
        if not isinstance(row, dict):
            raise BadInput("expected a JSON object", path=path, record=f"line {lineno}")
        for key in keys:
            if key not in row:
                raise BadInput("missing field", path=path, record=f"line {lineno}", field=key)
        rows.append(row)
    return rows


class JsonlAppender:
    """Append JSON lines and flush each batch to disk, so a killed run loses at most one batch.

    A half-written last line left by a previous kill is cut off before appending. Every batch is
    flushed to the OS (what survives kill -9); `sync_interval` > 0 fsyncs at most every that many
    seconds (and on close) instead of after every batch — what a power loss may cost, traded for
    the fsync latency a fast generation loop would otherwise pay per batch.
    """

    def __init__(self, path: str | os.PathLike[str], *, sync_interval: float = 0.0):
        self.path = Path(path)
        self.sync_interval = sync_interval
        self._synced = time.monotonic()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):
                keep = data.rfind(b"\n") + 1
                with open(self.path, "r+b") as fh:
                    fh.truncate(keep)
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, rows: Iterable[Any]) -> None:
        self.write_lines(json_lines(rows))

    def write_lines(self, text: str) -> None:
        """Append JSON lines already serialised (`json_lines`): one batch."""
        self._fh.write(text)
        self._fh.flush()
        if time.monotonic() - self._synced >= self.sync_interval:
            os.fsync(self._fh.fileno())
            self._synced = time.monotonic()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
        self._fh.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


LOCK_SUFFIX = ".lock"


def lock_path(target: str | os.PathLike[str]) -> Path:
    """The lock file of an output: `<folder>/.lock` for a folder, `<file>.lock` beside a file."""
    target = Path(target)
    return target / LOCK_SUFFIX if target.is_dir() else target.with_name(target.name + LOCK_SUFFIX)


@contextmanager
def output_lock(
    target: str | os.PathLike[str],
    *,
    flag: str = "--out",
    wait_s: float = 0.0,
    on_wait: Callable[[str], None] | None = None,
) -> Iterator[Path]:
    """Hold an exclusive lock on an output (a run folder or a file) while a long job writes it.

    A second process on the same output fails at once with a BadInput naming it (exit 2) instead of
    appending every row twice. The lock is an `fcntl.flock` on `lock_path(target)`, so the kernel
    releases it when the holder exits or is killed (-9 included); the file itself stays (deleting it
    would race with the next holder). A folder must exist before it is locked (else the lock sits
    beside it, as for a file). Where `fcntl` does not exist (Windows) nothing is locked.

    `wait_s` > 0: a second process waits up to that long for the holder instead (a shared cache
    entry that one process computes and the others then reuse); `on_wait(holder pid)` is called
    once when it starts waiting. Still held after `wait_s`: the same BadInput.
    """
    path = lock_path(target)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield path
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise BadInput(
            f"cannot create the lock file ({exc.strerror or exc})", path=path, field=flag
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = True
        except BlockingIOError:
            held = False
        if not held:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            if wait_s > 0 and on_wait is not None:
                on_wait(holder if holder.isdigit() else "?")
            if not (wait_s > 0 and _flock_within(fd, wait_s)):
                waited = f" (still, after {wait_s:g} s)" if wait_s > 0 else ""
                raise BadInput(
                    f"another process{f' (pid {holder})' if holder.isdigit() else ''} is writing this output"
                    f"{waited}; wait for it to finish or choose another {flag}",
                    path=target,
                    field=flag,
                )
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode("ascii"), 0)
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _flock_within(fd: int, seconds: float) -> bool:
    """Take the exclusive flock on `fd` within `seconds` (polled, backing off to 2 s); False if not."""
    import fcntl

    deadline = time.monotonic() + seconds
    delay = 0.05
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(delay, left))
            delay = min(2 * delay, 2.0)


def library_versions() -> dict[str, str]:
    """Versions of the libraries that can change a number (read from metadata, no heavy imports)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in (
        "medvqa-harness",
        "torch",
        "transformers",
        "trl",
        "peft",
        "accelerate",
        "tokenizers",
        "nltk",
    ):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    import platform

    out["python"] = platform.python_version()
    return out
