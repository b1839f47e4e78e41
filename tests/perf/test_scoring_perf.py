"""Speed of `score_samples`: 100,000 predictions, both scorers, against a per-item port of the reference.

The reference port (`reference_llava_med.evaluate`: every string normalized three times, nltk
`sentence_bleu` four times per OPEN item) is benchmarked on the first 10,000 of the same items and
its time scaled by 10: its cost per item does not depend on the other items (no cache, no shared
state), so the scaling is exact up to noise, and it keeps the perf suite short. The fast path is
benchmarked on all 100,000 items and does everything `medvqa score` does after reading the files:
both scorers (llava-med and strict), per-item rows, and 1,000-replicate clustered bootstrap CIs.
Both are measured in this one run as process CPU time (`time.process_time`: on a shared machine
wall time mostly measures the neighbours), minimum over rounds; the last test asserts the fast
path is at least 5× faster.
"""

from __future__ import annotations

import time

import pytest
from medvqa.scoring import score_samples
from medvqa.types import VQASample

from tests.perf import reference_llava_med as ref
from tests.perf.synthetic_items import make_items

N_ITEMS = 100_000
N_REFERENCE = 10_000
MIN_SPEEDUP = 5.0
_TIMES: dict[str, float] = {}
pytestmark = pytest.mark.benchmark(group="scoring-100k", timer=time.process_time)


@pytest.fixture(scope="module")
def items() -> list[tuple[str, str, str]]:
    return make_items(N_ITEMS, seed=0)


@pytest.fixture(scope="module")
def samples(items) -> list[VQASample]:
    # ~3 questions per image, as in VQA-RAD/SLAKE
    return [
        VQASample(
            id=str(i),
            image=f"img{i // 3}.png",
            question="?",
            answer=g,
            answer_type=k,
            benchmark="perf",
            split="test",
        )
        for i, (k, g, _) in enumerate(items)
    ]


def _min_time(benchmark) -> float | None:
    stats = getattr(benchmark, "stats", None)
    return None if stats is None else stats.stats.min


def test_reference_port_per_item_loop(benchmark, items):
    subset = items[:N_REFERENCE]
    result = benchmark.pedantic(ref.evaluate, args=(subset,), rounds=2, iterations=1, warmup_rounds=0)
    assert len(result["items"]) == N_REFERENCE
    t = _min_time(benchmark)
    if t is not None:
        _TIMES["reference_100k"] = t * (N_ITEMS / N_REFERENCE)
        benchmark.extra_info["items"] = N_REFERENCE
        benchmark.extra_info["scaled_to_100k_s"] = _TIMES["reference_100k"]


def test_fast_path_both_scorers_with_cis(benchmark, items, samples):
    predictions = [p for _, _, p in items]
    result = benchmark.pedantic(
        score_samples,
        args=(samples, predictions),
        kwargs={"scorers": ("llava-med", "strict"), "seed": 0, "n_boot": 1000},
        rounds=3,
        iterations=1,
        warmup_rounds=0,
    )
    assert result.n == N_ITEMS and result.summary["strict"]["open_recall"].ci_low is not None
    t = _min_time(benchmark)
    if t is not None:
        _TIMES["fast_100k"] = t
        benchmark.extra_info["items"] = N_ITEMS


def test_fast_path_is_at_least_5x_faster(benchmark):
    if "reference_100k" not in _TIMES or "fast_100k" not in _TIMES:
        pytest.skip("needs both benchmarks above in this run (with benchmarking enabled)")
    ratio = _TIMES["reference_100k"] / _TIMES["fast_100k"]
    benchmark.extra_info.update(_TIMES, speedup=ratio)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # keeps this test in --benchmark-only runs
    print(
        f"\nreference port (scaled to {N_ITEMS:,}): {_TIMES['reference_100k']:.2f} s; "
        f"fast path: {_TIMES['fast_100k']:.2f} s; speed-up {ratio:.1f}x"
    )
    assert ratio >= MIN_SPEEDUP, f"fast path only {ratio:.1f}x faster than the reference port"
