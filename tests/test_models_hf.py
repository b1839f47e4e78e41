"""The hf: adapter on the tiny LLaVA: specs, batch-size invariance, fingerprints, adapters, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from medvqa.errors import BadInput
from medvqa.models import load_model, parse_model_spec
from medvqa.models.hf import HFModel, render_prompt_text
from medvqa.prompts import get_policy
from medvqa.types import GenerationRequest, GenerationSettings, Prompt


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(f"hf:{tiny_model_dir}")


@pytest.fixture(scope="module")
def requests_(phantom_root):
    from medvqa.benchmarks.phantom import Phantom

    policy = get_policy("short-answer")
    samples = Phantom().load("test", phantom_root)[:24]
    return [GenerationRequest(s.image, policy.render(s.question, s.answer_type), s.id) for s in samples]


def test_parse_model_spec() -> None:
    assert parse_model_spec("hf:runs/x,adapter=a,dtype=bfloat16") == (
        "hf",
        "runs/x",
        {"adapter": "a", "dtype": "bfloat16"},
    )
    assert parse_model_spec("llava-hf/llava-1.5-7b-hf") == ("hf", "llava-hf/llava-1.5-7b-hf", {})
    assert parse_model_spec("/abs/path,device=cpu") == ("hf", "/abs/path", {"device": "cpu"})
    assert parse_model_spec("openai:gpt-4o@http://127.0.0.1:8000/v1,max_concurrency=2") == (
        "openai",
        "gpt-4o@http://127.0.0.1:8000/v1",
        {"max_concurrency": "2"},
    )
    with pytest.raises(BadInput, match="key=value"):
        parse_model_spec("hf:x,adapter")
    with pytest.raises(BadInput, match="unexpected keyword"):
        load_model("hf:/nonexistent,colour=blue")


def test_batched_generation_equals_batch_of_one(tiny, requests_) -> None:
    settings = GenerationSettings(max_new_tokens=6)
    one = [tiny.generate([r], settings)[0] for r in requests_]
    batched = []
    for i in range(0, len(requests_), 8):
        batched += tiny.generate(requests_[i : i + 8], settings)
    assert batched == one
    assert all(isinstance(t, str) and t for t in one)
    assert tiny.tokenizer.padding_side == "left"


def test_raw_text_prompt_used_verbatim(tiny, requests_) -> None:
    chat = requests_[0].prompt
    text = render_prompt_text(tiny.processor, chat)
    assert text.startswith("<s><user> <image> ") and text.endswith("<assistant>")
    # the same string given as a raw prompt: the tokenizer adds no BOS here, so identical inputs
    raw = GenerationRequest(requests_[0].image, Prompt(text=text, policy="raw"))
    a = tiny.encode([requests_[0]])["input_ids"]
    b = tiny.encode([raw])["input_ids"]
    assert a.tolist() == b.tolist()
    settings = GenerationSettings(max_new_tokens=4)
    assert tiny.generate([raw], settings) == tiny.generate([requests_[0]], settings)


def test_fingerprint_tracks_weights(tiny, tiny_model_dir, tmp_path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    assert HFModel.spec_fingerprint(str(copy)) == tiny.fingerprint  # same bytes, same identity
    assert HFModel.spec_fingerprint(str(tiny_model_dir)) == tiny.fingerprint
    assert HFModel.spec_fingerprint(str(tiny_model_dir), dtype="bfloat16") != tiny.fingerprint
    # one changed weight = a new checkpoint
    from safetensors.torch import load_file, save_file

    weights = load_file(copy / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 1e-3
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    assert HFModel.spec_fingerprint(str(copy)) != tiny.fingerprint


def _lora(base_dir, out, seed: int = 0):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(out)
    return out


def test_peft_adapter_not_merged(tiny, tiny_model_dir, requests_, tmp_path) -> None:
    from peft import PeftModel

    adapter = _lora(tiny_model_dir, tmp_path / "lora")
    with_adapter = load_model(f"hf:{tiny_model_dir},adapter={adapter}")
    assert isinstance(with_adapter.model, PeftModel)  # applied, not merged
    assert with_adapter.fingerprint != tiny.fingerprint
    settings = GenerationSettings(max_new_tokens=6)
    assert with_adapter.generate(requests_[:8], settings) != tiny.generate(requests_[:8], settings)
    # a folder holding only the adapter loads its base from adapter_config.json (trainer checkpoints)
    alone = load_model(f"hf:{adapter}")
    assert alone.fingerprint == with_adapter.fingerprint
    assert alone.generate(requests_[:4], settings) == with_adapter.generate(requests_[:4], settings)


def test_adapter_that_does_not_fit(tiny_model_dir, tmp_path) -> None:
    from medvqa.models.tiny import init_tiny, preset_config

    other = init_tiny(tmp_path / "wide", preset_config("phantom", hidden=64, heads=2, corpus="builtin"))
    adapter = _lora(other, tmp_path / "wide-lora")
    with pytest.raises(BadInput, match="adapter does not fit") as err:
        load_model(f"hf:{tiny_model_dir},adapter={adapter}")
    assert err.value.field == "adapter"
    with pytest.raises(BadInput, match="adapter folder does not exist"):
        load_model(f"hf:{tiny_model_dir},adapter={tmp_path / 'nope'}")


def test_bad_models(tmp_path) -> None:
    with pytest.raises(BadInput, match="does not exist"):
        load_model(f"hf:{tmp_path / 'missing' / 'model'}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BadInput, match="not a model folder"):
        load_model(f"hf:{empty}")
    from transformers import LlamaConfig

    text_only = tmp_path / "text-only"
    LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, vocab_size=10).save_pretrained(
        text_only
    )
    with pytest.raises(BadInput, match="not an image-text model"):
        load_model(f"hf:{text_only}")
    (text_only / "config.json").write_text(json.dumps({"model_type": "llava_mistral"}))
    with pytest.raises(BadInput, match="convert-llava"):
        load_model(f"hf:{text_only}")


def test_hub_id_offline_is_clear(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BadInput, match="not in the local cache and HF_HUB_OFFLINE is set"):
        load_model("hf:medvqa-test/definitely-not-cached")


def test_image_that_does_not_decode(tiny, requests_, tmp_path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    req = GenerationRequest(str(bad), requests_[0].prompt, "q-broken")
    with pytest.raises(BadInput, match="does not decode") as err:
        tiny.generate([requests_[1], req], GenerationSettings(max_new_tokens=2))
    assert err.value.field == "image" and "q-broken" in str(err.value) and str(bad) in str(err.value)
    with pytest.raises(BadInput, match="not found"):
        tiny.generate(
            [GenerationRequest(str(tmp_path / "nope.png"), requests_[0].prompt)], GenerationSettings()
        )


def test_sampling_is_seeded(tiny, requests_) -> None:
    """Same seed, same answers; and it really samples: another seed, or greedy decoding, differ
    (a sampler that ignored do_sample or the seed would pass a same-vs-same check alone)."""
    import dataclasses

    s = GenerationSettings(max_new_tokens=6, do_sample=True, temperature=1.5, top_p=1.0, seed=3)
    first = tiny.generate(requests_[:4], s)
    assert first == tiny.generate(requests_[:4], s)
    assert tiny.generate(requests_[:4], dataclasses.replace(s, seed=4)) != first
    assert tiny.generate(requests_[:4], dataclasses.replace(s, do_sample=False)) != first


def test_repeated_requests_share_one_prefill_and_draw_the_same_samples(tiny, requests_, monkeypatch) -> None:
    """n seeded samples of one question (stage 2's answers): each distinct image + prompt prefills
    once and its cache is copied to its repeats; every sample is the one its request draws alone.
    Inputs that are not one row per request (flattened patches) prefill every row."""
    import dataclasses

    import torch

    reqs = [dataclasses.replace(r, id=f"{r.id}-{k}", seed=100 * i + k) for i, r in enumerate(requests_[:6])
            for k in range(5)]  # fmt: skip
    s = GenerationSettings(max_new_tokens=6, do_sample=True, temperature=1.5, top_p=1.0)
    alone = [tiny.generate([r], s)[0] for r in reqs]  # a batch of one repeats nothing: no sharing
    prefills = []
    real = HFModel._shared_prefill

    def spy(self, inputs, same_as):
        cache = real(self, inputs, same_as)
        prefills.append((len(same_as), len(set(same_as)), cache is not None))
        return cache

    monkeypatch.setattr(HFModel, "_shared_prefill", spy)
    assert tiny.generate(reqs, s) == alone
    assert prefills == [(30, 6, True)]
    assert len(set(alone)) > 6  # one question's samples differ: the shared prefill shares no draw
    ids = torch.ones(4, 5, dtype=torch.long)
    flat = {"input_ids": ids, "attention_mask": ids, "pixel_values": torch.zeros(7, 3)}
    assert real(tiny, flat, [0, 0, 2, 2]) is None


def test_policy_stop_strings_never_break_generation(tiny, requests_) -> None:
    """Stop strings are an optimisation: a tokenizer StopStringCriteria cannot handle just skips it."""
    import dataclasses

    from medvqa.prompts import register_policy

    policy = register_policy(dataclasses.replace(get_policy("plain"), name="test-stop", stop=("###",)))
    reqs = [GenerationRequest(r.image, policy.render("is this a ct?", "CLOSED"), r.id) for r in requests_[:4]]
    plain = [GenerationRequest(r.image, get_policy("plain").render("is this a ct?", "CLOSED")) for r in reqs]
    settings = GenerationSettings(max_new_tokens=4)
    assert tiny.generate(reqs, settings) == tiny.generate(plain, settings)
    assert tiny._usable_stops(("###",)) == ()  # the word-level tiny vocabulary


def test_generate_many_prepares_the_next_batch_in_a_worker_process(
    tiny, requests_, tmp_path, monkeypatch
) -> None:
    """Same answers as batch-by-batch `generate`; batch i+1 is prepared in a forked worker process
    while the model answers batch i (the first, due before anything generates, in this process);
    a batch with a bad image comes back as its BadInput, whole, and the stream goes on, the batch
    after it prepared here. If the worker dies, its batch and the rest are prepared here."""
    import os
    import time

    settings = GenerationSettings(max_new_tokens=6)
    batches = [requests_[i : i + 8] for i in range(0, len(requests_), 8)]
    expected = [tiny.generate(b, settings) for b in batches]
    trace = tmp_path / "prepared.txt"  # "<first request id> <pid>" per prepared batch, any process
    prepare_on_cpu, generate_tokens = tiny._prepare_on_cpu, tiny._generate_tokens
    die_on = [""]

    def traced_prepare(batch, **kwargs):
        if batch[0].id == die_on[0] and os.getpid() != parent:
            os._exit(3)  # the worker process dies mid-stream
        inputs = prepare_on_cpu(batch, **kwargs)
        with open(trace, "a", encoding="utf-8") as fh:
            fh.write(f"{batch[0].id} {os.getpid()}\n")
        return inputs

    def prepared_by() -> dict[str, int]:
        lines = trace.read_text(encoding="utf-8").split() if trace.exists() else []
        return {lines[k]: int(lines[k + 1]) for k in range(0, len(lines), 2)}

    overlapped: list[bool] = []

    def traced_generate(inputs, kwargs, same_as=None):
        if not overlapped:  # batch 1: the worker prepares batch 2 meanwhile (else this waits in vain)
            deadline = time.monotonic() + 20
            while batches[1][0].id not in prepared_by() and time.monotonic() < deadline:
                time.sleep(0.01)
            overlapped.append(batches[1][0].id in prepared_by())
        return generate_tokens(inputs, kwargs, same_as)

    parent = os.getpid()
    monkeypatch.setattr(tiny, "_prepare_on_cpu", traced_prepare)
    monkeypatch.setattr(tiny, "_generate_tokens", traced_generate)
    assert list(tiny.generate_many(batches, settings)) == expected
    by = prepared_by()
    assert by[batches[0][0].id] == parent and overlapped == [True]
    assert {by[b[0].id] for b in batches[1:]} - {parent} and parent not in {by[b[0].id] for b in batches[1:]}

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    broken = [*batches[1][:3], GenerationRequest(str(bad), batches[1][3].prompt, "bad"), *batches[1][4:]]
    trace.unlink()
    out = list(tiny.generate_many([batches[0], broken, batches[2]], settings))
    assert out[0] == expected[0] and out[2] == expected[2]
    assert isinstance(out[1], BadInput) and out[1].field == "image" and str(bad) in str(out[1])
    assert out[1].path is not None and out[1].record == "bad"  # pickled back whole from the worker
    assert prepared_by()[batches[2][0].id] == parent  # after a failed batch: nothing was generating

    trace.unlink()
    die_on[0] = batches[2][0].id
    assert list(tiny.generate_many(batches, settings)) == expected
    assert prepared_by()[batches[2][0].id] == parent  # the dead worker's batch, prepared here


def test_generate_many_without_fork_prepares_every_batch_in_line(tiny, requests_, monkeypatch) -> None:
    """Where fork is unavailable or unsafe (Windows, macOS) no worker is started: same answers."""
    from medvqa.models import prefetch

    settings = GenerationSettings(max_new_tokens=6)
    batches = [requests_[i : i + 8] for i in range(0, len(requests_), 8)]
    expected = [tiny.generate(b, settings) for b in batches]
    monkeypatch.setattr(prefetch, "can_fork", lambda: False)
    monkeypatch.setattr(prefetch, "ProcessPoolExecutor", None)  # would fail if a pool were made
    assert list(tiny.generate_many(batches, settings)) == expected


def test_generate_many_finishes_each_batch_in_the_worker_in_order(
    tiny, requests_, tmp_path, monkeypatch
) -> None:
    """With `finish`, batch i's answers are decoded and finished in the worker while batch i+1
    generates, and the stream yields finish(i, answers) in batch order, a bad batch's BadInput in
    its place; a finish lost with a dead worker is done here. Without fork: the same results."""
    import os

    from medvqa.models import prefetch

    settings = GenerationSettings(max_new_tokens=6)
    batches = [requests_[i : i + 8] for i in range(0, len(requests_), 8)]
    assert len(batches) >= 3
    expected = [tiny.generate(b, settings) for b in batches]
    parent = os.getpid()

    def finish(index, answers):
        return index, os.getpid(), answers

    out = list(tiny.generate_many(batches, settings, finish))
    assert [(i, a) for i, _, a in out] == list(enumerate(expected))
    assert parent not in {pid for _, pid, _ in out}  # all decoded and finished in the worker

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    broken = [*batches[1][:3], GenerationRequest(str(bad), batches[1][3].prompt, "bad"), *batches[1][4:]]
    out = list(tiny.generate_many([batches[0], broken, batches[2]], settings, finish))
    assert [o[0] for o in (out[0], out[2])] == [0, 2] and isinstance(out[1], BadInput)
    assert [out[0][2], out[2][2]] == [expected[0], expected[2]]

    def dies_on_batch_1(index, answers):
        if index == 1 and os.getpid() != parent:
            os._exit(3)  # the worker dies while finishing
        return finish(index, answers)

    out = list(tiny.generate_many(batches, settings, dies_on_batch_1))
    assert [(i, a) for i, _, a in out] == list(enumerate(expected))
    assert out[1][1] == parent  # redone here

    monkeypatch.setattr(prefetch, "can_fork", lambda: False)
    out = list(tiny.generate_many(batches, settings, finish))
    assert out == [(i, parent, a) for i, a in enumerate(expected)]


def test_the_worker_dies_with_a_process_that_exits_without_closing_it(tmp_path) -> None:
    """A forked sweep job leaves by `os._exit`, a killed eval by no exit code at all: the kernel
    kills the worker when its parent ends (prctl PDEATHSIG), so none is left behind (holding the
    parent's stdout here: `subprocess.run` would wait for it until its timeout)."""
    import subprocess
    import sys
    import time

    from medvqa.models.prefetch import can_fork

    if not can_fork():
        pytest.skip("no forked worker on this platform")
    script = (
        "import os, sys\n"
        "from medvqa.models.prefetch import Prefetcher\n"
        "p = Prefetcher(lambda batch: {'n': len(batch)})\n"
        "assert p.result(p.prepare([1, 2])) == {'n': 2}\n"
        "print(*p.pool._processes, flush=True)\n"
        "os._exit(0)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    (worker,) = map(int, done.stdout.split())

    def alive(pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return False
        return state not in ("Z", "X")  # a zombie waiting for a reaper has ended

    deadline = time.monotonic() + 20
    while alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(worker)


def test_the_vision_tower_encodes_each_distinct_image_once_with_the_same_outputs(tiny, requests_) -> None:
    """Generation encodes a batch's repeated images once (`_each_image_once`): the tower's layers
    see the distinct rows only, and every output (hidden states included) is the same tensors as
    encoding every row; the answers are those of generating with every row encoded."""
    import torch
    from medvqa.models.hf import _each_image_once

    tower = tiny._per_image_vision_tower()
    assert tower is not None
    distinct = list({r.image: r for r in requests_}.values())[:3]
    assert len(distinct) == 3
    repeated = [distinct[i % 3] for i in range(8)]  # 3 images, 8 rows
    pixels = tiny.prepare(repeated)["pixel_values"]
    seen: list[int] = []
    probe = tower.embeddings.register_forward_pre_hook(lambda m, args: seen.append(len(args[0])))
    try:
        with torch.inference_mode():
            every = tower(pixels, output_hidden_states=True)
            with _each_image_once(tower):
                once = tower(pixels, output_hidden_states=True)
                as_tuple = tower(pixels, output_hidden_states=True, return_dict=False)
    finally:
        probe.remove()
    assert seen == [8, 3, 3]
    assert torch.equal(once.last_hidden_state, every.last_hidden_state)
    assert torch.equal(once.pooler_output, every.pooler_output)
    assert len(once.hidden_states) == len(every.hidden_states)
    assert all(torch.equal(a, b) for a, b in zip(once.hidden_states, every.hidden_states))
    assert torch.equal(as_tuple[0], every.last_hidden_state)
    assert all(torch.equal(a, b) for a, b in zip(as_tuple[2], every.hidden_states))
    assert not tower._forward_hooks and not tower._forward_pre_hooks  # removed on leaving

    settings = GenerationSettings(max_new_tokens=6)
    answers = tiny.generate(repeated, settings)
    tiny.__dict__["_vision_tower"] = None  # every row encoded
    try:
        assert tiny.generate(repeated, settings) == answers
    finally:
        del tiny.__dict__["_vision_tower"]


def test_each_distinct_image_and_prompt_is_prepared_once_with_the_same_inputs(tiny, requests_) -> None:
    """A batch repeating images and questions gives the same tensors as the processor on every one."""
    import torch
    from medvqa.models import hf

    reqs = [*requests_[:6], *requests_[:3], requests_[0]]
    assert len({r.image for r in reqs}) < len(reqs)
    texts = [render_prompt_text(tiny.processor, r.prompt) for r in reqs]
    plain = tiny.processor(
        images=[hf.load_image(r.image) for r in reqs],
        text=texts,
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )
    calls: list[int] = []
    inner = tiny.processor.image_processor

    def counted(images, *args, **kwargs):
        calls.append(len(images))
        return inner(images, *args, **kwargs)

    rendered: dict[str, str] = {}
    distinct = hf._DistinctRows(counted, id)
    images = hf._decode_images(reqs)
    pairs = [(i, j) for i in range(len(reqs)) for j in range(len(reqs))]
    assert all((images[i] is images[j]) == (reqs[i].image == reqs[j].image) for i, j in pairs)
    out = distinct(images, return_tensors="pt")
    assert calls == [len({r.image for r in reqs})]
    assert torch.equal(out["pixel_values"], plain["pixel_values"])
    inputs = tiny.encode(reqs, rendered=rendered)
    assert tiny.processor.image_processor is inner and tiny.processor.tokenizer is tiny.tokenizer  # put back
    assert type(tiny.tokenizer).__name__ != "_DistinctRows"
    words = [t.replace("<image>", "<image>" * 4) for t in texts]
    calls.clear()

    def counted_texts(batch, *args, **kwargs):
        calls.append(len(batch))
        return tiny.tokenizer(batch, *args, **kwargs)

    tokens = hf._DistinctRows(counted_texts, hf._by_value)(words, return_tensors="pt", padding=True)
    every = tiny.tokenizer(words, return_tensors="pt", padding=True)
    assert calls == [len(set(words))] < [len(words)]
    assert set(tokens) == set(every) and all(torch.equal(tokens[k], every[k]) for k in every)
    assert set(inputs) == set(plain) and all(torch.equal(inputs[k], plain[k]) for k in plain)
    assert len(rendered) == len({json.dumps(r.prompt.messages) for r in reqs})
    assert tiny._render_texts(reqs, rendered) == texts


def test_distinct_rows_fall_back_where_outputs_are_not_rows_per_item() -> None:
    """An image processor whose outputs are not one tensor row per image gets every image, as before."""
    import torch
    from medvqa.models import hf

    seen: list[list[object]] = []

    def sizes(images, **kwargs):
        seen.append(list(images))
        return {"pixel_values": torch.zeros(len(images), 2), "image_sizes": [[1, 1]] * len(images)}

    a, b = object(), object()
    out = hf._DistinctRows(sizes, id)([a, b, a])
    assert [len(x) for x in seen] == [2, 3] and len(out["image_sizes"]) == 3
