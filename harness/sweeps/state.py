"""What a sweep remembers between runs, under `<out>/.sweep/`: done-markers, started-markers, the lock,
and what each job's records say a rerun must do with it (`SweepState.status`).

A job is done when its marker holds the job's current key and its outputs exist (for training, with
the expected manifest hash in `checkpoint.json`). Whatever the executor, the same markers decide
what a rerun skips, so `kill -9` of the sweep (or of one job) and a rerun give the same results.
A `[[prepare]]` step's `creates` that exists with no record of the sweep making it (the user's own
data or model) is kept as it is; what the sweep made and recorded is moved aside and rebuilt when
the step's command changes, like a train job's checkpoint.
"""

from __future__ import annotations

import fcntl
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from medvqa.errors import BadInput
from medvqa.io import atomic_write_json, read_json
from medvqa.layout import stale_name
from medvqa.sweeps.made import inside, made_path
from medvqa.sweeps.plan import Job

KEY_FORMAT = 2  # markers that say it hold keys with prepare digests; older ones hold `legacy_key`s


@dataclass(frozen=True)
class Status:
    """What a run does with a job, from its records: skip it (`done`; `kept`: a set-up output made
    outside the sweep), or run it (`new`; `resume`: the same command was cut short; `stale`: its
    output came from other settings and moves to `stale_path` first). `blocked`: a set-up output
    the sweep made outside its run folder with another command: it moves nothing there, so it stops."""

    kind: str
    why: str = ""
    stale_path: Path | None = None
    output: Path | None = None

    @property
    def skip(self) -> bool:
        return self.kind in ("done", "kept")


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
        return self.status(job).skip

    def status(self, job: Job) -> Status:
        """What a run does with `job` now (the same answer for `--dry-run` and a real run)."""
        done, started = self._record(self.marker(job)), self._record(self.started(job))
        output = self.output(job)
        if done is not None and same_settings(done, job):
            problem = check_outputs(job)
            if problem is None:
                return Status("done")
            if job.kind in ("train", "base") and (job.output / "checkpoint.json").is_file():
                # finished, but not what this job promises (another data manifest): it cannot be
                # resumed, and `medvqa train` would keep it, so it moves aside and is rebuilt
                return _stale(problem, job.output, done)
        unrecorded = done is None and started is None
        if job.kind == "prepare" and unrecorded and job.creates and Path(job.creates).exists():
            return Status("kept")  # no record of making it: the user's own data or model, kept as it is
        old = next((r for r in (done, started) if r is not None and not same_settings(r, job)), None)
        if old is None:
            resumed = started is not None and output is not None and output.exists()
            return Status("resume" if resumed else "new", output=output)
        why = _why_changed(old, job)
        if output is None or not output.exists():
            return Status("new", why, output=output)
        if job.kind == "prepare" and not inside(output, self.run_dir):
            return Status("blocked", why, output=output)
        return _stale(why, output, old)

    @property
    def run_dir(self) -> Path:
        return self.state_dir.parent

    def output(self, job: Job) -> Path | None:
        """What a rerun with other settings moves aside: the job's folder; for a set-up step what its
        `creates` stands for (`made_path`), none without `creates`."""
        if job.kind == "prepare":
            return made_path(job.creates, self.run_dir)
        return job.output

    def _record(self, path: Path) -> dict[str, Any] | None:
        """A marker's content; {"key": "unknown"} if unreadable (it counts as other settings)."""
        if not path.is_file():
            return None
        try:
            data = read_json(path)
        except BadInput:
            return {"key": "unknown", "key_format": KEY_FORMAT}
        return data if isinstance(data, dict) else {"key": "unknown", "key_format": KEY_FORMAT}

    def mark_done(
        self, job: Job, seconds: float, *, cpu: float | None = None, made: str | None = None
    ) -> None:
        record: dict[str, Any] = {"id": job.id, "key": job.key, "key_format": KEY_FORMAT, "args": job.args}
        record["made_by_prepare"] = job.made
        if made is not None:
            record["made"] = made  # a set-up step: the digest of what it made (what its readers' keys hold)
        record["seconds"] = round(seconds, 1)
        if cpu is not None:
            record["cpu_seconds"] = round(cpu, 1)
        atomic_write_json(self.marker(job), record)

    def upgrade_marker(self, job: Job) -> None:
        """A done-marker of the previous release (legacy key) rewritten with the job's current key, so
        from now on what its prepare steps made is checked too."""
        record = self._record(self.marker(job))
        if record is None or "key_format" in record:
            return
        record.update({"key": job.key, "key_format": KEY_FORMAT, "made_by_prepare": job.made})
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
        record = {"id": job.id, "key": job.key, "key_format": KEY_FORMAT, "made_by_prepare": job.made}
        atomic_write_json(self.started(job), {**record, **extra})

    def clear_stale(self, job: Job) -> None:
        """Output left by a different command (the config, or what a prepare step it reads made,
        changed): move it out of the way. The same command's partial output (a killed job) stays:
        `medvqa train`/`eval` resume it."""
        status = self.status(job)
        if status.kind == "blocked":
            raise BadInput(blocked_message(job, status))
        if status.kind == "stale" and status.output is not None and status.stale_path is not None:
            stale = status.stale_path
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
            status.output.rename(stale)
            self.log(f"  {job.id}: {status.why} since the last run; old output moved to {stale.name}")
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


def _stale(why: str, output: Path, record: dict[str, Any]) -> Status:
    """Rerun the job, its output first moved aside under the name of the key that made it."""
    return Status(
        "stale", why, output.with_name(stale_name(output.name, str(record.get("key", "unknown")))), output
    )


def same_settings(record: dict[str, Any], job: Job) -> bool:
    """A marker made by this job's current settings (or, written by the previous release, by the same
    settings as far as that release's key tells)."""
    key = record.get("key")
    if key == job.key:
        return True
    return "key_format" not in record and bool(job.legacy_key) and key == job.legacy_key


def _why_changed(old: dict[str, Any], job: Job) -> str:
    before = old.get("made_by_prepare")
    if isinstance(before, dict):
        changed = sorted(d for d, digest in job.made.items() if before.get(d) != digest)
        if changed:
            return f"what {', '.join(changed)} made changed"
    return "its command changed" if job.kind == "prepare" else "settings changed"


def blocked_message(job: Job, status: Status) -> str:
    return (
        f"{job.id}: {status.why} since the sweep made {status.output}, which is outside the run folder, "
        "so the sweep does not move it aside: move or delete it yourself (the step then rebuilds it), "
        "or restore the step's old args, and rerun"
    )
