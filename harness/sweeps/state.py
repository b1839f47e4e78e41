"""What a sweep remembers between runs, under `<out>/.sweep/`: done-markers, started-markers, the lock.

A job is done when its marker holds the job's current key and its outputs exist (for training, with
the expected manifest hash in `checkpoint.json`). Whatever the executor, the same markers decide
what a rerun skips, so `kill -9` of the sweep (or of one job) and a rerun give the same results.
"""

from __future__ import annotations

import fcntl
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from medvqa.errors import BadInput
from medvqa.io import atomic_write_json, read_json
from medvqa.layout import stale_name
from medvqa.sweeps.plan import Job


class SweepState:
    def __init__(self, state_dir: Path, *, log: Callable[[str], None] = print):
        self.state_dir = state_dir
        self.log = log

    def marker(self, job: Job) -> Path:
        return self.state_dir / "done" / (job.file_stem + ".json")

    def started(self, job: Job) -> Path:
        return self.state_dir / "started" / (job.file_stem + ".json")

    def log_path(self, job: Job) -> Path:
        return self.state_dir / "logs" / (job.file_stem + ".log")

    def is_done(self, job: Job) -> bool:
        marker = self.marker(job)
        if not marker.is_file():
            return False
        try:
            if read_json(marker).get("key") != job.key:
                return False
        except BadInput:
            return False
        return check_outputs(job) is None

    def mark_done(self, job: Job, seconds: float, *, cpu: float | None = None) -> None:
        record = {"id": job.id, "key": job.key, "args": job.args, "seconds": round(seconds, 1)}
        if cpu is not None:
            record["cpu_seconds"] = round(cpu, 1)
        atomic_write_json(self.marker(job), record)

    def read_started(self, job: Job) -> dict[str, Any]:
        """The started-marker of a job ({} if none or unreadable)."""
        path = self.started(job)
        if not path.is_file():
            return {}
        try:
            data = read_json(path)
        except BadInput:
            return {}
        return data if isinstance(data, dict) else {}

    def mark_started(self, job: Job, **extra: Any) -> None:
        atomic_write_json(self.started(job), {"id": job.id, "key": job.key, **extra})

    def clear_stale(self, job: Job) -> None:
        """Output left by a different command (the config changed): move it out of the way.

        The same command's partial output (a killed job) stays: `medvqa train`/`eval` resume it.
        """
        if job.kind == "prepare":
            return
        old = None
        for marker in (self.marker(job), self.started(job)):
            if marker.is_file():
                try:
                    old = read_json(marker).get("key")
                except BadInput:
                    old = "unknown"
                if old != job.key:
                    break
        if old is not None and old != job.key and job.output.exists():
            stale = job.output.with_name(stale_name(job.output.name, old))
            shutil.rmtree(stale, ignore_errors=True)
            job.output.rename(stale)
            self.log(f"  {job.id}: settings changed since the last run; old output moved to {stale.name}")
        self.marker(job).unlink(missing_ok=True)
        self.mark_started(job)

    def lock(self, run_dir: Path) -> IO[str]:
        """One sweep at a time per folder: an flock held until the returned file is closed."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        fh = open(self.state_dir / "lock", "w")  # noqa: SIM115 - held for the whole sweep
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise BadInput("another sweep is running on this folder", path=run_dir) from None
        return fh


def check_outputs(job: Job) -> str | None:
    """None if the job left what it promised (and the training data it used is the expected one)."""
    if job.kind in ("train", "base"):
        meta_file = job.output / "checkpoint.json"
        if not meta_file.is_file():
            return f"no checkpoint.json in {job.output}"
        try:
            got = read_json(meta_file).get("manifest_hash")
        except (BadInput, AttributeError):
            return f"unreadable checkpoint.json in {job.output}"
        if job.manifest_hash and got != job.manifest_hash:
            return (
                f"trained on data manifest {got}, expected {job.manifest_hash} (fraction selection differs)"
            )
    elif job.kind == "eval" and not (job.output / "scores.json").is_file():
        return f"no scores.json in {job.output}"
    elif job.kind == "prepare" and job.creates and not Path(job.creates).exists():
        return f"did not create {job.creates}"
    return None
