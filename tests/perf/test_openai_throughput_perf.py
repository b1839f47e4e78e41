"""Throughput of stage-2 style sampling through `openai:` against a loopback server with latency.

The server (a real HTTP server on 127.0.0.1) answers each request after `LATENCY` seconds and serves
at most `CAPACITY` requests at once, like a GPU server whose batch is full. The client sends
`N_QUESTIONS` questions × 2 sampled answers, each request with its own seed, at several
`max_concurrency` settings, all measured in this one run. Throughput should grow with concurrency
until the server saturates, then stay flat; the last test prints the ratios and checks that shape.
"""

from __future__ import annotations

import pytest
from medvqa.models.openai import OpenAIModel
from medvqa.types import GenerationRequest, GenerationSettings, Prompt

from tests._openai_server import fake_key, fake_openai, openai_server, write_png  # noqa: F401

N_QUESTIONS = 12
N_ANSWERS = 2
LATENCY = 0.08
CAPACITY = 6
CONCURRENCY = (1, 3, 6, 12)
SETTINGS = GenerationSettings(max_new_tokens=16, do_sample=True, temperature=1.2, top_p=0.95)
_RESULTS: dict[int, float] = {}


def _requests(image: str) -> list[GenerationRequest]:
    out = []
    for q in range(N_QUESTIONS):
        prompt = Prompt(
            messages=({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"q{q}?"}]},)
        )
        out += [
            GenerationRequest(image, prompt, id=f"q{q}-a{a}", seed=1000 * q + a) for a in range(N_ANSWERS)
        ]
    return out


@pytest.mark.parametrize("concurrency", CONCURRENCY)
def test_sampling_throughput(benchmark, fake_openai, fake_key, tmp_path, concurrency) -> None:  # noqa: F811
    image = tmp_path / "img.png"
    write_png(image)
    fake_openai.delay, fake_openai.capacity = LATENCY, CAPACITY
    fake_openai.reply = lambda body: f"answer with seed {body['seed']}"
    model = OpenAIModel(
        f"vlm@{fake_openai.base_url}", api_key_env="MEDVQA_TEST_KEY", max_concurrency=concurrency, timeout=30
    )
    requests = _requests(str(image))
    out = benchmark.pedantic(
        model.generate, args=(requests, SETTINGS), rounds=2, iterations=1, warmup_rounds=0
    )
    assert out == [f"answer with seed {r.seed}" for r in requests]  # in order, each with its own seed
    assert fake_openai.max_in_flight <= concurrency  # bounded
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        _RESULTS[concurrency] = len(requests) / stats.stats.min
        benchmark.extra_info["requests_per_s"] = _RESULTS[concurrency]
    model.close()


def test_throughput_scales_until_the_server_saturates(benchmark) -> None:
    if set(CONCURRENCY) - set(_RESULTS):
        pytest.skip("needs every concurrency above in this run (with benchmarking enabled)")
    base = _RESULTS[1]
    ratios = {c: _RESULTS[c] / base for c in CONCURRENCY}
    print(
        "\nopenai sampling throughput (requests/s, ratio to concurrency 1; server capacity "
        f"{CAPACITY}, latency {LATENCY * 1000:.0f} ms, at most {CAPACITY / LATENCY:.0f}/s): "
        + ", ".join(f"c={c}: {_RESULTS[c]:.1f}/s ({ratios[c]:.2f}x)" for c in CONCURRENCY)
    )
    assert ratios[3] >= 2.0, ratios  # ideal 3
    assert ratios[6] >= 1.2 * ratios[3], ratios  # ideal 2x more: still scaling up to the capacity
    # past the capacity: bounded by what the server can serve, not doubled by doubling concurrency
    assert _RESULTS[12] <= 1.05 * CAPACITY / LATENCY and ratios[12] < 1.5 * ratios[6], ratios
