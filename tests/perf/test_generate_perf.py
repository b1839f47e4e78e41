"""Speed of `hf:` generation: the tiny LLaVA answering 64 Phantom questions one at a time vs batched.

Both runs generate greedily with the same settings through `HFModel.generate` (image decoding,
chat-template rendering, processor, `model.generate`, decoding: everything `medvqa eval` does per
batch). Batched generation pads on the left and must give exactly the same text as batch size 1.
Both are measured in this one run (minimum over rounds, robust to noisy neighbours); the last test
asserts batched reaches at least 5× the samples/s of batch size 1, with identical outputs.
"""

from __future__ import annotations

import pytest
from medvqa.prompts import get_policy
from medvqa.types import GenerationRequest, GenerationSettings

N_QUESTIONS = 64
BATCH_SIZE = 32
MIN_SPEEDUP = 5.0
SETTINGS = GenerationSettings(max_new_tokens=16)
_RESULTS: dict[str, dict] = {}


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    import torch
    from medvqa.models import load_model

    torch.set_num_threads(1)  # a fair, stable comparison on a shared 2-core machine
    return load_model(f"hf:{tiny_model_dir}")


@pytest.fixture(scope="module")
def requests_(phantom_root):
    from medvqa.benchmarks.phantom import Phantom

    policy = get_policy("short-answer")
    samples = Phantom().load("test", phantom_root)[:N_QUESTIONS]
    assert len(samples) == N_QUESTIONS
    return [GenerationRequest(s.image, policy.render(s.question, s.answer_type), s.id) for s in samples]


def _one_at_a_time(model, requests):
    return [model.generate([r], SETTINGS)[0] for r in requests]


def _batched(model, requests):
    out = []
    for i in range(0, len(requests), BATCH_SIZE):
        out += model.generate(requests[i : i + BATCH_SIZE], SETTINGS)
    return out


def _record(name, benchmark, outputs):
    stats = getattr(benchmark, "stats", None)
    t = None if stats is None else stats.stats.min
    _RESULTS[name] = {"seconds": t, "outputs": outputs}
    if t is not None:
        benchmark.extra_info["questions"] = N_QUESTIONS
        benchmark.extra_info["samples_per_s"] = N_QUESTIONS / t


def test_generate_batch1(benchmark, model, requests_):
    outputs = benchmark.pedantic(
        _one_at_a_time, args=(model, requests_), rounds=3, iterations=1, warmup_rounds=1
    )
    assert len(outputs) == N_QUESTIONS
    _record("batch1", benchmark, outputs)


def test_generate_batched(benchmark, model, requests_):
    outputs = benchmark.pedantic(_batched, args=(model, requests_), rounds=5, iterations=1, warmup_rounds=1)
    assert len(outputs) == N_QUESTIONS
    _record("batched", benchmark, outputs)


def test_batched_is_5x_faster_with_identical_outputs(benchmark):
    if {"batch1", "batched"} - set(_RESULTS) or any(r["seconds"] is None for r in _RESULTS.values()):
        pytest.skip("needs both benchmarks above in this run (with benchmarking enabled)")
    one, batched = _RESULTS["batch1"], _RESULTS["batched"]
    assert batched["outputs"] == one["outputs"], "batched generation changed the answers"
    ratio = one["seconds"] / batched["seconds"]
    rate1, rate_b = N_QUESTIONS / one["seconds"], N_QUESTIONS / batched["seconds"]
    benchmark.extra_info.update(samples_per_s_batch1=rate1, samples_per_s_batched=rate_b, speedup=ratio)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # keeps this test in --benchmark-only runs
    print(
        f"\n{N_QUESTIONS} questions, {SETTINGS.max_new_tokens} new tokens: batch 1 {one['seconds']:.2f} s "
        f"({rate1:.0f} q/s); batch {BATCH_SIZE} {batched['seconds']:.2f} s ({rate_b:.0f} q/s); "
        f"speed-up {ratio:.1f}x; outputs identical"
    )
    assert ratio >= MIN_SPEEDUP, f"batched generation only {ratio:.1f}x the samples/s of batch size 1"
