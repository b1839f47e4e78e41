"""Running a sweep: prepare, plan, check every job, then start jobs as their dependencies finish
(on the executor `[run] executor` names), and write the report at the end."""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from medvqa.errors import BadInput
from medvqa.io import atomic_write_json, atomic_write_text
from medvqa.sweeps.config import SweepConfig, load_config
from medvqa.sweeps.executors import Executor, Running, check_available, make_executor, thread_env
from medvqa.sweeps.plan import SWEEP_FORMAT, Job, Planner, slug
from medvqa.sweeps.state import Status, SweepState, blocked_message, check_outputs, same_settings

HEARTBEAT_S = 30.0  # print what is running (and the training step) this often


class Sweep:
    def __init__(self, cfg: SweepConfig, run_dir: Path, *, log: Callable[[str], None] = print):
        self.cfg = cfg
        self.run_dir = run_dir
        self.log = log
        self.planner = Planner(cfg, run_dir)
        self.state = SweepState(run_dir / ".sweep", log=log)
        # (kind, wall seconds, CPU seconds or None) of every job that ran this time
        self.timings: list[tuple[str, float, float | None]] = []
        self._n_ok = 0
        # jobs started by this sweep process (their readers' legacy keys no longer count)
        self._ran: set[str] = set()
        # --dry-run: the prepare steps that would run, and per job the ones whose output its key waits for
        self._would_make: set[str] = set()
        self._undecided: dict[str, set[str]] = {}

    def jobs(self, *, with_manifests: bool = True) -> list[Job]:
        return self.planner.jobs(with_manifests=with_manifests)

    def is_done(self, job: Job) -> bool:
        return self.state.is_done(job)

    def write_metadata(self) -> None:
        meta = {
            "format": SWEEP_FORMAT,
            "name": self.cfg.name,
            "config": self.cfg.to_json(),
            "trainers": [{"name": t.name, "label": t.label} for t in self.cfg.trainers],
            "n_train_full": self.planner.n_train_full,
        }
        atomic_write_json(self.run_dir / "sweep.json", meta)
        for r in self.cfg.references:
            atomic_write_json(
                self.run_dir / "reference" / slug(r.name) / "reference.json",
                {
                    "name": r.name,
                    "kind": "reference",
                    "data_used": r.data_used,
                    "data_label": r.data_label,
                    "model": r.model,
                    "eval_dirs": r.eval_dirs,
                },
            )
        if self.cfg.run.eval_base:
            base = self.cfg.base.trainer if self.cfg.base else ""
            atomic_write_json(
                self.run_dir / "reference" / "base" / "reference.json",
                {
                    "name": f"base model{f' ({base})' if base else ''}, no medical QA",
                    "kind": "base",
                    "data_used": 0,
                    "model": self.cfg.base_model,
                },
            )

    def run(self, *, dry_run: bool = False, verbose: bool = False) -> int:
        """Run every job not done yet; returns the number of failed jobs."""
        check_available(self.cfg)
        plan = self.jobs(with_manifests=False)
        self.planner.check_jobs(plan)  # every job's settings, before anything runs
        self._ran, self._would_make, self._undecided = set(), set(), {}
        for job in plan:  # a set-up step the sweep cannot rebuild stops it before anything runs
            status = self.state.status(job) if job.kind == "prepare" else None
            if status is not None and status.kind == "blocked":
                raise BadInput(blocked_message(job, status))
        if dry_run:
            return self._run_all(plan, None, dry_run=True, verbose=verbose)
        lock = self.state.lock(self.run_dir)
        executor = make_executor(self.cfg, self.run_dir, n_jobs=len(plan))
        t0 = time.perf_counter()
        self.timings = []
        try:
            self._n_ok = 0
            failed = self._run_all(plan, executor, dry_run=False, verbose=verbose)
            wall = time.perf_counter() - t0
            self.log(f"sweep: {self._n_ok} job(s) ok, {failed} failed or not run, {wall:.0f} s")
            if self.timings:
                self.log(f"sweep: {timing_summary(self.timings, wall, executor.capacity)}")
            return failed
        finally:
            executor.close()
            lock.close()

    def _run_all(self, plan: list[Job], executor: Executor | None, *, dry_run: bool, verbose: bool) -> int:
        self._n_ok = 0
        if not dry_run:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        # early set-up jobs first (they may create the training data the manifests are computed from)
        prepare = [j for j in plan if j.early]
        failed = self._execute(prepare, executor, dry_run=dry_run, verbose=verbose, total=len(plan), offset=0)
        if failed:
            return failed
        try:
            plan = self.jobs(with_manifests=True)  # a dry run too: the keys a real run compares
        except BadInput as exc:
            # Set-up output that the current code refuses (e.g. data built by an older generator):
            # rebuild it once, then plan again (a second failure is the user's to see).
            if not prepare:
                raise
            if dry_run:
                self.log(
                    f"the training data does not load ({exc}); a real run would rerun the [[prepare]] steps"
                )
                self._would_make.update(j.id for j in prepare)
                plan = self.jobs(with_manifests=False)
                rest = [j for j in plan if not j.early]
                return self._execute(
                    rest, None, dry_run=True, verbose=verbose, total=len(plan), offset=len(prepare)
                )
            self.log(f"the training data does not load ({exc}); rerunning the [[prepare]] steps")
            for job in prepare:
                self.state.marker(job).unlink(missing_ok=True)
            self.planner.forget_data()
            failed = self._execute(
                prepare, executor, dry_run=False, verbose=verbose, total=len(plan), offset=0, force=True
            )
            if failed:
                return failed
            plan = self.jobs(with_manifests=True)
        if not dry_run:
            self.write_metadata()
        rest = [j for j in plan if not j.early]
        return self._execute(
            rest, executor, dry_run=dry_run, verbose=verbose, total=len(plan), offset=len(prepare)
        )

    def _command(self, job: Job) -> list[str]:
        if job.launcher:
            return [*shlex.split(job.launcher), *job.args]
        return [sys.executable, "-m", "medvqa.cli", *job.args]

    def _write_files(self, job: Job) -> None:
        for path, text in self.planner.files.items():
            if str(path) in job.args and (not path.is_file() or path.read_text() != text):
                atomic_write_text(path, text)

    def _start(self, job: Job, executor: Executor, *, verbose: bool) -> tuple[Running, bool]:
        """(the running job, whether it was found running from an earlier sweep process)."""
        found = executor.reattach(job, self.state.read_started(job))
        if found is not None:
            if same_settings(self.state.read_started(job), job):
                return found, True
            # still running with other settings: it must not write beside the job that replaces it
            self.log(f"  {job.id}: cancelling {found.describe()} (started with other settings)")
            found.cancel()
            deadline = time.monotonic() + 120
            while found.poll() is None and time.monotonic() < deadline:
                time.sleep(1)
        self.state.clear_stale(job)
        self._write_files(job)
        env = thread_env(executor.threads, self.cfg.run.env)
        running = executor.start(job, self._command(job), env, None if verbose else self.state.log_path(job))
        info = executor.started_info(running)
        if info:
            self.state.mark_started(job, **info)
        return running, False

    def _execute(
        self,
        jobs: list[Job],
        executor: Executor | None,
        *,
        dry_run: bool,
        verbose: bool,
        total: int,
        offset: int,
        force: bool = False,
    ) -> int:
        pending = list(jobs)
        done: set[str] = set()
        failed: set[str] = set()
        running: dict[str, tuple[Running, Job, float]] = {}
        counter = offset
        ids = {j.id for j in jobs}
        capacity = executor.capacity if executor is not None else 1
        last_beat = time.perf_counter()
        while pending or running:
            # start what can start
            progressed = False
            # short evals first (they unblock nothing long but finish lines early), then by priority
            order = sorted(pending, key=lambda j: (j.kind != "eval", -j.priority))
            for job in order:
                if len(running) >= capacity:
                    break
                if any(d in failed for d in [*job.deps, *job.after]):
                    pending.remove(job)
                    failed.add(job.id)
                    self.log(f"[skip] {job.title}: a job it needs failed")
                    progressed = True
                    continue
                if any(d in ids and d not in done for d in [*job.deps, *job.after]):
                    continue
                pending.remove(job)
                counter += 1
                progressed = True
                status = self._status(job)
                if dry_run or executor is None:
                    done.add(job.id)
                    self.log(f"[{counter}/{total}] {job.title}: {self._dry_run_line(job, status, force)}")
                    continue
                if not force and status.skip:
                    done.add(job.id)
                    if status.kind == "kept":
                        self.log(f"[{counter}/{total}] {job.title}: {_KEPT.format(job.creates)}")
                    else:
                        self.state.upgrade_marker(job)
                        self.log(f"[{counter}/{total}] {job.title}: done before, skipped")
                    continue
                if failed and self.cfg.run.stop_on_error:
                    failed.add(job.id)
                    self.log(f"[skip] {job.title}: not started after a failure (stop_on_error)")
                    continue
                self._ran.add(job.id)
                proc, again = self._start(job, executor, verbose=verbose)
                job.legacy_key = ""  # from now on its markers hold its current key
                where = "" if self.cfg.run.executor == "local" else f" ({proc.describe()})"
                self.log(
                    f"[{counter}/{total}] {job.title} ...{' still running from the last sweep' if again else ''}{where}"
                )
                running[job.id] = (proc, job, time.perf_counter())
            # reap finished jobs
            for jid, (proc, job, t0) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                progressed = True
                del running[jid]
                dt = time.perf_counter() - t0
                problem = check_outputs(job) if rc == 0 else f"exit code {rc}{_detail(proc)}"
                if problem is None:
                    made = None
                    if job.kind == "prepare":  # what it made now: the keys of the jobs reading it follow
                        self.planner.forget_made(job.id)
                        made = self.planner.made(job)
                    self.state.mark_done(job, dt, cpu=getattr(proc, "cpu_s", None), made=made)
                    self.timings.append((job.kind, dt, getattr(proc, "cpu_s", None)))
                    done.add(jid)
                    self.log(f"  done: {job.title} ({dt:.0f} s)")
                else:
                    failed.add(jid)
                    log_path = self.state.log_path(job)
                    tail = _tail(log_path) if log_path.is_file() else ""
                    self.log(f"  FAILED: {job.title}: {problem}; log: {log_path}\n{tail}")
            if not progressed:
                time.sleep(0.2)
            if running and time.perf_counter() - last_beat > HEARTBEAT_S:
                last_beat = time.perf_counter()
                self.log("  running: " + "; ".join(_progress(j, t0) for _, j, t0 in running.values()))
        self._n_ok += len(done)
        return len(failed)

    def _status(self, job: Job) -> Status:
        """The job's key from what the jobs it reads hold now (a prepare step it reads may have just
        run), then what its records say to do with it."""
        self.planner.rekey(job)
        if any(d in self._ran for d in job.reads):
            job.legacy_key = ""  # the previous release's marker cannot tell whether that output changed
        waits = set()
        for d in job.reads:
            waits |= {d} if d in self._would_make else self._undecided.get(d, set())
        if waits:
            self._undecided[job.id] = waits
        status = self.state.status(job)
        if job.kind == "prepare" and not status.skip:
            self._would_make.add(job.id)
        return status

    def _dry_run_line(self, job: Job, status: Status, force: bool) -> str:
        """What a real run would do with the job, as `--dry-run` prints it."""
        command = shlex.join(self._command(job))
        if status.kind == "kept" and not force:
            return _KEPT.format(job.creates)
        waits = sorted(self._undecided.get(job.id, ()))
        if status.kind == "done" and not force:
            if waits:
                return (
                    f"done before; decided after {', '.join(waits)} ran: skipped if what it makes is "
                    f"unchanged, else rerun: {command}"
                )
            return "done before, skipped"
        if status.kind == "blocked":
            return f"would stop the sweep: {blocked_message(job, status)}"
        if status.kind == "stale" and status.stale_path is not None:
            return f"would rerun ({status.why}; old output moved to {status.stale_path.name}): {command}"
        if status.kind == "resume":
            return f"would resume (cut short last time): {command}"
        return f"would run{f' ({status.why})' if status.why else ''}: {command}"


