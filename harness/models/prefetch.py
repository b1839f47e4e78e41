"""Preparing the next batch in a forked worker process while this process generates.

A worker *thread* cannot overlap batch preparation with a small model's `generate` on a CPU: both
hold the GIL (1,200 Phantom questions through a thread: preparing 0.17-0.23 s + generating
0.94-1.06 s = 1.13-1.33 s). A forked child has an interpreter of its own, as a torch
`DataLoader` worker has. It holds a copy-on-write copy of the adapter (only the processor is
used: the weights are never touched), prepares a batch to CPU tensors, and sends them back as
plain arrays through a pipe (no shared-memory segments: a container's small /dev/shm is not an
issue). This process moves them to the model's device. The worker can also finish a generated
batch (decode its tokens and whatever the caller makes of the answers: an eval's answer rows),
so that the generating process does little but generate.

Where `fork` is unavailable or unsafe (Windows; macOS, whose system libraries break in a forked
child; spawning instead would re-import torch and reload the processor), or once the child has
died, batches are prepared and finished in this process: the same results, without the overlap.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from medvqa.types import GenerationRequest

log = logging.getLogger("medvqa.eval")

Prepare = Callable[[Sequence[GenerationRequest]], Any]
Finish = Callable[[int, Any], Any]  # (batch index, its new tokens as a CPU tensor) -> result
_worker: dict[str, Any] = {}  # the child's prepare and finish, inherited through fork
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _start_worker(prepare: Prepare, finish: Finish | None, parent: int) -> None:
    import torch

    _die_with_parent(parent)
    _worker.update(prepare=prepare, finish=finish)
    torch.set_num_threads(1)  # the processor's few tensor ops; the parent keeps the cores


def _die_with_parent(parent: int) -> None:
    """Have the kernel kill this worker when its parent ends, however it ends. A worker left behind
    by a `kill -9` of its eval (or by a forked sweep job leaving through `os._exit`) would wait
    forever for its next batch, and hold the parent's open files: the output's lock, so that the
    resumed eval was refused as a second writer."""
    _prctl()(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent ended before the line above
        os._exit(0)


def _prctl() -> Any:
    return ctypes.CDLL(None, use_errno=True).prctl


def _prepare_in_worker(batch: Sequence[GenerationRequest]) -> dict[str, Any]:
    return to_arrays(_worker["prepare"](batch))


def _finish_in_worker(index: int, tokens: Any) -> Any:
    import torch

    return _worker["finish"](index, torch.from_numpy(tokens))


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
    """Linux only (macOS offers fork but its system libraries are not safe in a forked child), with
    the prctl call that ties the worker's life to this process's."""
    if not sys.platform.startswith("linux") or "fork" not in multiprocessing.get_all_start_methods():
        return False
    try:
        _prctl()
    except (OSError, AttributeError):
        return False
    return True


@dataclass
class Job:
    """Work handed to the worker: its future, and the same work done here should the worker die."""

    future: Future[Any]
    redo: Callable[[], Any]


class Prefetcher:
    """One forked worker preparing batches with `prepare` (a function returning CPU tensors) and
    finishing them with `finish` (optional; see `Finish`).

    `prepare(batch)` and `finish(index, tokens)` return a `Job`; `result(job)` its result or the
    exception the work raised (e.g. a batch's `BadInput`). Use as a context manager: leaving it
    stops the worker (after the work in hand).
    """

    def __init__(self, prepare: Prepare, finish: Finish | None = None) -> None:
        self._prepare, self._finish = prepare, finish
        self.pool: ProcessPoolExecutor | None = None
        if can_fork():
            self.pool = ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("fork"),
                initializer=_start_worker,
                initargs=(prepare, finish, os.getpid()),
            )

    def here(self, batch: Sequence[GenerationRequest]) -> Job:
        """The batch prepared in this process, now."""
        return self._here(lambda: self._prepare(batch))

    def prepare(self, batch: Sequence[GenerationRequest]) -> Job:
        return self._submit(lambda: self._prepare(batch), from_arrays, _prepare_in_worker, batch)

    def finish(self, index: int, tokens: Any) -> Job:
        assert self._finish is not None, "a Prefetcher made without finish"
        finish = self._finish
        tokens = tokens.cpu()
        return self._submit(lambda: finish(index, tokens), None, _finish_in_worker, index, tokens.numpy())

    def result(self, job: Job) -> Any:
        """The job's result; work lost with a dead worker is done here instead."""
        try:
            return job.future.result()
        except BrokenProcessPool as exc:
            self._stop_worker(exc)
            return job.redo()

    def _here(self, work: Callable[[], Any]) -> Job:
        done: Future[Any] = Future()
        try:
            done.set_result(work())
        except Exception as exc:  # handed to the caller as the future's exception
            done.set_exception(exc)
        return Job(done, work)

    def _submit(
        self,
        work: Callable[[], Any],
        convert: Callable[[Any], Any] | None,
        fn: Callable[..., Any],
        *args: Any,
    ) -> Job:
        if self.pool is None:
            return self._here(work)
        try:
            sent = self.pool.submit(fn, *args)
        except (RuntimeError, OSError) as exc:  # BrokenProcessPool is a RuntimeError
            self._stop_worker(exc)
            return self._here(work)
        if convert is None:
            return Job(sent, work)
        out: Future[Any] = Future()

        def settle(f: Future[Any]) -> None:
            try:
                out.set_result(convert(f.result()))
            except Exception as exc:  # the work's own (BadInput) or a dead worker's
                out.set_exception(exc)

        sent.add_done_callback(settle)
        return Job(out, work)

    def _stop_worker(self, exc: BaseException) -> None:
        if self.pool is not None:
            log.warning(
                "the batch-preparing worker process stopped (%s); preparing and finishing batches here", exc
            )
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None

    def close(self) -> None:
        """Stop the worker and wait for it to exit: it holds this process's open files as a fork
        does, an output's lock among them, until it has."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
