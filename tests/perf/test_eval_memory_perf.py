"""Peak memory of `medvqa eval` does not grow with the benchmark: 10,000 questions vs 1,000.

Each size runs `medvqa eval` (tiny LLaVA, llava-med-json layout, one distinct 128 px PNG per
question, batch 64, both scorers with 1,000-replicate bootstrap CIs) in a fresh subprocess that
reports its own peak RSS (`ru_maxrss`). Images are decoded batch by batch and dropped, so holding
them would show: 10,000 decoded 128 px images are ~490 MB on top of a ~0.5 GB process. Asserts
peak RSS at 10,000 ≤ 1.2× peak RSS at 1,000 (issue 15) and prints both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SIZES = (1_000, 10_000)
MAX_GROWTH = 1.2
IMAGE_PX = 128
_RSS: dict[int, int] = {}


def _write_benchmark(root: Path, n: int) -> Path:
    """A llava-med-json test split of n questions, each about its own small image."""
    from PIL import Image

    images = root / "images"
    images.mkdir(parents=True)
    items = []
    for i in range(n):
        shade = (i * 37) % 256
        img = Image.new("RGB", (IMAGE_PX, IMAGE_PX), (shade, 255 - shade, (i * 11) % 256))
        img.paste((255 - shade, shade, 128), (i % 96, (i * 7) % 96, i % 96 + 32, (i * 7) % 96 + 32))
        img.save(images / f"img{i:05d}.png")
        closed = i % 2 == 0
        items.append(
            {
                "id": i,
                "image": f"img{i:05d}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nis there a lesion in the left lung?"},
                    {"from": "gpt", "value": "yes" if closed else "left lung"},
                ],
                "answer_type": "CLOSED" if closed else "OPEN",
            }
        )
    (root / "test.json").write_text(json.dumps(items))
    return root


CHILD = """
import resource, sys
from medvqa.cli import main
code = main(sys.argv[1:])
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(code)
"""


@pytest.mark.parametrize("n", SIZES)
def test_eval_peak_rss(benchmark, n, tiny_model_dir, tmp_path) -> None:
    root = _write_benchmark(tmp_path / "data", n)
    cmd = [sys.executable, "-c", CHILD, "eval", "--model", f"hf:{tiny_model_dir}"]
    cmd += ["--benchmark", "llava-med-json", "--root", str(root), "--out", str(tmp_path / "run")]
    cmd += ["--batch-size", "64", "--max-new-tokens", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

    def run() -> int:
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
        assert res.returncode == 0, res.stderr[-2000:]
        (line,) = [x for x in res.stdout.splitlines() if x.startswith("PEAK_RSS_KB")]
        return int(line.split()[1])

    _RSS[n] = benchmark.pedantic(run, rounds=1, iterations=1)
    scores = json.loads((tmp_path / "run" / "scores.json").read_text())
    assert scores["n"] == n
    benchmark.extra_info.update(questions=n, peak_rss_mb=_RSS[n] / 1024)


def test_peak_rss_independent_of_benchmark_size(benchmark) -> None:
    small, large = SIZES
    if set(SIZES) - set(_RSS):
        pytest.skip("needs both sizes above in this run (with benchmarking enabled)")
    ratio = _RSS[large] / _RSS[small]
    benchmark.extra_info.update(rss_ratio=ratio)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # keeps this test in --benchmark-only runs
    print(
        f"\npeak RSS of medvqa eval: {_RSS[small] / 1024:.0f} MB at {small:,} questions, "
        f"{_RSS[large] / 1024:.0f} MB at {large:,}: {ratio:.2f}x"
    )
    assert ratio <= MAX_GROWTH, f"peak RSS grew {ratio:.2f}x from {small:,} to {large:,} questions"
