"""The `openai:` adapter against a real OpenAI-compatible HTTP server on 127.0.0.1."""
# ruff: noqa: F811 - the loopback-server fixtures are imported from tests._openai_server

from __future__ import annotations

import base64
import io
import logging
import time

import pytest
from medvqa.errors import BadInput
from medvqa.models.openai import OpenAIModel, split_target
from medvqa.openai_support import EndpointError, image_data_url, parse_retry_after, redact
from medvqa.types import GenerationRequest, GenerationSettings, Prompt, VQAModel

from tests._openai_server import (  # noqa: F401 - fixtures
    FAKE_KEY,
    Fault,
    fake_key,
    fake_openai,
    files_containing,
    openai_server,
    write_png,
)

FAST = {"timeout": 2.0, "max_retries": 3, "backoff": 0.01, "backoff_max": 0.05}


def chat_prompt(question: str) -> Prompt:
    return Prompt(
        messages=(
            {"role": "system", "content": [{"type": "text", "text": "You are a radiologist."}]},
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": question}],
            },
        ),
        policy="short-answer",
    )


def make_model(fake, **options) -> OpenAIModel:
    opts = {**FAST, "api_key_env": "MEDVQA_TEST_KEY", **options}
    return OpenAIModel(f"test-vlm@{fake.base_url}", spec=f"openai:test-vlm@{fake.base_url}", **opts)


@pytest.fixture
def png(tmp_path):
    path = tmp_path / "img.png"
    return path, write_png(path)


