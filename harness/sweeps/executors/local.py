"""Jobs as subprocesses of the sweep on this machine; a killed sweep takes its jobs with it."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from medvqa.sweeps.config import RunSettings
from medvqa.sweeps.executors.lifetime import die_with_parent
from medvqa.sweeps.executors.preload import Zygote
from medvqa.sweeps.plan import Job

log = logging.getLogger("medvqa.sweep")


def gpu_visible() -> bool:
    """An NVIDIA GPU this process may use (without importing torch: the sweep itself stays light)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return Path("/proc/driver/nvidia/gpus").is_dir() and any(Path("/proc/driver/nvidia/gpus").iterdir())


def parallelism(run: RunSettings, *, cores: int, gpu: bool | None = None) -> tuple[int, int]:
    """(jobs side by side, CPU threads per job). `jobs = 0` (auto): one job per core at one thread
    on a CPU (two 1-thread jobs beat one 2-thread job by ~15% on 2 cores: the tiny model's ops are
    too small to parallelise well), one job when a launcher or a GPU is there (it owns the device)."""
    gpu = gpu_visible() if gpu is None else gpu
    jobs = run.jobs
    if jobs == 0:
        jobs = 1 if (run.launcher or gpu) else max(1, cores // max(1, run.threads))
    threads = run.threads or max(1, cores // jobs)
    return jobs, threads


class _Process:
    def __init__(self, proc: subprocess.Popen[bytes], log_fh: IO[bytes] | None):
        self.proc, self.log_fh = proc, log_fh
        self.cpu_s: float | None = None  # the job's CPU seconds (user + system), once it has ended

    def poll(self) -> int | None:
        if self.proc.returncode is None:
            # wait4, not Popen.poll: the same reaping, plus the job's own resource use
            pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid == 0:
                return None
            self.proc.returncode = os.waitstatus_to_exitcode(status)
            self.cpu_s = usage.ru_utime + usage.ru_stime
        if self.log_fh is not None:
            self.log_fh.close()
            self.log_fh = None
        return self.proc.returncode

    def describe(self) -> str:
        return f"pid {self.proc.pid}"

    def cancel(self) -> None:
        self.proc.terminate()


class _Forked:
    """A job forked from the zygote (`preload`): its exit code and CPU time come from the zygote."""

    def __init__(self, zygote: Zygote, pid: int):
        self.zygote, self.pid = zygote, pid
        self.cpu_s: float | None = None

    def poll(self) -> int | None:
        ended = self.zygote.exit_of(self.pid)
        if ended is None:
            return None
        code, self.cpu_s = ended
        return code

    def describe(self) -> str:
        return f"pid {self.pid}"

    def cancel(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)


CLI = [sys.executable, "-m", "medvqa.cli"]
# The commands that import torch/transformers (what the zygote preloads); the rest start fresh and
# fast, and a sweep of only those never starts a zygote.
MODEL_COMMANDS = frozenset({"train", "eval", "model", "stllava"})


class LocalExecutor:
    def __init__(self, run: RunSettings, *, n_jobs: int, cores: int):
        self.capacity, self.threads = parallelism(run, cores=cores)
        # Linux: fork-safe system libraries, and PR_SET_PDEATHSIG to take the jobs down with the sweep
        self.preload = run.preload and sys.platform.startswith("linux") and not gpu_visible()
        self.zygote: Zygote | None = None
        self.zygote_env: dict[str, str] | None = None

    def _zygote_for(self, env: Mapping[str, str]) -> Zygote | None:
        """The zygote for jobs with this environment (started on first use); None where it cannot run."""
        if self.zygote is not None and self.zygote_env == dict(env) and not self.zygote.dead:
            return self.zygote
        if self.zygote is not None:  # another environment (never within one sweep) or a dead zygote
            self.zygote.close()
            self.zygote = None
        try:
            self.zygote, self.zygote_env = Zygote(env), dict(env)
        except RuntimeError as exc:
            log.warning("jobs start as fresh processes: %s", exc)
            self.preload = False
        return self.zygote

    def start(self, job: Job, command: list[str], env: Mapping[str, str], log_path: Path | None) -> Any:
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
        args = command[len(CLI) :]
        if self.preload and command[: len(CLI)] == CLI and args[:1] and args[0] in MODEL_COMMANDS:
            zygote = self._zygote_for(env)
            if zygote is not None:
                with contextlib.suppress(RuntimeError):  # it died since: a fresh process below
                    return _Forked(zygote, zygote.start(args, log_path))
        log_fh = None
        if log_path is not None:
            log_fh = open(log_path, "ab")  # noqa: SIM115 - closed when the job ends
        proc = subprocess.Popen(
            command,
            env={**os.environ, **env},
            stdout=log_fh,
            stderr=subprocess.STDOUT if log_fh else None,
            preexec_fn=die_with_parent,
        )
        return _Process(proc, log_fh)

    def started_info(self, running: Any) -> dict[str, Any]:
        return {}

    def reattach(self, job: Job, info: Mapping[str, Any]) -> None:
        return None  # a local job dies with the sweep that started it

    def close(self) -> None:
        if self.zygote is not None:
            self.zygote.close()
            self.zygote = None
