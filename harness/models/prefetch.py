"""Preparing the next batch in a forked worker process while this process generates.

A worker *thread* cannot overlap batch preparation with a small model's `generate` on a CPU: both
hold the GIL (1,200 Phantom questions through a thread: preparing 0.17-0.23 s + generating
0.94-1.06 s = 1.13-1.33 s). A forked child has an interpreter of its own, as a torch
`DataLoader` worker has. It holds a copy-on-write copy of the adapter (only the processor is
used: the weights are never touched), prepares a batch to CPU tensors, and sends them back as
plain arrays through a pipe (no shared-memory segments: a container's small /dev/shm is not an
issue). This process moves them to the model's device.

Where `fork` is unavailable or unsafe (Windows; macOS, whose system libraries break in a forked
child; spawning instead would re-import torch and reload the processor), or once the child has
died, batches are prepared in this process one by one: the same inputs, without the overlap.
"""

from __future__ import annotations

import logging
import multiprocessing
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from medvqa.types import GenerationRequest

log = logging.getLogger("medvqa.eval")

Prepare = Callable[[Sequence[GenerationRequest]], Any]
_worker_prepare: Prepare | None = None  # set in the child, inherited through fork


def _start_worker(prepare: Prepare) -> None:
    import torch

    global _worker_prepare
    _worker_prepare = prepare
    torch.set_num_threads(1)  # the processor's few tensor ops; the parent keeps the cores


def _prepare_in_worker(batch: Sequence[GenerationRequest]) -> dict[str, Any]:
    assert _worker_prepare is not None
    return to_arrays(_worker_prepare(batch))


def to_arrays(inputs: Any) -> dict[str, Any]:
    """A processor's output with every tensor as a numpy array (pickled as bytes, not as a
    shared-memory handle)."""
    import torch

    return {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def from_arrays(arrays: dict[str, Any]) -> Any:
    import numpy as np
    import torch
    from transformers import BatchFeature

    return BatchFeature(
        {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in arrays.items()}
    )


def can_fork() -> bool:
    """Linux only: macOS offers fork but its system libraries are not safe in a forked child."""
    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


class Prefetcher:
    """One forked worker preparing batches with `prepare` (a function returning CPU tensors).

    `submit(batch)` returns a future of the prepared inputs (CPU tensors) or of the `BadInput` the
    batch raised. Use as a context manager: leaving it stops the worker (after the batch in hand).
    """

    def __init__(self, prepare: Prepare) -> None:
        self.prepare = prepare
        self.pool: ProcessPoolExecutor | None = None
        if can_fork():
            self.pool = ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("fork"),
                initializer=_start_worker,
                initargs=(prepare,),
            )

    def here(self, batch: Sequence[GenerationRequest]) -> Future[Any]:
        """The batch prepared in this process, now (its result or its exception, as a future)."""
        done: Future[Any] = Future()
        try:
            done.set_result(self.prepare(batch))
        except Exception as exc:  # handed to the caller as the future's exception
            done.set_exception(exc)
        return done

    def submit(self, batch: Sequence[GenerationRequest]) -> Future[Any]:
        if self.pool is None:
            return self.here(batch)
        try:
            arrays = self.pool.submit(_prepare_in_worker, batch)
        except (RuntimeError, OSError) as exc:  # BrokenProcessPool is a RuntimeError
            return self._without_worker(batch, exc)
        out: Future[Any] = Future()

        def settle(f: Future[Any]) -> None:
            try:
                out.set_result(from_arrays(f.result()))
            except Exception as exc:  # the batch's own (BadInput) or a dead worker's
                out.set_exception(exc)

        arrays.add_done_callback(settle)
        return out

    def result(self, batch: Sequence[GenerationRequest], future: Future[Any]) -> Any:
        """The future's inputs; a batch lost with a dead worker is prepared here instead."""
        try:
            return future.result()
        except BrokenProcessPool as exc:
            return self._without_worker(batch, exc).result()

    def _without_worker(self, batch: Sequence[GenerationRequest], exc: BaseException) -> Future[Any]:
        if self.pool is not None:
            log.warning("the batch-preparing worker process stopped (%s); preparing batches here", exc)
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None
        return self.here(batch)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
