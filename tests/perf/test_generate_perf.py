"""Speed of `hf:` generation, two comparisons, each measured side by side in one run.

1. Batched vs batch size 1: the tiny LLaVA answering 64 Phantom questions one at a time vs in
   batches of 32 through `HFModel.generate` (image decoding, chat-template rendering, processor,
   `model.generate`, decoding). Batched generation pads on the left and must give exactly the same
   text as batch size 1; asserted >= 5x the samples/s, with identical outputs.
2. `medvqa eval`'s generation step vs raw `model.generate` on the same pre-encoded batches, at the
   demo's eval size (a Phantom test split of 1,200 questions, batch 64, 8 new tokens; interleaved
   rounds, the median of paired ratios): the wall-time (throughput) ratio asserted >= 0.9x (issue
   15), the generating thread's CPU-time ratio printed beside it. The next batch is prepared, and
   the last one decoded into answer rows, in a forked worker process (`models.prefetch`): in a
   thread it competed with the tiny model's Python-bound generate loop for the GIL (0.85-0.90x).
"""

from __future__ import annotations

import time

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


# --- `medvqa eval`'s generation step vs raw `model.generate` on the same batches (issue 15) -------
#
# raw: the batches already encoded (pixel values, token ids on the device), timed around
# `model.generate` alone, greedy, same kwargs: the model's own work and nothing else.
# eval: `generate_predictions` — what `medvqa eval` runs for each batch: render the prompts, decode
# the images, process and tokenize, generate, decode the text, apply the policy, build the answer
# rows and append + fsync them to predictions.jsonl. HFModel.generate_many prepares batch i+1 in a
# forked worker process while the model answers batch i, and each distinct image and prompt once.

N_THROUGHPUT = 1200  # the demo's Phantom test split; steady state, as a real benchmark's eval runs
THROUGHPUT_BATCH = 64  # the demo's [generation] batch_size
MIN_EVAL_VS_RAW = 0.9
EVAL_SETTINGS = {"max_new_tokens": 8}


@pytest.fixture(scope="module")
def eval_plan(model, tmp_path_factory):
    from medvqa.benchmarks.phantom import PhantomConfig, write_phantom
    from medvqa.evaluate import EvalConfig
    from medvqa.evaluation.plan import make_plan

    root = tmp_path_factory.mktemp("gen-perf-data") / "phantom"
    write_phantom(root, PhantomConfig(seed=0, train_images=10, test_images=300, size=32))
    cfg = EvalConfig(
        model=model.spec,
        benchmark="phantom",
        root=str(root),
        out=str(tmp_path_factory.mktemp("gen-perf") / "run"),
        limit=N_THROUGHPUT,
        batch_size=THROUGHPUT_BATCH,
        **EVAL_SETTINGS,
    )
    plan = make_plan(cfg, model.spec)
    assert len(plan.samples) == N_THROUGHPUT
    return plan


def _raw_inputs(model, plan):
    from medvqa.evaluation.generate import _request

    policy = plan.generation_policy
    requests = [_request(policy, s) for s in plan.samples]
    batches = [requests[i : i + THROUGHPUT_BATCH] for i in range(0, len(requests), THROUGHPUT_BATCH)]
    return [(model.prepare(b), model._gen_kwargs(b, plan.settings)) for b in batches]


def _raw_generate(model, encoded):
    import torch

    with torch.inference_mode():
        return [model.model.generate(**inputs, **kwargs) for inputs, kwargs in encoded]


def _eval_generate(model, plan, out):
    """The predictions file written; read back after the clock stops, as raw's tokens are decoded."""
    import dataclasses

    from medvqa.distributed import Dist
    from medvqa.evaluation.generate import generate_predictions

    run = dataclasses.replace(plan, out=out)
    generate_predictions(
        run, model, run.key(model.fingerprint), Dist(), batch_size=THROUGHPUT_BATCH, skip_bad=False,
        progress=False, log=lambda m: None,
    )  # fmt: skip
    return out / "predictions.jsonl"


