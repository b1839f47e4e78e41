"""`[run] executor = "slurm"` through submitit, run here on submitit's LocalExecutor (`[slurm]
cluster = "local"`): the real submitit code path (pickled job, controller process, result files),
real subprocesses. A job killed mid-way fails and is resubmitted on rerun; a sweep killed while
its job runs finds that job again instead of submitting it twice; the results are byte-identical
to the local executor's uninterrupted run."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from medvqa.sweeps import Sweep, load_config

SWEEP = """
name = "cluster"
base_model = "hf:{out}/models/tiny"
fractions = [1.0]
seeds = [0]

[[prepare]]
name = "data"
args = ["data", "phantom", "--out", "{out}/data/phantom", "--size", "32", "--train-images", "60",
        "--test-images", "20", "--open-per-image", "2", "--closed-per-image", "2", "--seed", "0"]
creates = "{out}/data/phantom/phantom.json"

[[prepare]]
name = "model"
args = ["model", "init-tiny", "--out", "{out}/models/tiny", "--preset", "phantom", "--force"]
creates = "{out}/models/tiny/config.json"

[train]
benchmark = "phantom"
root = "{out}/data/phantom"

[[eval]]
benchmark = "phantom"
root = "{out}/data/phantom"

[generation]
max_new_tokens = 6
batch_size = 40

[run]
jobs = 1
eval_base = false
%s

[[trainers]]
name = "sft"
[trainers.config]
learning_rate = 1e-3
max_steps = 60
per_device_train_batch_size = 16
logging_steps = 10
"""
LOCAL = "executor = 'local'\nthreads = 1"
SLURM = "executor = 'slurm'\n[slurm]\ncluster = 'local'\ncpus_per_task = 1\ntime_min = 30"
TRAIN = "train__sft__f1.0__s0"


SECRET = "sk-test-0123456789abcdef"  # in the sweep's environment; must not reach any job file


def _env() -> dict[str, str]:
    return {**os.environ, "OPENAI_API_KEY": SECRET}


def _sweep(config: Path, run: Path) -> list[str]:
    return [sys.executable, "-m", "medvqa.cli", "sweep", str(config), "--out", str(run)]


def _train_process(ckpt: Path) -> int | None:
    """The pid of the `medvqa train` writing `ckpt`, if one runs."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"medvqa.cli" in args and b"train" in args and str(ckpt).encode() in args:
            return int(proc.name)
    return None