def test_chat_round_trip_request_body(fake_openai, fake_key, png) -> None:
    path, data = png
    fake_openai.reply = lambda body: "  yes  "
    model = make_model(fake_openai)
    assert isinstance(model, VQAModel)
    settings = GenerationSettings(max_new_tokens=7, seed=3)
    out = model.generate(
        [GenerationRequest(str(path), chat_prompt("Is there a fracture?"), id="q1")], settings
    )
    assert out == ["yes"]
    (body,) = fake_openai.bodies
    assert body["model"] == "test-vlm"
    assert body["temperature"] == 0.0 and body["max_tokens"] == 7 and body["seed"] == 3
    assert "top_p" not in body  # greedy: no nucleus sampling sent
    system, user = body["messages"]
    assert system == {"role": "system", "content": "You are a radiologist."}
    image_part, text_part = user["content"]
    assert text_part == {"type": "text", "text": "Is there a fracture?"}
    assert image_part["type"] == "image_url"
    url = image_part["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == data
    assert fake_openai.auth == [f"Bearer {FAKE_KEY}"]


def test_sampling_settings_and_raw_text_prompt(fake_openai, fake_key, png) -> None:
    _, data = png
    model = make_model(fake_openai, image_detail="low")
    settings = GenerationSettings(max_new_tokens=5, do_sample=True, temperature=1.2, top_p=0.95, seed=11)
    prompt = Prompt(text="<image>\nWhat organ is shown? Answer briefly.", policy="llava-med-raw")
    model.generate([GenerationRequest(data, prompt)], settings)
    (body,) = fake_openai.bodies
    assert body["temperature"] == 1.2 and body["top_p"] == 0.95 and body["seed"] == 11
    (user,) = body["messages"]
    image_part, text_part = user["content"]
    assert image_part["image_url"]["detail"] == "low"
    assert text_part["text"] == "What organ is shown? Answer briefly."  # placeholder removed


def test_order_preserved_and_concurrency_bounded(fake_openai, fake_key, png) -> None:
    path, _ = png
    fake_openai.delay = 0.1
    fake_openai.reply = lambda body: body["messages"][-1]["content"][-1]["text"].upper()
    model = make_model(fake_openai, max_concurrency="3")
    questions = [f"question {i}" for i in range(12)]
    reqs = [GenerationRequest(str(path), chat_prompt(q), id=str(i)) for i, q in enumerate(questions)]
    out = model.generate(reqs, GenerationSettings())
    assert out == [q.upper() for q in questions]
    assert fake_openai.max_in_flight == 3  # bounded, and really concurrent


@pytest.mark.parametrize(
    "fault",
    [
        Fault(status=429, headers={"retry-after-ms": "20"}),
        Fault(status=500),
        Fault(status=503, headers={"retry-after": "0"}),
        Fault(sleep=0.8),  # longer than the client's timeout
    ],
    ids=["429", "500", "503", "timeout"],
)
def test_transient_fault_then_success(fake_openai, fake_key, png, fault) -> None:
    path, _ = png
    fake_openai.faults.append(fault)
    fake_openai.reply = lambda body: "no"
    model = make_model(fake_openai, timeout="0.4")
    assert model.generate([GenerationRequest(str(path), chat_prompt("q"))], GenerationSettings()) == ["no"]
    assert fake_openai.n_requests == 2
    assert model.stats["retries"] == 1 and model.stats["completed"] == 1


def test_retry_after_is_honoured(fake_openai, fake_key, png) -> None:
    path, _ = png
    fake_openai.faults.append(Fault(status=429, headers={"retry-after": "0.6"}))
    model = make_model(fake_openai, backoff="0.0", backoff_max="0.0")
    t0 = time.perf_counter()
    model.generate([GenerationRequest(str(path), chat_prompt("q"))], GenerationSettings())
    assert time.perf_counter() - t0 >= 0.55
    assert parse_retry_after({"retry-after-ms": "250"}) == 0.25
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0
    assert parse_retry_after({"retry-after": "soon"}) is None


def test_retries_exhausted_is_a_clear_error(fake_openai, fake_key, png) -> None:
    path, _ = png
    fake_openai.faults.extend(Fault(status=502) for _ in range(4))
    model = make_model(fake_openai, max_retries="3")
    with pytest.raises(EndpointError, match=r"test-vlm.*HTTP 502.*after 4 attempt") as err:
        model.generate([GenerationRequest(str(path), chat_prompt("q"))], GenerationSettings())
    assert fake_openai.n_requests == 4
    assert FAKE_KEY not in str(err.value)


def test_401_is_bad_input_naming_model_and_url_not_key(fake_openai, fake_key, png) -> None:
    path, _ = png
    # Real servers echo (part of) the key back; the message must not carry it.
    fake_openai.faults.append(Fault(status=401, message=f"Incorrect API key provided: {FAKE_KEY}"))
    model = make_model(fake_openai)
    with pytest.raises(BadInput) as err:
        model.generate([GenerationRequest(str(path), chat_prompt("q"))], GenerationSettings())
    message = str(err.value)
    assert "test-vlm" in message and fake_openai.base_url in message and "MEDVQA_TEST_KEY" in message
    assert "401" in message and FAKE_KEY not in message and "sk-medvqa" not in message
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert fake_openai.n_requests == 1  # not retried


def test_404_is_bad_input_about_model_or_url(fake_openai, fake_key, png) -> None:
    path, _ = png
    fake_openai.faults.append(Fault(status=404, message="The model `test-vlm` does not exist."))
    model = make_model(fake_openai)
    with pytest.raises(BadInput, match=r"test-vlm.*not found.*HTTP 404.*base URL"):
        model.generate([GenerationRequest(str(path), chat_prompt("q"))], GenerationSettings())
    assert fake_openai.n_requests == 1


def test_wrong_port_is_a_connection_error(fake_key, png) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    path, _ = png
    model = OpenAIModel(
        f"m@http://127.0.0.1:{port}/v1", api_key_env="MEDVQA_TEST_KEY", max_retries=1, backoff=0.01, timeout=1
    )
    with pytest.raises(EndpointError, match="could not be reached"):
        model.generate([GenerationRequest(str(path), chat_prompt("q"))], GenerationSettings())


def test_spec_fingerprint_and_missing_key(monkeypatch) -> None:
    assert split_target("gpt-4o") == ("gpt-4o", None)
    assert split_target("org/m@http://h:8000/v1") == ("org/m", "http://h:8000/v1")
    monkeypatch.setenv("KEY_A", "sk-aaaaaaaaaaaaaaaa")
    monkeypatch.setenv("KEY_B", "sk-bbbbbbbbbbbbbbbb")
    a = OpenAIModel("m@http://127.0.0.1:9/v1", api_key_env="KEY_A")
    b = OpenAIModel("m@http://127.0.0.1:9/v1/", key_env="KEY_B")  # alias; trailing slash
    c = OpenAIModel("other@http://127.0.0.1:9/v1", api_key_env="KEY_A")
    assert a.fingerprint == b.fingerprint != c.fingerprint  # the key is not part of the identity
    assert "sk-" not in repr(a) and "sk-" not in repr(a.client)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(BadInput, match="OPENAI_API_KEY is not set"):
        OpenAIModel("gpt-4o")  # the OpenAI API needs a key
    local = OpenAIModel("m@http://127.0.0.1:9/v1")  # a local vLLM server usually does not
    assert local.base_url == "http://127.0.0.1:9/v1"
    with pytest.raises(BadInput, match="unknown openai model option"):
        OpenAIModel("m@http://127.0.0.1:9/v1", colour="blue")
    with pytest.raises(BadInput, match="not an http"):
        OpenAIModel("m@127.0.0.1:9/v1")


def test_load_model_spec_through_registry(fake_openai, fake_key, png) -> None:
    from medvqa.models import load_model

    path, _ = png
    fake_openai.reply = lambda body: "left lung"
    spec = f"openai:test-vlm@{fake_openai.base_url},api_key_env=MEDVQA_TEST_KEY,max_concurrency=2,timeout=5"
    model = load_model(spec)
    assert isinstance(model, OpenAIModel) and model.spec == spec and model.client.max_concurrency == 2
    assert model.generate([GenerationRequest(str(path), chat_prompt("q"))], GenerationSettings()) == [
        "left lung"
    ]


def test_images_other_formats_and_bad_images(tmp_path) -> None:
    from PIL import Image

    Image.new("RGB", (4, 4), (1, 2, 3)).save(tmp_path / "a.jpg", format="JPEG")
    assert image_data_url(tmp_path / "a.jpg").startswith("data:image/jpeg;base64,")
    Image.new("L", (4, 4), 9).save(tmp_path / "a.bmp", format="BMP")
    url = image_data_url(str(tmp_path / "a.bmp"))  # not accepted by the API: re-encoded
    assert url.startswith("data:image/png;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (4, 4)
    with pytest.raises(BadInput, match="not found"):
        image_data_url(str(tmp_path / "missing.png"))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(BadInput, match="cannot be decoded"):
        image_data_url(str(tmp_path / "bad.png"))


def test_response_cache_for_deterministic_requests(fake_openai, fake_key, png, tmp_path) -> None:
    path, _ = png
    fake_openai.reply = lambda body: "yes"
    reqs = [GenerationRequest(str(path), chat_prompt(f"q{i}")) for i in range(3)]
    model = make_model(fake_openai, cache=str(tmp_path / "cache.sqlite"))
    assert model.generate(reqs, GenerationSettings()) == ["yes"] * 3
    model.close()
    again = make_model(fake_openai, cache=str(tmp_path / "cache.sqlite"))
    assert again.generate(reqs, GenerationSettings()) == ["yes"] * 3
    assert fake_openai.n_requests == 3 and again.stats["cache_hits"] == 3
    other = OpenAIModel(
        f"other-vlm@{fake_openai.base_url}",
        api_key_env="MEDVQA_TEST_KEY",
        cache=str(tmp_path / "cache.sqlite"),
    )
    other.generate(reqs[:1], GenerationSettings())  # another model never gets these answers
    assert fake_openai.n_requests == 4


def test_key_never_written_or_logged(fake_openai, fake_key, png, tmp_path, caplog, capsys) -> None:
    path, _ = png
    caplog.set_level(logging.DEBUG)  # everything, including the openai and http client loggers
    fake_openai.reply = lambda body: "yes"
    fake_openai.faults.append(Fault(status=500, message=f"upstream saw {FAKE_KEY}"))
    model = make_model(fake_openai, cache=str(tmp_path / "run" / "cache.sqlite"))
    model.generate([GenerationRequest(str(path), chat_prompt("q"))], GenerationSettings())
    fake_openai.faults.append(Fault(status=401, message=f"Incorrect API key provided: {FAKE_KEY}"))
    with pytest.raises(BadInput) as err:
        model.generate([GenerationRequest(str(path), chat_prompt("other q"))], GenerationSettings())
    model.close()
    out = capsys.readouterr()
    texts = [caplog.text, out.out, out.err, str(err.value), repr(model), repr(model.client), str(model.stats)]
    texts += [str(model.describe()), str(vars(model)), str(vars(model.client))]
    texts += [r.getMessage() for r in caplog.records]
    assert caplog.records  # the loggers did talk
    assert not [t for t in texts if FAKE_KEY in t]
    assert files_containing(tmp_path, FAKE_KEY) == []
    assert (tmp_path / "run" / "cache.sqlite").exists()


def test_redact() -> None:
    assert redact(f"key {FAKE_KEY}!", FAKE_KEY) == "key ***!"
    assert redact("Incorrect API key provided: sk-proj-abcd****wxyz") == "Incorrect API key provided: sk-***"


def test_truncated_png_is_bad_input(tmp_path) -> None:
    data = write_png(tmp_path / "ok.png", size=(16, 16))
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInput, match=r"cut\.png.*cannot be decoded"):
        image_data_url(tmp_path / "cut.png")


def _messages_to_prompt(messages: list[dict]) -> tuple[Prompt, bytes]:
    """What an OpenAI-compatible server does with a request: data URL → image, parts → chat."""
    image = b""
    out = []
    for m in messages:
        content = m["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else []
        for p in [] if isinstance(content, str) else content:
            if p["type"] == "image_url":
                image = base64.b64decode(p["image_url"]["url"].split(",", 1)[1])
                parts.append({"type": "image"})
            else:
                parts.append(p)
        out.append({"role": m["role"], "content": parts})
    return Prompt(messages=tuple(out)), image


def test_served_tiny_model_matches_the_hf_adapter(
    fake_openai, fake_key, phantom_root, tiny_model_dir
) -> None:
    """A real model behind the endpoint (a mini vLLM: the tiny LLaVA in the handler): the
    `openai:` adapter's answers equal the `hf:` adapter's on the same Phantom questions."""
    import threading

    from medvqa.benchmarks.phantom import Phantom
    from medvqa.models.hf import HFModel
    from medvqa.prompts import get_policy

    hf = HFModel(str(tiny_model_dir))
    lock = threading.Lock()

    def serve(body: dict) -> str:
        prompt, image = _messages_to_prompt(body["messages"])
        settings = GenerationSettings(max_new_tokens=body["max_tokens"], seed=body["seed"])
        assert body["temperature"] == 0.0
        with lock:
            return hf.generate([GenerationRequest(image, prompt)], settings)[0]

    fake_openai.reply = serve
    samples = Phantom().load("test", phantom_root)[:4]
    policy = get_policy("short-answer")
    reqs = [GenerationRequest(s.image, policy.render(s.question, s.answer_type), id=s.id) for s in samples]
    settings = GenerationSettings(max_new_tokens=5)
    served = make_model(fake_openai, max_concurrency=3, timeout=120).generate(reqs, settings)
    direct = hf.generate(reqs, settings)
    assert served == direct and any(direct), direct
    assert fake_openai.n_requests == len(samples)


def test_medvqa_eval_with_an_openai_spec(fake_openai, fake_key, phantom_root, tmp_path, capsys) -> None:
    """`medvqa eval --model openai:...` end to end: files written, the spec and fingerprint recorded,
    the key nowhere; a 401 mid-run exits 2 and leaves the flushed predictions intact."""
    import json

    from medvqa.cli import main

    fake_openai.reply = lambda body: "yes"
    spec = f"openai:test-vlm@{fake_openai.base_url},api_key_env=MEDVQA_TEST_KEY,max_concurrency=4"
    out = tmp_path / "eval"
    argv = ["eval", "--model", spec, "--benchmark", "phantom", "--root", str(phantom_root), "--limit", "8"]
    argv += ["--batch-size", "4", "--out", str(out), "--no-progress", "--n-boot", "10"]
    assert main(argv) == 0
    scores = json.loads((out / "scores.json").read_text())
    assert (
        scores["model"]["spec"] == spec
        and scores["model"]["fingerprint"]
        == OpenAIModel(f"test-vlm@{fake_openai.base_url}", api_key_env="MEDVQA_TEST_KEY").fingerprint
    )
    assert scores["n"] == 8 and fake_openai.n_requests == 8
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 8

    # A key revoked mid-run: batch 1 (4 answers) is flushed, batch 2's first request gets 401.
    out2 = tmp_path / "eval-401"
    argv2 = [*argv[:-4], str(out2), "--no-progress", "--n-boot", "10"]
    fake_openai.faults.extend(
        [Fault(), Fault(), Fault(), Fault(), Fault(status=401, message=f"bad key {FAKE_KEY}")]
    )
    assert main(argv2) == 2
    err = capsys.readouterr().err
    assert "test-vlm" in err and "401" in err and FAKE_KEY not in err
    assert len((out2 / "predictions.jsonl").read_text().splitlines()) == 4
    before = fake_openai.n_requests
    assert main(argv2) == 0  # resumes: only the 4 missing answers are asked for
    assert fake_openai.n_requests - before == 4
    assert files_containing(tmp_path, FAKE_KEY) == []


def test_a_reply_that_is_not_a_chat_completion_is_an_endpoint_error(openai_server, fake_key, png) -> None:
    from werkzeug import Response

    path, _ = png
    model = OpenAIModel(f"m@{openai_server.url_for('/v1')}", api_key_env="MEDVQA_TEST_KEY", max_retries=0)
    req = [GenerationRequest(str(path), chat_prompt("q"))]
    for body in ("<html>proxy error</html>", '{"object": "error"}'):
        openai_server.clear()
        openai_server.expect_request("/v1/chat/completions").respond_with_response(
            Response(body, 200, content_type="application/json")
        )
        with pytest.raises(EndpointError, match="not a chat completion"):
            model.generate(req, GenerationSettings())
    openai_server.clear()


def test_400_is_bad_input_naming_the_record(fake_openai, fake_key, png) -> None:
    path, _ = png
    fake_openai.faults.append(Fault(status=400, message="The model does not support image input."))
    model = make_model(fake_openai)
    with pytest.raises(BadInput, match=r"record q7.*HTTP 400.*does not support image input.*accepts images"):
        model.generate([GenerationRequest(str(path), chat_prompt("q"), id="q7")], GenerationSettings())
    assert fake_openai.n_requests == 1  # not retried


def test_retry_after_beyond_the_limit_fails_at_once(fake_openai, fake_key, png) -> None:
    path, _ = png
    fake_openai.faults.append(Fault(status=429, headers={"retry-after": "3600"}, message="quota exhausted"))
    model = make_model(fake_openai)
    with pytest.raises(EndpointError, match=r"HTTP 429: quota exhausted"):
        model.generate([GenerationRequest(str(path), chat_prompt("q"))], GenerationSettings())
    assert fake_openai.n_requests == 1  # an hour-long wait is not sat out


# --- what comes back from an endpoint is stored safely (issue 11, items 6, 11, 13) ----------------


def test_a_lone_surrogate_in_a_reply_is_stored_and_cached(fake_openai, fake_key, png, tmp_path) -> None:
    """`"\\ud800"` is legal JSON but not encodable as UTF-8: the reply is still cached (a rerun pays
    nothing) and written, with U+FFFD in its place."""
    path, _ = png
    fake_openai.reply = lambda body: "yes \ud800 left"
    reqs = [GenerationRequest(str(path), chat_prompt("Which side?"), id="q1")]
    model = make_model(fake_openai, cache=str(tmp_path / "cache.sqlite"))
    assert model.generate(reqs, GenerationSettings()) == ["yes \ufffd left"]
    model.close()
    again = make_model(fake_openai, cache=str(tmp_path / "cache.sqlite"))
    assert again.generate(reqs, GenerationSettings()) == ["yes \ufffd left"]
    assert fake_openai.n_requests == 1 and again.stats["cache_hits"] == 1
    (tmp_path / "cache.sqlite.jsonl").read_text(encoding="utf-8")  # the log is valid UTF-8


def test_medvqa_eval_survives_a_surrogate_reply_and_reruns_without_paying(
    fake_openai, fake_key, phantom_root, tmp_path
) -> None:
    from medvqa.cli import main

    fake_openai.reply = lambda body: "no\udc80"
    spec = f"openai:test-vlm@{fake_openai.base_url},api_key_env=MEDVQA_TEST_KEY,max_concurrency=2"
    argv = ["eval", "--model", spec, "--benchmark", "phantom", "--root", str(phantom_root), "--limit", "4"]
    argv += ["--out", str(tmp_path / "eval"), "--no-progress", "--n-boot", "10"]
    assert main(argv) == 0
    text = (tmp_path / "eval" / "predictions.jsonl").read_text(encoding="utf-8")
    assert text.count("no\\ufffd") + text.count("no\ufffd") == 4
    assert main(argv) == 0 and fake_openai.n_requests == 4


def test_content_null_is_not_an_empty_answer(fake_openai, fake_key, png, tmp_path) -> None:
    """A choice without text (refusal, content filter, a reasoning model out of tokens) fails the
    request, counted, and is never cached or returned as ""."""
    path, _ = png
    fake_openai.reply = lambda body: None
    model = make_model(fake_openai, cache=str(tmp_path / "cache.sqlite"))
    with pytest.raises(EndpointError, match=r"no content \(finish_reason='stop'\).*record q3"):
        model.generate([GenerationRequest(str(path), chat_prompt("q"), id="q3")], GenerationSettings())
    assert model.stats["no_content"] == 1 and model.stats["failed"] == 1 and model.stats["completed"] == 0
    fake_openai.reply = lambda body: "yes"
    assert model.generate([GenerationRequest(str(path), chat_prompt("q"))], GenerationSettings()) == ["yes"]
    assert fake_openai.n_requests == 2  # the failed request was not cached


def test_medvqa_eval_stops_on_content_null_with_one_line(
    fake_openai, fake_key, phantom_root, tmp_path, capsys
) -> None:
    from medvqa.cli import main

    fake_openai.reply = lambda body: None
    spec = f"openai:test-vlm@{fake_openai.base_url},api_key_env=MEDVQA_TEST_KEY,max_concurrency=1"
    argv = ["eval", "--model", spec, "--benchmark", "phantom", "--root", str(phantom_root), "--limit", "2"]
    argv += ["--out", str(tmp_path / "eval"), "--no-progress", "--n-boot", "10"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no content" in err and "Traceback" not in err
    preds = tmp_path / "eval" / "predictions.jsonl"
    assert not preds.exists() or preds.read_text() == ""


@pytest.mark.parametrize("key", [FAKE_KEY, "medvqa-local-secret-31337"])
def test_a_key_echoed_in_a_reply_is_scrubbed_from_every_stored_text(
    fake_openai, phantom_root, tmp_path, monkeypatch, key
) -> None:
    """A server that echoes the Authorization header inside a 200 answer: the key reaches neither
    predictions.jsonl nor the cache nor any other file (also a key not shaped like `sk-...`)."""
    from medvqa.cli import main

    monkeypatch.setenv("MEDVQA_TEST_KEY", key)
    fake_openai.reply = lambda body: f"yes (you sent {fake_openai.auth[-1]})"
    cache = tmp_path / "cache.sqlite"
    spec = (
        f"openai:test-vlm@{fake_openai.base_url},api_key_env=MEDVQA_TEST_KEY,max_concurrency=1,cache={cache}"
    )
    argv = ["eval", "--model", spec, "--benchmark", "phantom", "--root", str(phantom_root), "--limit", "3"]
    argv += ["--out", str(tmp_path / "eval"), "--no-progress", "--n-boot", "10"]
    assert main(argv) == 0
    assert fake_openai.auth[-1] == f"Bearer {key}"  # the key did go out, and came back
    assert "you sent Bearer ***" in (tmp_path / "eval" / "predictions.jsonl").read_text()
    assert files_containing(tmp_path, key) == [] and cache.exists()


# --- stage-2 sampling: per-request seeds, cached (issue 14) ------------------------------------------


def test_per_request_seeds_are_sent_cached_and_batch_independent(
    fake_openai, fake_key, png, tmp_path
) -> None:
    """n samples of one question are n requests with n seeds; a request's seed does not depend on
    the batch it came in, and a seeded sampled request is answered from the cache on a rerun."""
    path, _ = png
    fake_openai.reply = lambda body: f"draw {body['seed']} at T={body['temperature']}"
    sampled = GenerationSettings(max_new_tokens=8, do_sample=True, temperature=1.2, top_p=0.95, seed=7)
    prompt = chat_prompt("Ask a question about this image.")
    reqs = [GenerationRequest(str(path), prompt, id=f"a{i}", seed=100 + i) for i in range(3)]
    unseeded = GenerationRequest(str(path), prompt, id="plain")
    model = make_model(fake_openai, cache=str(tmp_path / "cache.sqlite"), max_concurrency=3)
    out = model.generate([*reqs, unseeded], sampled)
    assert out == ["draw 100 at T=1.2", "draw 101 at T=1.2", "draw 102 at T=1.2", "draw 7 at T=1.2"]
    assert sorted(b["seed"] for b in fake_openai.bodies) == [7, 100, 101, 102]
    assert all(b["top_p"] == 0.95 for b in fake_openai.bodies)
    assert model.generate([reqs[2]], sampled) == ["draw 102 at T=1.2"]  # alone: the same draw, cached
    assert fake_openai.n_requests == 4 and model.stats["cache_hits"] == 1
    model.close()


def test_stllava_stage2_sampling_through_an_openai_endpoint(fake_openai, fake_key, tmp_path) -> None:
    """`medvqa stllava questions|answers --model openai:...`: every question and both answers are
    seeded requests; the files do not depend on the batch size or the concurrency, and a rerun
    asks for nothing."""
    import json

    from medvqa.cli import main

    for name in ("a", "b", "c"):
        write_png(tmp_path / f"{name}.png", (ord(name), 0, 0))
    (tmp_path / "images.txt").write_text("a.png\nb.png\nc.png\n")

    def reply(body: dict) -> str:
        text = json.dumps(body["messages"])
        if "Ask a question" in text:
            return f"is there a lesion {body['seed'] % 97}?"
        return f"answer {body['seed'] % 89}"

    fake_openai.reply = reply
    outputs = []
    for batch, concurrency in ((2, 1), (5, 4)):
        run = tmp_path / f"run{batch}"
        spec = (
            f"openai:stage1@{fake_openai.base_url},api_key_env=MEDVQA_TEST_KEY,max_concurrency={concurrency}"
        )
        common = ["--model", spec, "--k-questions", "2", "--generation-batch-size", str(batch), "--seed", "3"]
        q = ["stllava", "questions", "--images", str(tmp_path / "images.txt"), "--out", str(run / "q.jsonl")]
        a = ["stllava", "answers", "--questions", str(run / "q.jsonl"), "--out", str(run / "a.jsonl")]
        before = fake_openai.n_requests
        assert main([*q, *common]) == 0 and main([*a, *common]) == 0
        assert fake_openai.n_requests - before == 6 + 12  # 3 images x 2 questions, 2 answers each
        assert main([*q, *common]) == 0 and main([*a, *common]) == 0
        assert fake_openai.n_requests - before == 18  # resumed: nothing asked again
        outputs.append(((run / "q.jsonl").read_bytes(), (run / "a.jsonl").read_bytes()))
    assert outputs[0] == outputs[1]
    rows = [json.loads(line) for line in outputs[0][1].decode().splitlines()]
    assert len(rows) == 6 and all(len(r["answers"]) == 2 and r["answers"][0] != r["answers"][1] for r in rows)
    seeds = [b["seed"] for b in fake_openai.bodies]
    assert len(set(seeds[:18])) == 18  # every draw its own seed