_KEPT = "{} exists and the sweep has no record of making it: kept as it is, not run"


def timing_summary(timings: list[tuple[str, float, float | None]], wall: float, capacity: int) -> str:
    """Where the wall time went: job seconds per kind, how well the side-by-side slots were used, and
    the jobs' CPU seconds where known (on a busy machine the figure that says what the work costs)."""
    by_kind: dict[str, list[float]] = {}
    for kind, seconds, _ in timings:
        by_kind.setdefault(kind, []).append(seconds)
    parts = [
        f"{kind} {sum(v):.0f} s ({len(v)} job{'s' if len(v) > 1 else ''})" for kind, v in by_kind.items()
    ]
    busy = sum(seconds for _, seconds, _ in timings)
    used = f"; {busy / (wall * capacity):.0%} of {capacity} slots busy" if wall > 0 and capacity > 1 else ""
    cpu = [c for _, _, c in timings if c is not None]
    cpu_text = f"; CPU {sum(cpu):.0f} s" if cpu and len(cpu) == len(timings) else ""
    return f"job time {', '.join(parts)}: {busy:.0f} s in {wall:.0f} s wall{used}{cpu_text}"


def _detail(proc: Running) -> str:
    error = getattr(proc, "error", "")
    return f" ({error})" if error else ""


