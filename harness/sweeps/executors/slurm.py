"""Each sweep job a SLURM job, submitted through submitit (no scheduler of our own).

The job runs the same `medvqa train|eval` command as the local executor, so done-markers, resume
and stale-output handling are the scheduler's, unchanged. What SLURM adds:

- resources from `[slurm]` (partition, account, qos, time limit, nodes, GPUs, CPUs, memory);
- a sweep killed while its jobs are queued or running finds them again on rerun (the started
  marker records the SLURM job id) instead of submitting them twice;
- a job that hits its time limit or is preempted is requeued by submitit (the command is
  `Checkpointable`), and `medvqa train`/`eval` resume their own partial work;
- multi-node train jobs: one task per node; `{node_rank}`, `{num_nodes}`, `{num_processes}`,
  `{main_host}` and `{main_port}` in the launcher are filled from the allocation (docs/cluster.md).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import submitit
from medvqa.sweeps.config import RunSettings, SlurmSettings
from medvqa.sweeps.executors.lifetime import die_with_parent
from medvqa.sweeps.plan import Job

_ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING"}
MAIN_PORT = 29500


class JobCommand(submitit.helpers.Checkpointable):
    """What a SLURM task runs: the job's `medvqa` command, output appended to the sweep's log file.

    Only the sweep's own variables travel in the pickle (threads, `[run] env`); the rest of the
    environment is the node's, so no secret of the submitting shell is written to the job folder.
    """

    def __init__(
        self, command: list[str], env: Mapping[str, str], log_path: str, cwd: str, gpus_per_node: int = 0
    ):
        self.command, self.env, self.log_path, self.cwd = list(command), dict(env), log_path, cwd
        self.gpus_per_node = gpus_per_node

    def __call__(self) -> int:
        task = submitit.JobEnvironment()
        fill = {
            "{node_rank}": str(task.node),
            "{num_nodes}": str(task.num_nodes),
            "{main_host}": task.hostnames[0] if task.hostnames else "127.0.0.1",
            "{main_port}": str(MAIN_PORT),
            "{num_processes}": str(task.num_nodes * max(1, self.gpus_per_node)),
        }
        command = [_fill(a, fill) for a in self.command]
        log = Path(self.log_path)
        if task.global_rank:
            log = log.with_name(f"{log.stem}.rank{task.global_rank}{log.suffix}")
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as fh:
            proc = subprocess.run(  # dies with the task (a cancelled local job leaves no orphan)
                command,
                env={**os.environ, **self.env},
                stdout=fh,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                preexec_fn=die_with_parent,
            )
        return proc.returncode


def _fill(arg: str, fill: Mapping[str, str]) -> str:
    for key, value in fill.items():
        arg = arg.replace(key, value)
    return arg


CANCEL_GRACE_S = 10.0


class _Submitted:
    def __init__(self, job: submitit.Job[int], pid: int | None = None):
        self.job, self.pid = job, pid
        self.error = ""

    def poll(self) -> int | None:
        if self.pid is not None:  # reattached local job: its controller is not our child
            if _alive(self.pid):
                return None
        elif not self.job.done():
            return None
        try:
            return int(self.job.result())
        except Exception as exc:  # submitit's own failure (killed, timed out, node failure)
            self.error = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            return 1

    def describe(self) -> str:
        return f"submitit job {self.job.job_id}"

    def cancel(self) -> None:
        """scancel (or, for a local job found again, its controller stopped: SIGINT, then SIGTERM and
        SIGKILL to it and every process under it, CANCEL_GRACE_S apart). A controller started where
        SIGINT was ignored inherits that, so SIGINT alone could leave the old job writing."""
        if self.pid is None:
            self.job.cancel(check=False)
            return
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            # SIGINT lets the controller stop its tasks; the harder signals go to the whole tree
            for pid in [self.pid] if sig == signal.SIGINT else [self.pid, *_descendants(self.pid)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + CANCEL_GRACE_S
            while _alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if not _alive(self.pid):
                return


def _descendants(pid: int) -> list[int]:
    """Every process under `pid` (Linux /proc; empty elsewhere), children before grandchildren."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int(entry.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(0), [])
        out += kids
        todo += kids
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.is_file() and stat.read_text().split(") ", 1)[-1].startswith("Z"))


class SlurmExecutor:
    def __init__(self, run: RunSettings, slurm: SlurmSettings, folder: Path, *, n_jobs: int):
        self.run, self.slurm = run, slurm
        self.folder = Path(slurm.folder) if slurm.folder else folder
        self.capacity = run.jobs or max(1, n_jobs)
        self.threads = slurm.cpus_per_task

    def _gpus(self, job: Job) -> int:
        s = self.slurm
        return s.gpus_per_node if job.kind in ("train", "base") or s.eval_gpus < 0 else s.eval_gpus

    def _executor(self, job: Job) -> submitit.AutoExecutor:
        s = self.slurm
        ex = submitit.AutoExecutor(folder=self.folder / "%j", cluster=s.cluster)
        multi = job.kind in ("train", "base") and s.nodes > 1
        gpus = self._gpus(job)
        params: dict[str, Any] = {
            "name": f"medvqa-{job.id}",
            "timeout_min": s.time_min,
            "nodes": s.nodes if multi else 1,
            "tasks_per_node": 1,
            "cpus_per_task": s.cpus_per_task,
            "gpus_per_node": gpus if s.cluster == "slurm" else 0,
        }
        if s.mem_gb:
            params["mem_gb"] = s.mem_gb
        slurm_only = {
            "slurm_partition": s.partition,
            "slurm_account": s.account,
            "slurm_qos": s.qos,
            "slurm_constraint": s.constraint,
            "slurm_setup": list(s.setup),
            "slurm_additional_parameters": dict(s.additional),
        }
        params.update({k: v for k, v in slurm_only.items() if v})
        if s.cluster == "local" and s.setup:
            params["local_setup"] = list(s.setup)
        ex.update_parameters(**params)
        return ex

    def start(
        self, job: Job, command: list[str], env: Mapping[str, str], log_path: Path | None
    ) -> _Submitted:
        log = log_path or (self.folder.parent / "logs" / (job.file_stem + ".log"))
        ex = self._executor(job)
        submitted = ex.submit(JobCommand(command, env, str(log), os.getcwd(), self._gpus(job)))
        return _Submitted(submitted)

    def started_info(self, running: Any) -> dict[str, Any]:
        return {"executor": "slurm", "cluster": self.slurm.cluster, "job_id": str(running.job.job_id)}

    def reattach(self, job: Job, info: Mapping[str, Any]) -> _Submitted | None:
        job_id = str(info.get("job_id") or "")
        if info.get("executor") != "slurm" or info.get("cluster") != self.slurm.cluster or not job_id:
            return None
        if self.slurm.cluster == "local":
            from submitit.local.local import LocalJob

            if not job_id.isdigit() or not _alive(int(job_id)):
                return None
            return _Submitted(LocalJob(self.folder / "%j", job_id), pid=int(job_id))
        found = submitit.SlurmJob(self.folder / "%j", job_id)
        return _Submitted(found) if found.state.upper().split()[0] in _ACTIVE else None

    def close(self) -> None:
        pass
