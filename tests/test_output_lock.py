"""`medvqa.io.output_lock`: one writer per output; a second fails at once; a kill -9 frees it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from medvqa.errors import BadInput
from medvqa.io import lock_path, output_lock


def test_second_writer_fails_at_once_naming_the_output(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    with output_lock(out) as held:
        assert held == out / ".lock"
        started = time.monotonic()
        pattern = r"another process \(pid \d+\) is writing this output"
        with pytest.raises(BadInput, match=pattern) as exc, output_lock(out):
            pass
        assert time.monotonic() - started < 1.0 and str(out) in str(exc.value) and "--out" in str(exc.value)
    with output_lock(out):  # released on exit: the next job may write
        pass


def test_a_file_is_locked_beside_itself(tmp_path: Path) -> None:
    target = tmp_path / "judged.jsonl"
    assert lock_path(target) == tmp_path / "judged.jsonl.lock"
    with (
        output_lock(target, flag="--out"),
        pytest.raises(BadInput, match="another process"),
        output_lock(target),
    ):
        pass


def test_kill_9_releases_the_lock(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    code = (
        "import sys, time\nfrom medvqa.io import output_lock\n"
        f"with output_lock({str(out)!r}):\n    print('locked', flush=True)\n    time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with pytest.raises(BadInput, match=f"pid {proc.pid}"), output_lock(out):
            pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    with output_lock(out):
        pass


def test_unwritable_place_is_bad_input(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(BadInput, match="cannot create the lock file"), output_lock(blocker / "run"):
        pass


def test_a_waiting_second_process_gets_the_lock_when_the_holder_lets_go(tmp_path: Path) -> None:
    """`wait_s`: a shared cache entry's second user waits for the first instead of failing."""
    import os
    import threading

    out = tmp_path / "entry"
    out.mkdir()
    waited_for: list[str] = []
    got: list[float] = []

    def second() -> None:
        with output_lock(out, wait_s=30, on_wait=waited_for.append):
            got.append(time.monotonic())

    with output_lock(out):  # a flock is per open file: a thread of this process is another holder
        waiter = threading.Thread(target=second)
        waiter.start()
        time.sleep(0.5)
        assert not got and waited_for == [str(os.getpid())]
        released = time.monotonic()
    waiter.join(timeout=30)
    assert got and got[0] >= released
    with output_lock(out):
        started = time.monotonic()
        with pytest.raises(BadInput, match=r"still, after 0.3 s"), output_lock(out, wait_s=0.3):
            pass
        assert 0.3 <= time.monotonic() - started < 3
