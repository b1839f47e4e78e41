"""`medvqa.distributed`: one way to detect a distributed run, and barriers that fail loudly."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from medvqa import distributed
from medvqa.errors import BadInput


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    """In a fresh interpreter: accelerate's PartialState is a process-wide singleton."""
    clean = {
        k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR")
    }
    return subprocess.run(
        [sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, timeout=120
    )


def test_single_process_needs_no_accelerate_state(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.world_size() == 1 and not distributed.is_distributed()
    assert distributed.state() is None and distributed.rank() == 0 and distributed.is_main_process()
    distributed.wait_for_everyone()  # a no-op, not a swallowed error


def test_garbage_world_size_is_bad_input(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(BadInput, match="WORLD_SIZE"):
        distributed.world_size()


def test_misconfigured_launch_fails_loudly_instead_of_every_rank_being_rank_0():
    # WORLD_SIZE=2 without the rendezvous variables: accelerate quietly sets up ONE process, so
    # before, every rank took itself for rank 0 and the barrier swallowed the rest.
    code = (
        "from medvqa import distributed\n"
        "try:\n    distributed.wait_for_everyone()\n"
        "except Exception as e:\n    print(type(e).__name__, e); raise SystemExit(3)\n"
    )
    proc = _run(code, WORLD_SIZE="2")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "BadInput" in proc.stdout and "misconfigured launch" in proc.stdout


def test_barrier_errors_propagate(monkeypatch):
    class Broken:
        num_processes, process_index = 2, 1

        def wait_for_everyone(self):
            raise RuntimeError("NCCL timeout")

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed, "_state", lambda: Broken())
    assert distributed.rank() == 1 and not distributed.is_main_process()
    with pytest.raises(RuntimeError, match="NCCL timeout"):
        distributed.wait_for_everyone()