class _BatchByBatch:
    """The model without `generate_many`: the eval path preparing each batch only when it is due."""

    def __init__(self, model):
        self.inner, self.spec, self.fingerprint = model, model.spec, model.fingerprint

    def generate(self, requests, settings):
        return self.inner.generate(requests, settings)


ROUNDS = 9  # one round moves by up to 25% with a shared machine's load
EVAL_ROUNDS = 15  # the eval-vs-raw ratio: the median of 15 paired rounds (see the test)


def _timed(fn, *args):
    """(wall seconds, this thread's CPU seconds, result). Wall time is the throughput asserted; the
    thread's CPU time (what the loop costs on its own critical path, leaving out waits for the
    prefetch worker and fsync) is printed beside it to tell the two kinds of overhead apart."""
    wall, cpu = time.perf_counter(), time.thread_time()
    result = fn(*args)
    return time.perf_counter() - wall, time.thread_time() - cpu, result


def test_eval_generation_vs_raw_model_generate(benchmark, model, eval_plan, tmp_path):
    """Rounds interleaved (raw, eval, eval without prefetch); the ratio asserted is the median over
    rounds of raw's time / eval's time in the same round. A pair shares the machine's state, and the
    median is robust to a neighbour's burst in either direction; the minimum per side, printed
    beside it, takes each side's luckiest round (0.81-0.96x in three runs of one commit here)."""
    import statistics

    encoded = _raw_inputs(model, eval_plan)
    sides = ("raw", "eval", "eval_no_prefetch")
    wall: dict[str, list[float]] = {k: [] for k in sides}
    cpu: dict[str, list[float]] = {k: [] for k in sides}
    outputs: dict[str, list] = {}
    for r in range(EVAL_ROUNDS + 1):  # round 0 warms up
        runs = {
            "raw": (_raw_generate, model, encoded),
            "eval": (_eval_generate, model, eval_plan, tmp_path / f"eval{r}"),
            "eval_no_prefetch": (_eval_generate, _BatchByBatch(model), eval_plan, tmp_path / f"plain{r}"),
        }
        for side, (fn, *args) in runs.items():
            w, c, outputs[side] = _timed(fn, *args)
            if r:
                wall[side].append(w)
                cpu[side].append(c)
    texts = []
    for out, (inputs, _) in zip(outputs["raw"], encoded):
        new = out[:, inputs["input_ids"].shape[1] :]
        texts += [eval_plan.generation_policy.postprocess(t) for t in model._decode(new)]
    from medvqa.io import read_jsonl

    answers = {k: [row["text"] for row in read_jsonl(outputs[k])] for k in ("eval", "eval_no_prefetch")}
    assert answers["eval"] == texts == answers["eval_no_prefetch"], "the eval path changed the answers"
    assert outputs["eval"].read_bytes() == outputs["eval_no_prefetch"].read_bytes()

    def paired(side: str, times: dict[str, list[float]]) -> float:
        return statistics.median(raw / t for raw, t in zip(times["raw"], times[side]))

    ratio = {k: paired(k, wall) for k in sides}
    ratio_cpu = {k: paired(k, cpu) for k in sides}
    best = {k: min(v) for k, v in wall.items()}
    ratio_best = {k: best["raw"] / best[k] for k in sides}
    benchmark.extra_info.update({f"{k}_wall_s_best": v for k, v in best.items()})
    benchmark.extra_info.update(
        eval_vs_raw=ratio["eval"], eval_vs_raw_cpu=ratio_cpu["eval"], eval_vs_raw_best=ratio_best["eval"]
    )
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # keeps this test in --benchmark-only runs
    median = {k: statistics.median(v) for k, v in wall.items()}
    print(
        f"\n{N_THROUGHPUT} questions, batch {THROUGHPUT_BATCH}, {EVAL_SETTINGS['max_new_tokens']} new tokens, "
        f"{EVAL_ROUNDS} interleaved rounds; raw model.generate median {median['raw']:.2f} s, best "
        f"{best['raw']:.2f} s ({N_THROUGHPUT / median['raw']:.0f} q/s)\n"
        f"  eval generation step: {ratio['eval']:.2f}x raw (median of paired rounds; best of each "
        f"side {ratio_best['eval']:.2f}x), generating thread's CPU {ratio_cpu['eval']:.2f}x\n"
        f"  without prefetch:     {ratio['eval_no_prefetch']:.2f}x raw (best of each side "
        f"{ratio_best['eval_no_prefetch']:.2f}x), CPU {ratio_cpu['eval_no_prefetch']:.2f}x"
    )
    assert ratio["eval"] >= MIN_EVAL_VS_RAW, (
        f"eval generation at {ratio['eval']:.2f}x raw model.generate's wall-clock throughput "
        f"({ratio_cpu['eval']:.2f}x on the generating thread's CPU time)"
    )


