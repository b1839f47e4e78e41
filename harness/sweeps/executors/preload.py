"""Jobs forked from one process that has imported torch, transformers and trl once (a "zygote").

Every job of a sweep is a fresh `medvqa` process, and each paid ~5 s of CPU to import its
libraries before doing anything (a 1-step `medvqa train`: 5.3 CPU-s, a 1,200-question eval: 4.2;
the demo runs 43 jobs). The zygote imports them once, with the sweep's job environment, and forks
a child per job: the child starts with the libraries in memory (copy-on-write), sets up its log
file and runs `medvqa.cli.main` on the job's arguments, exactly as `python -m medvqa.cli` would,
and exits with its code. The zygote reaps its children and reports each exit code and CPU time.

Used by the local executor on Linux for model jobs (`train`, `eval`, `model`, `stllava`: the ones
that import torch) without a launcher when no GPU is visible (`[run] preload`):
a process that has touched CUDA cannot fork children that use it, and a GPU job's start-up is
small next to its work. Every job gets the same environment (the sweep's thread settings and
`[run] env`), which the zygote is started with, so library settings read at import time
(threads, offline flags) are the job's own. A killed sweep takes the zygote with it, and the
zygote its jobs (PR_SET_PDEATHSIG at each step).

Protocol: the sweep writes one JSON line per job to the zygote's request pipe,
`{"args": [...], "log": path | null, "cwd": path}`; the zygote answers on its reply pipe with
`{"pid": n}` for each request, and `{"exited": pid, "code": n, "cpu_s": x}` when a child ends.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medvqa.sweeps.executors.lifetime import die_with_parent

# What a train or eval job imports before its first step; a module that is not installed is skipped.
PRELOAD = (
    "medvqa.cli",
    "torch",
    "transformers",
    "transformers.models.llava.modeling_llava",
    "datasets",
    "accelerate",
    "peft",
    "trl",
    "trl.trainer.sft_trainer",
    "trl.trainer.dpo_trainer",
    "medvqa.models.hf",
    "medvqa.trainers.trl_run",
    "medvqa.trainers.stllava_med",
    "medvqa.evaluate",
    "medvqa.reports.report",
)
START_TIMEOUT_S = 300.0  # the imports, on a loaded machine


# --- the zygote ------------------------------------------------------------------------------


def _preload() -> None:
    import importlib

    for name in PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def _run_child(request: Mapping[str, Any]) -> int:
    """In the forked child: the job's log as stdout and stderr, then `medvqa.cli.main`."""
    from medvqa.cli import main

    die_with_parent()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.chdir(request["cwd"])
    if request.get("log"):
        fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    sys.argv = [sys.modules[main.__module__].__file__ or "medvqa", *request["args"]]  # as `-m medvqa.cli`
    return main(request["args"])


def _child(request: Mapping[str, Any]) -> None:
    import atexit
    import traceback

    code = 1
    try:
        code = _run_child(request)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # what the interpreter would print for an uncaught error
        traceback.print_exc()
    finally:
        try:
            gc.freeze()  # no last walk of the inherited heap (as `cli.exit_process`)
            atexit._run_exitfuncs()  # logging's flush and the rest, as at a normal exit
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _send(fd: int, message: Mapping[str, Any]) -> None:
    os.write(fd, (json.dumps(message) + "\n").encode())


def serve(requests_fd: int, replies_fd: int) -> None:
    """The zygote's loop: fork a child per request line, report each child's end; stop at EOF."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the sweep's (and the jobs') to handle
    _preload()
    gc.collect()
    gc.freeze()  # children do not copy the inherited heap's pages by collecting it
    _send(replies_fd, {"ready": os.getpid(), "threads": threading.active_count()})
    buffer = b""
    children: set[int] = set()
    open_ = True
    while open_ or children:
        if open_:
            ready, _, _ = select.select([requests_fd], [], [], 0.1)
        else:
            time.sleep(0.1)
            ready = []
        if ready:
            chunk = os.read(requests_fd, 65536)
            if not chunk:
                open_ = False
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    os.close(requests_fd)
                    os.close(replies_fd)
                    _child(request)
                children.add(pid)
                _send(replies_fd, {"pid": pid})
        while children:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
            if pid == 0:
                break
            children.discard(pid)
            code = os.waitstatus_to_exitcode(status)
            _send(replies_fd, {"exited": pid, "code": code, "cpu_s": usage.ru_utime + usage.ru_stime})


# --- the sweep's side ------------------------------------------------------------------------


class Zygote:
    """The sweep's handle on its zygote: `start` a job, then `exit_of` its pid until it has ended."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._req_r, self._req_w = os.pipe()
        self._rep_r, self._rep_w = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "medvqa.sweeps.executors.preload", str(self._req_r), str(self._rep_w)],
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            pass_fds=(self._req_r, self._rep_w),
            preexec_fn=die_with_parent,
        )
        os.close(self._req_r)
        os.close(self._rep_w)
        self._replies = os.fdopen(self._rep_r, "rb")
        self._lock = threading.Lock()
        self._pids: list[int] = []
        self._exits: dict[int, tuple[int, float]] = {}
        self._cond = threading.Condition(self._lock)
        self._reader = threading.Thread(target=self._read, name="medvqa-zygote", daemon=True)
        self._ready, self._threads = False, 0
        self._reader.start()
        with self._cond:
            if not self._cond.wait_for(lambda: self._ready or self.dead, timeout=START_TIMEOUT_S):
                raise RuntimeError("the job zygote did not start")
        if not self._ready:
            raise RuntimeError(f"the job zygote exited with code {self.proc.poll()}")
        if self._threads != 1:  # forking a process with other threads can deadlock its children
            self.close()
            raise RuntimeError(f"the job zygote runs {self._threads} threads after its imports")

    @property
    def dead(self) -> bool:
        return self.proc.poll() is not None

    def _read(self) -> None:
        for line in self._replies:
            message = json.loads(line)
            with self._cond:
                if "ready" in message:
                    self._ready, self._threads = True, int(message["threads"])
                elif "pid" in message:
                    self._pids.append(int(message["pid"]))
                elif "exited" in message:
                    self._exits[int(message["exited"])] = (int(message["code"]), float(message["cpu_s"]))
                self._cond.notify_all()
        with self._cond:  # the zygote is gone: its children were killed with it
            self.proc.wait()
            self._cond.notify_all()

    def start(self, args: list[str], log_path: Path | None) -> int:
        """Fork a job running `medvqa <args>` (output appended to `log_path`; None = this terminal)."""
        request = {"args": list(args), "log": str(log_path) if log_path else None, "cwd": os.getcwd()}
        with self._cond:
            before = len(self._pids)
            _send(self._req_w, request)
            if not self._cond.wait_for(lambda: len(self._pids) > before or self.dead, timeout=60):
                raise RuntimeError("the job zygote did not answer")
            if len(self._pids) == before:
                raise RuntimeError(f"the job zygote exited with code {self.proc.poll()}")
            return self._pids[before]

    def exit_of(self, pid: int) -> tuple[int, float | None] | None:
        """(exit code, CPU seconds) once the job has ended, else None; -9 if the zygote died first."""
        with self._cond:
            if pid in self._exits:
                return self._exits[pid]
            if self.dead and not self._reader.is_alive():
                return -signal.SIGKILL, None
        return None

    def close(self) -> None:
        """End the zygote: at once when it has no job left, else (a sweep torn down mid-run) after
        5 s, its jobs with it."""
        with contextlib.suppress(OSError):
            os.close(self._req_w)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]))
