"""Where a sweep's jobs run. The scheduler (`medvqa.sweeps.run`) decides what runs next and what is
done; an executor only starts one job's command and reports its exit code:

- `local`: subprocesses on this machine, `jobs` side by side at `threads` CPU threads each;
- `slurm`: one SLURM job per sweep job through submitit (resources from `[slurm]`); submitit's
  LocalExecutor runs the same path on one machine (`[slurm] cluster = "local"`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from medvqa.sweeps.plan import Job


class Running(Protocol):
    """A started job."""

    def poll(self) -> int | None:
        """Its exit code once it has finished, else None."""

    def describe(self) -> str:
        """Where it runs, for the log (e.g. `slurm job 4242`)."""

    def cancel(self) -> None:
        """Stop it (it was started with settings that changed since)."""


class Executor(Protocol):
    capacity: int  # jobs side by side
    threads: int  # CPU threads per job (the same for every job: a rerun computes the same bytes)

    def start(self, job: Job, command: list[str], env: Mapping[str, str], log_path: Path | None) -> Running:
        """Start `command` (stdout and stderr appended to `log_path`; None = this terminal)."""

    def started_info(self, running: Running) -> dict[str, Any]:
        """What the started-marker records to find the job again after the sweep process died."""

    def reattach(self, job: Job, info: Mapping[str, Any]) -> Running | None:
        """A job started by an earlier sweep process that is still queued or running, else None."""

    def close(self) -> None: ...


def thread_env(threads: int, extra: Mapping[str, str]) -> dict[str, str]:
    """The variables every job gets on top of its environment: its CPU threads (more threads than
    free cores stall OpenMP) and the sweep's `[run] env`."""
    env = {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }
    env.update(extra)
    return env


def check_available(cfg: Any) -> None:
    """What `[run] executor` needs is installed and reachable (checked before any job runs)."""
    if cfg.run.executor != "slurm":
        return
    import importlib.util
    import shutil

    from medvqa.errors import BadInput

    if importlib.util.find_spec("submitit") is None:
        raise BadInput("[run] executor = 'slurm' needs submitit: pip install 'medvqa-harness[slurm]'")
    if cfg.slurm.cluster == "slurm" and shutil.which("sbatch") is None:
        raise BadInput(
            "[run] executor = 'slurm': no sbatch on PATH; run the sweep where SLURM jobs can be submitted "
            "(a login node), or set [slurm] cluster = 'local' to run the same path on this machine"
        )


def make_executor(cfg: Any, run_dir: Path, *, n_jobs: int) -> Executor:
    """The executor `[run] executor` names, sized for a plan of `n_jobs` jobs."""
    if cfg.run.executor == "slurm":
        from medvqa.sweeps.executors.slurm import SlurmExecutor

        return SlurmExecutor(cfg.run, cfg.slurm, run_dir / ".sweep" / "submitit", n_jobs=n_jobs)
    from medvqa.sweeps.executors.local import LocalExecutor

    return LocalExecutor(cfg.run, n_jobs=n_jobs, cores=os.cpu_count() or 1)