# --- stage 2's sampled answers: n seeded samples of each question share one prefill ---------------
#
# raw: `model.generate` on the same pre-encoded batches with the same seeded sampler, every row
# prefilled. harness: `HFModel.generate_many`, which prefills each distinct image + prompt once and
# copies its cache to the question's other samples (`HFModel._shared_prefill`). The same answers.

N_SAMPLES = 10  # the demo's n_answers
SAMPLE_BATCH = 250  # ~the phantom preset's generation_batch_size (256), whole questions per batch
SAMPLE_SETTINGS = GenerationSettings(max_new_tokens=8, do_sample=True, temperature=1.5, top_p=1.0)
MIN_SHARED_PREFILL_SPEEDUP = 1.3


def test_sampled_answers_share_the_prefill_vs_raw_model_generate(benchmark, model, requests_):
    import dataclasses

    sampled = [dataclasses.replace(r, id=f"{r.id}-{k}", seed=N_SAMPLES * i + k)
               for i, r in enumerate(requests_) for k in range(N_SAMPLES)]  # fmt: skip
    batches = [sampled[i : i + SAMPLE_BATCH] for i in range(0, len(sampled), SAMPLE_BATCH)]
    inputs = [model.prepare(b) for b in batches]

    def harness():
        return [a for answers in model.generate_many(batches, SAMPLE_SETTINGS) for a in answers]

    best = {"raw": float("inf"), "harness": float("inf")}
    for r in range(ROUNDS + 1):  # round 0 warms up; interleaved, minimum per side
        # fresh samplers each round (a seeded sampler's generators advance as it draws)
        encoded = [(x, model._gen_kwargs(b, SAMPLE_SETTINGS)) for x, b in zip(inputs, batches)]
        for side, (fn, *args) in (("raw", (_raw_generate, model, encoded)), ("harness", (harness,))):
            wall, _, out = _timed(fn, *args)
            best[side] = min(best[side], wall) if r else best[side]
            if side == "raw":
                raw_out = out
            else:
                harness_out = out
    raw_texts = [t for o, x in zip(raw_out, inputs) for t in model._decode(o[:, x["input_ids"].shape[1] :])]
    assert harness_out == raw_texts, "sharing the prefill changed a sample"
    assert len(set(harness_out)) > len(requests_)  # they are samples, not one answer per question
    ratio = best["raw"] / best["harness"]
    benchmark.extra_info.update(raw_s=best["raw"], harness_s=best["harness"], harness_vs_raw=ratio)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    print(
        f"\n{len(requests_)} questions x {N_SAMPLES} seeded samples, batch {SAMPLE_BATCH}: raw model.generate "
        f"{best['raw']:.2f} s, generate_many with a shared prefill {best['harness']:.2f} s ({ratio:.2f}x raw)"
    )
    assert ratio >= MIN_SHARED_PREFILL_SPEEDUP, f"sampled answers at {ratio:.2f}x raw model.generate"