def _progress(job: Job, t0: float) -> str:
    """`train sft @ 0.09 seed 0 (step 1200/3000, 45 s)` from the trainer's train_log.jsonl."""
    text = f"{job.title} ({time.perf_counter() - t0:.0f} s"
    log_file = job.output / "train_log.jsonl"
    if job.kind in ("train", "base") and log_file.is_file():
        try:
            with open(log_file, "rb") as fh:
                fh.seek(max(0, log_file.stat().st_size - 4096))
                last = fh.read().decode("utf-8", "replace").strip().splitlines()[-1]
            row = json.loads(last)
            text += f", {row.get('stage', 'step')} step {row.get('step')}/{row.get('max_steps')}"
        except (OSError, ValueError, IndexError):
            pass
    return text + ")"


def _tail(path: Path, n: int = 15) -> str:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:]
    return "\n".join("    | " + ln for ln in lines)


def run_sweep(
    config: str | Path,
    *,
    out: str | Path | None = None,
    dry_run: bool = False,
    verbose: bool = False,
    report: bool = True,
    log: Callable[[str], None] = print,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[int, Path, str]:
    """Run a sweep and its report; returns (failed jobs, run folder, markdown table or '')."""
    cfg, run_dir = load_config(config, out=out)
    if overrides:
        for key, value in overrides.items():
            setattr(cfg.run, key, value)
    sweep = Sweep(cfg, run_dir, log=log)
    failed = sweep.run(dry_run=dry_run, verbose=verbose)
    md = ""
    if report and not dry_run:
        from medvqa.reports.report import make_report

        try:
            md, written = make_report(run_dir)
            log(f"report: {', '.join(str(p) for p in written)}")
        except BadInput as exc:
            if not failed:
                raise
            log(f"report: not written ({exc})")
    return failed, run_dir, md
