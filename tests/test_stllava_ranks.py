"""Stage 2 on two ranks (`accelerate launch --multi_gpu --num_processes 2` on CPU): the same bytes as one.

Each rank samples every other pending question/answer with per-item seeds and appends to its own
shard; rank 0 merges the shards in the canonical order. Real processes, real gloo process group.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from medvqa.io import read_jsonl

pytestmark = pytest.mark.slow


def _accelerate() -> list[str]:
    exe = Path(sys.executable).with_name("accelerate")
    if not exe.is_file():
        found = shutil.which("accelerate")
        if not found:
            pytest.skip("the accelerate launcher is not installed")
        exe = Path(found)
    # `--cpu` makes accelerate (1.15) start ONE process whatever --num_processes says; --multi_gpu
    # starts N (torchrun), and medvqa.distributed sets up a gloo group when there is no GPU
    return [str(exe), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
            "no", "--dynamo_backend", "no", "-m", "medvqa"]  # fmt: skip


def _run(prefix: list[str], argv: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.run([*prefix, *argv], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_ranks_write_the_same_stage_files_as_one(tiny_model_dir, phantom_root, tmp_path):
    images = tmp_path / "images.txt"
    pool = sorted(str(p) for p in (Path(phantom_root) / "train" / "images").glob("*.png"))[:12]
    images.write_text("\n".join(pool) + "\n", encoding="utf-8")
    one, two = tmp_path / "one", tmp_path / "two"
    single = [sys.executable, "-m", "medvqa"]
    model = ["--model", f"hf:{tiny_model_dir}", "--preset", "phantom"]
    for folder, prefix, bs in ((one, single, "64"), (two, _accelerate(), "5")):
        folder.mkdir()
        q, a, j = (folder / f"{n}.jsonl" for n in ("questions", "answers", "judged"))
        common = [
            "--generation-batch-size",
            bs,
            "--question-max-new-tokens",
            "8",
            "--answer-max-new-tokens",
            "4",
        ]
        _run(prefix, ["stllava", "questions", *model, "--images", str(images), "--out", str(q), "--k-questions", "3",
                      *common])  # fmt: skip
        _run(prefix, ["stllava", "answers", *model, "--questions", str(q), "--out", str(a), *common])
        _run(prefix, ["stllava", "judge", "--answers", str(a), "--out", str(j), "--expert", "phantom"])
    for name in ("questions", "answers", "judged"):
        assert (one / f"{name}.jsonl").read_bytes() == (two / f"{name}.jsonl").read_bytes(), name
        assert not list(two.glob(f"{name}.rank*.jsonl"))  # shards merged and removed
    assert len(read_jsonl(one / "questions.jsonl")) == 36
