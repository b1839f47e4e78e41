"""scripts/gpu_check.py: the prepared GPU check (issue 14) runs at tiny size on CPU, so it cannot rot;
at full size (~1B parameters) it runs only where CUDA is available."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def _run(args: list[str], timeout: float) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout[proc.stdout.index("{\n") :])


@pytest.mark.slow
def test_gpu_check_runs_at_tiny_size_on_cpu(tmp_path) -> None:
    args = ["--size", "tiny", "--device", "cpu", "--out", str(tmp_path), "--sft-steps", "2"]
    args += ["--warmup-steps", "1", "--batch-size", "4", "--eval-batch-size", "4", "--new-tokens", "4"]
    report = _run(
        args,
        timeout=240,
    )
    for key in ("medvqa_sft_steps_per_s", "raw_sft_steps_per_s", "medvqa_tokens_per_s", "raw_tokens_per_s"):
        assert report[key] > 0, report
    assert report["same_answers_as_raw"] is True  # the adapter generates what the raw loop does
    assert report["n_parameters"] < 5_000_000
    assert (tmp_path / "eval" / "scores.json").is_file() and (tmp_path / "gpu_check.json").is_file()


def test_gpu_check_skips_cleanly_without_cuda(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the full-size test below runs instead")
    assert _run(["--out", str(tmp_path)], timeout=120) == {"skipped": "no CUDA device"}


@pytest.mark.slow
def test_gpu_check_full_size_on_cuda(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (scripts/gpu_check.py, ~1B LLaVA, <= 5 min on one H200)")
    report = _run(["--out", str(tmp_path)], timeout=600)
    assert report["n_parameters"] > 800_000_000
    assert report["medvqa_sft_steps_per_s"] > 0 and report["medvqa_tokens_per_s"] > 0
