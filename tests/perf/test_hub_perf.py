"""Reading a Hugging Face parquet release through `datasets` vs reading it by hand with pyarrow.

The loaders read parquet through `datasets` (features from the file's schema metadata, undecoded
images); the baseline is what they did before: `pyarrow.parquet.read_table(...).to_pylist()`. Same
rows, measured in the same run; the ratio is asserted loosely (a regression such as hashing the whole
table for a fingerprint, or row-by-row iteration, is 3-5x).
"""

from __future__ import annotations

import io
import time

import pytest
from medvqa.benchmarks.hub import dataset_rows

COLUMNS = ["image", "question", "answer"]


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    """6,000 rows (300 distinct 64 px PNGs, ~20 MB), the size of a VQA-RAD-like split many times over."""
    import datasets
    from PIL import Image

    images = []
    for seed in range(300):
        buf = io.BytesIO()
        Image.effect_noise((64, 64), 20 + seed % 40).convert("L").save(buf, "PNG")
        images.append(buf.getvalue())
    rows = [
        {
            "image": {"bytes": images[i % 300], "path": f"img{i % 300}.png"},
            "question": f"q {i}?",
            "answer": "yes",
        }
        for i in range(6000)
    ]
    path = tmp_path_factory.mktemp("hub-perf") / "data" / "test-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    datasets.Dataset.from_list(rows).cast_column("image", datasets.Image()).to_parquet(str(path))
    list(dataset_rows([path], COLUMNS))  # warm: the datasets import and first use are paid once per process
    return path


def _pyarrow_rows(path):
    import pyarrow.parquet as pq

    return pq.read_table(path).select(COLUMNS).to_pylist()


def test_parquet_through_datasets_vs_pyarrow(benchmark, shard):
    def best_of(fn, rounds=5):
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - start)
        return min(times), out

    base_time, base = best_of(lambda: _pyarrow_rows(shard))
    rows = benchmark.pedantic(
        lambda: [r for _, _, r in dataset_rows([shard], COLUMNS)], rounds=5, iterations=1
    )
    ours = benchmark.stats.stats.min
    assert len(rows) == len(base) == 6000
    assert (
        rows[17]["image"]["bytes"] == base[17]["image"]["bytes"]
        and rows[17]["question"] == base[17]["question"]
    )
    benchmark.extra_info["pyarrow_baseline_s"] = base_time
    benchmark.extra_info["ratio"] = ours / base_time
    print(f"\ndatasets {ours:.3f} s vs pyarrow {base_time:.3f} s: {ours / base_time:.2f}x")
    assert ours / base_time < 3.0
