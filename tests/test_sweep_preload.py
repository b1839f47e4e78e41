"""Sweep jobs forked from the preloaded zygote (`sweeps/executors/preload.py`): the same files as
fresh processes, exit codes, messages and CPU time reported, and nothing left running when the
sweep is killed."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from medvqa.cli import main
from medvqa.io import read_jsonl

CONFIG = """
name = "preload"
base_model = "hf:{out}/models/tiny"
fractions = [1.0]
seeds = [0]
[[prepare]]
name = "data"
args = ["data", "phantom", "--out", "{out}/data/phantom", "--size", "32", "--train-images", "24",
        "--test-images", "6", "--seed", "0"]
creates = "{out}/data/phantom/phantom.json"
[[prepare]]
name = "model"
needs = []
args = ["model", "init-tiny", "--out", "{out}/models/tiny", "--preset", "phantom", "--force"]
creates = "{out}/models/tiny/config.json"
[train]
benchmark = "phantom"
root = "{out}/data/phantom"
[[eval]]
benchmark = "phantom"
root = "{out}/data/phantom"
[[trainers]]
name = "sft"
[trainers.config]
max_steps = MAX_STEPS
per_device_train_batch_size = 8
[run]
jobs = 2
threads = 1
preload = PRELOAD
"""


def _config(tmp_path: Path, *, preload: bool, max_steps: int = 6) -> Path:
    path = tmp_path / f"sweep-{preload}-{max_steps}.toml"
    text = CONFIG.replace("PRELOAD", str(preload).lower()).replace("MAX_STEPS", str(max_steps))
    path.write_text(text, encoding="utf-8")
    return path


def test_forked_jobs_write_what_fresh_processes_write(tmp_path, monkeypatch):
    """Every model job of a preload sweep is forked from the zygote (none with preload = false), and the
    two give the same weights, answers and scores; each job's own CPU time is recorded."""
    from medvqa.sweeps.executors import preload

    forked: list[list[str]] = []
    start = preload.Zygote.start

    def counted(self, args, log_path):
        forked.append(list(args))
        return start(self, args, log_path)

    monkeypatch.setattr(preload.Zygote, "start", counted)
    runs = {}
    for flag in (True, False):
        runs[flag] = tmp_path / f"run-{flag}"
        n_before = len(forked)
        assert main(["sweep", str(_config(tmp_path, preload=flag)), "--out", str(runs[flag])]) == 0
        if flag:
            # the model jobs (+ the base model's eval); `data phantom` imports no torch: a fresh process
            assert {a[0] for a in forked} == {"model", "train", "eval"} and len(forked) == 4
        else:
            assert len(forked) == n_before  # fresh processes
    ckpt = Path("sft/f1.0/s0/checkpoint/model.safetensors")
    assert (runs[True] / ckpt).read_bytes() == (runs[False] / ckpt).read_bytes()
    answers = {
        flag: [r["text"] for r in read_jsonl(run / "sft/f1.0/s0/eval/phantom/predictions.jsonl")]
        for flag, run in runs.items()
    }
    assert answers[True] == answers[False] and len(answers[True]) > 0
    scores = {
        flag: json.loads((run / "sft/f1.0/s0/eval/phantom/scores.json").read_text())
        for flag, run in runs.items()
    }
    assert scores[True]["scorers"] == scores[False]["scorers"]
    markers = [json.loads(p.read_text()) for p in (runs[True] / ".sweep" / "done").glob("*.json")]
    assert len(markers) == 5 and all(m["cpu_seconds"] > 0 for m in markers)


def test_a_forked_job_that_fails_reports_its_exit_code_and_message(tmp_path, capsys):
    """A job's BadInput is exit code 2 with its one-line message in the job's log, as from a fresh
    process (here: a [[prepare]] step asking for a model folder that does not exist)."""
    config = (
        _config(tmp_path, preload=True)
        .read_text()
        .replace(
            '["model", "init-tiny", "--out"',
            '["eval", "--model", "hf:{out}/no-such-model", "--benchmark", "phantom", '
            '"--root", "{out}/data/phantom", "--out"',
        )
        .replace('"--preset", "phantom", "--force"]', "]")
        .replace("needs = []\n", "")  # after the data step
    )
    path = tmp_path / "failing.toml"
    path.write_text(config, encoding="utf-8")
    assert main(["sweep", str(path), "--out", str(tmp_path / "run")]) != 0
    assert "FAILED: prepare model: exit code 2" in capsys.readouterr().out
    log = (tmp_path / "run" / ".sweep" / "logs" / "prepare__model.log").read_text()
    assert log.startswith("medvqa: error:") and "no-such-model" in log and "Traceback" not in log, log


@pytest.mark.slow
def test_a_killed_sweep_takes_the_zygote_and_its_jobs_with_it(tmp_path):
    """kill -9 of the sweep process alone (not its group): the zygote and the training job it
    forked die with it (PR_SET_PDEATHSIG at each step), nothing of the group is left."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "medvqa.cli", "sweep", str(_config(tmp_path, preload=True, max_steps=5000)),
           "--out", str(run)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    log = run / "sft" / "f1.0" / "s0" / "checkpoint" / "train_log.jsonl"
    deadline = time.time() + 180
    while not log.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    try:
        assert proc.poll() is None and log.is_file(), "the training job did not start"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                os.killpg(proc.pid, 0)  # anyone left in the sweep's process group?
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the zygote or its job outlived the sweep")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
