"""Is this a distributed launch, which rank am I, and a barrier — one definition for the harness.

A run is distributed when the launcher (`accelerate launch`, `torchrun`) set `WORLD_SIZE` > 1;
then accelerate's `PartialState` owns the process group. Evaluation and the trainers both ask
here, so "am I rank 0" has one answer everywhere. A barrier in a distributed run never swallows
an error: a misconfigured launch must fail loudly, not let ranks read files rank 0 has not written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from medvqa.errors import BadInput


def world_size() -> int:
    """The launcher's process count (1 when not launched distributed)."""
    raw = os.environ.get("WORLD_SIZE", "") or "1"
    try:
        n = int(raw)
    except ValueError:
        raise BadInput(f"WORLD_SIZE={raw!r} is not an integer (set by the launcher)") from None
    if n < 1:
        raise BadInput(f"WORLD_SIZE={n} must be >= 1")
    return n


def is_distributed() -> bool:
    return world_size() > 1


@lru_cache(maxsize=1)
def _state() -> Any:
    import torch
    from accelerate import PartialState

    # without cpu=True accelerate never sets up a CPU process group (each rank would run alone)
    try:
        st = PartialState(cpu=not torch.cuda.is_available())
    except ValueError as e:  # accelerate's own refusal, e.g. no MASTER_ADDR for the process group
        raise BadInput(f"WORLD_SIZE={world_size()}: a misconfigured launch ({e})") from None
    if st.num_processes != world_size():
        # accelerate falls back to one process when the rendezvous variables are missing: every
        # rank would then believe it is rank 0 and write (or read) the same files.
        raise BadInput(
            f"WORLD_SIZE={world_size()} but accelerate set up {st.num_processes} process(es): a misconfigured "
            "launch (use `accelerate launch` or `torchrun`, which also set RANK/MASTER_ADDR)"
        )
    return st


def state() -> Any:
    """accelerate's `PartialState` in a distributed run, else None (single process: nothing to set up)."""
    return _state() if is_distributed() else None


def rank() -> int:
    st = state()
    return int(st.process_index) if st is not None else 0


def is_main_process() -> bool:
    return rank() == 0


def wait_for_everyone() -> None:
    """Barrier across ranks (a no-op in a single process); errors propagate."""
    st = state()
    if st is not None:
        st.wait_for_everyone()


@dataclass
class Dist:
    """This process's place in a launch: rank, world size and accelerate's state (None when alone).

    `Dist()` is a single process; `Dist.current()` asks the launch. Evaluation and STLLaVA-Med's
    stage 2 shard their work with it (rank r takes every `world`-th item)."""

    rank: int = 0
    world: int = 1
    state: Any = None

    @classmethod
    def current(cls, timeout_s: float | None = None) -> Dist:
        """The launch's ranks; with `timeout_s`, the first call in a process sets the process-group
        timeout (a rank waits this long at a barrier, e.g. while rank 0 merges a long stage)."""
        if not is_distributed():
            return cls()
        if timeout_s:
            from datetime import timedelta

            import torch
            from accelerate import PartialState

            # the shared state is set up by its first call: this one, with our timeout
            PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(seconds=float(timeout_s)))
        st = state()
        return cls(int(st.process_index), int(st.num_processes), st)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> str | None:
        return str(self.state.device) if self.state is not None else None

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()