def _wait_for(what, timeout: float = 240.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = what()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_slurm_executor_kill_and_resume_matches_the_local_executor(tmp_path):
    local_cfg, slurm_cfg = tmp_path / "local.toml", tmp_path / "slurm.toml"
    local_cfg.write_text(SWEEP % LOCAL)
    slurm_cfg.write_text(SWEEP % SLURM)
    ref = tmp_path / "a" / "cluster"
    done = subprocess.run(_sweep(local_cfg, ref), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    run = tmp_path / "b" / "cluster"  # same folder name: results.csv names the run
    ckpt = run / "sft" / "f1.0" / "s0" / "checkpoint"
    log = ckpt / "train_log.jsonl"

    # 1. the job is killed mid-way (kill -9 of its training process): the sweep reports it failed.
    # (Output to files, not pipes: a submitted job inherits the sweep's stdout and outlives it.)
    out1 = tmp_path / "first.log"
    with open(out1, "w") as fh:
        first = subprocess.Popen(
            _sweep(slurm_cfg, run), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
    _wait_for(lambda: log.is_file() and log.stat().st_size > 0)
    os.kill(_wait_for(lambda: _train_process(ckpt)), signal.SIGKILL)
    assert first.wait(timeout=300) == 1, out1.read_text()
    out = out1.read_text()
    assert "FAILED: train sft @ 1.0 seed 0: exit code -9" in out and "(submitit job " in out
    assert not (run / ".sweep" / "done" / f"{TRAIN}.json").exists()
    assert "job(s) failed; rerun" in out

    # 2. rerun: the failed job is resubmitted; kill -9 the sweep itself while that job trains
    with open(tmp_path / "second.log", "w") as fh:
        second = subprocess.Popen(
            _sweep(slurm_cfg, run), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
    pid = _wait_for(lambda: _train_process(ckpt))
    os.kill(second.pid, signal.SIGKILL)
    second.wait(timeout=60)
    assert _train_process(ckpt) == pid, "the submitted job outlives the sweep that submitted it"

    # 3. rerun: the still-running job is found again (not submitted twice), then the sweep ends
    third = subprocess.run(_sweep(slurm_cfg, run), capture_output=True, text=True, timeout=600, env=_env())
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert "train sft @ 1.0 seed 0 ... still running from the last sweep" in third.stdout
    assert "prepare data: done before, skipped" in third.stdout
    assert (run / "report" / "results.csv").read_bytes() == (ref / "report" / "results.csv").read_bytes()
    # the pickled jobs carry only the sweep's own variables: no secret of the submitting shell on disk
    files = [p for p in (run / ".sweep").rglob("*") if p.is_file()]
    assert any(p.suffix == ".pkl" for p in files)
    assert not [p for p in files if SECRET.encode() in p.read_bytes()]
    # the same done-markers as the local executor's: either executor resumes the other's run
    cfg, run_dir = load_config(local_cfg, out=run)
    sweep = Sweep(cfg, run_dir)
    assert all(sweep.is_done(job) for job in sweep.jobs())


def test_slurm_parameters_come_from_the_toml(tmp_path, monkeypatch):
    """Partition, account, time limit, nodes, GPUs and CPUs reach submitit's SLURM executor
    (the sbatch file it would submit; nothing is submitted)."""
    bin_dir = tmp_path / "bin"  # submitit picks its SLURM executor where `srun` exists
    bin_dir.mkdir()
    for tool in ("srun", "sbatch"):
        (bin_dir / tool).write_text("#!/bin/sh\nexit 1\n")
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    import submitit
    from medvqa.sweeps.executors.slurm import SlurmExecutor

    text = (SWEEP % "executor = 'slurm'").replace("jobs = 1", "jobs = 0") + (
        "\n[slurm]\npartition = 'gpu-h100'\naccount = 'lab42'\ntime_min = 90\nnodes = 2\ngpus_per_node = 8\n"
        "cpus_per_task = 32\neval_gpus = 4\nsetup = ['source /venv/bin/activate']\n"
    )
    (tmp_path / "s.toml").write_text(text)
    cfg, run_dir = load_config(tmp_path / "s.toml", out=tmp_path / "run")
    jobs = {j.kind: j for j in Sweep(cfg, run_dir).jobs(with_manifests=False)}
    ex = SlurmExecutor(cfg.run, cfg.slurm, run_dir / ".sweep" / "submitit", n_jobs=5)
    assert ex.capacity == 5 and ex.threads == 32

    def sbatch(job) -> str:
        auto = ex._executor(job)
        slurm = auto._executor
        assert isinstance(slurm, submitit.SlurmExecutor)
        return slurm._make_submission_file_text("true", "uid")

    train, evaluation = sbatch(jobs["train"]), sbatch(jobs["eval"])
    for line in (
        "--partition=gpu-h100",
        "--account=lab42",
        "--time=90",
        "--cpus-per-task=32",
        "--gpus-per-node=8",
        "--nodes=2",
    ):
        assert line in train, (line, train)
    assert "--nodes=1" in evaluation and "--gpus-per-node=4" in evaluation
    assert "source /venv/bin/activate" in train


def test_slurm_without_sbatch_is_one_clear_error(tmp_path, capsys, monkeypatch):
    from medvqa.cli import main

    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    (tmp_path / "s.toml").write_text(SWEEP % "executor = 'slurm'")
    assert main(["sweep", str(tmp_path / "s.toml"), "--out", str(tmp_path / "run"), "--dry-run"]) == 2
    assert "no sbatch on PATH" in capsys.readouterr().err


def test_the_shipped_zero3_config_is_what_accelerate_reads():
    """configs/accelerate/zero3-multinode.yaml through accelerate's own config reader (unknown keys
    are an error there), and the SLURM sweep config launches every train job with it."""
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DistributedType

    path = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "zero3-multinode.yaml"
    cfg = ClusterConfig.from_yaml_file(str(path))
    assert cfg.distributed_type == DistributedType.DEEPSPEED and cfg.deepspeed_config["zero_stage"] == 3
    assert cfg.num_machines > 1 and cfg.mixed_precision == "bf16"
    sweep_cfg, _ = load_config(path.parents[1] / "slurm-zero3.toml", out="/tmp/unused-run")
    assert sweep_cfg.run.executor == "slurm" and sweep_cfg.slurm.nodes == 2
    launcher = sweep_cfg.run.launcher
    assert f"--config_file {path}" in launcher and "--machine_rank {node_rank}" in launcher


@pytest.mark.slow
def test_a_job_found_running_with_other_settings_is_cancelled(tmp_path):
    """A rerun after the config changed must not leave the old job writing beside its replacement."""
    from medvqa.io import atomic_write_json
    from medvqa.sweeps.executors import make_executor

    text = (SWEEP % SLURM).replace(
        "[train]", '[[prepare]]\nname = "list"\nargs = ["benchmarks"]\n\n[train]', 1
    )
    (tmp_path / "s.toml").write_text(text)
    cfg, run_dir = load_config(tmp_path / "s.toml", out=tmp_path / "run")
    sweep = Sweep(cfg, run_dir, log=lambda s: None)
    job = next(j for j in sweep.jobs(with_manifests=False) if j.id == "prepare/list")
    executor = make_executor(cfg, run_dir, n_jobs=1)
    marker = tmp_path / "old-child-pid"
    sleeper = f"import os, time; open({str(marker)!r}, 'w').write(str(os.getpid())); time.sleep(300)"
    old = executor.start(job, [sys.executable, "-c", sleeper], {}, tmp_path / "old.log")
    atomic_write_json(
        sweep.state.started(job), {"id": job.id, "key": "other-settings", **executor.started_info(old)}
    )
    child = int(_wait_for(lambda: marker.is_file() and marker.read_text()))
    running, again = sweep._start(job, executor, verbose=False)
    assert not again and old.poll() is not None  # the old job was cancelled and waited for
    _wait_for(
        lambda: (
            not Path(f"/proc/{child}").exists()
            or "Z" in Path(f"/proc/{child}/stat").read_text().split(") ")[1][:1]
        ),
        30,
    )
    assert _wait_for(lambda: running.poll() is not None, 120) and running.poll() == 0


def test_cancelling_a_local_controller_that_ignores_sigint_still_stops_it(monkeypatch):
    """A reattached local job's controller that ignores SIGINT (inherited from where it started) is
    stopped by the SIGTERM that follows, and so is the task it started (which would not die with
    the controller); the sweep never starts a replacement beside them."""
    import subprocess

    from medvqa.sweeps.executors import slurm

    monkeypatch.setattr(slurm, "CANCEL_GRACE_S", 1.0)
    stubborn = (
        "import signal, subprocess, sys, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
        "task = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
        "print(task.pid, flush=True); time.sleep(120)"
    )
    proc = subprocess.Popen([sys.executable, "-c", stubborn], stdout=subprocess.PIPE, text=True)
    task = int(proc.stdout.readline())
    try:
        slurm._Submitted(None, pid=proc.pid).cancel()
        assert proc.wait(timeout=10) == -signal.SIGTERM
        assert _wait_for(lambda: not slurm._alive(task), 10)
    finally:
        proc.kill()
        proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.kill(task, signal.SIGKILL)
