"""A job's child processes die with the sweep that started them: no orphans after a `kill -9`.

Its own module because every executor's children call it (local processes, the preload zygote and
its forked jobs, submitit's local fallback), and those executors import one another."""

from __future__ import annotations

import signal


def die_with_parent() -> None:
    """In the child: get SIGKILL when the parent process dies (Linux), so a killed sweep leaves no orphans."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
