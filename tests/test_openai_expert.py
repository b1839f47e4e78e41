"""The `openai` expert (judge) against a real OpenAI-compatible HTTP server on 127.0.0.1."""
# ruff: noqa: F811 - the loopback-server fixtures are imported from tests._openai_server

from __future__ import annotations

import argparse
import base64
import logging
import re

import pytest
from medvqa.config import add_dataclass_arguments, dataclass_from_args, dataclass_from_mapping
from medvqa.errors import BadInput
from medvqa.registry import experts
from medvqa.trainers.experts.openai import INSTRUCTIONS, OpenAIExpert, OpenAIExpertConfig, parse_scores
from medvqa.types import Expert

from tests._openai_server import (  # noqa: F401 - fixtures
    FAKE_KEY,
    Fault,
    fake_key,
    fake_openai,
    files_containing,
    openai_server,
    write_png,
)


def make_expert(fake, tmp_path, **overrides) -> OpenAIExpert:
    config = OpenAIExpertConfig(
        model="judge-vlm",
        base_url=fake.base_url,
        api_key_env="MEDVQA_TEST_KEY",
        timeout=2.0,
        max_retries=3,
        backoff_initial=0.01,
        backoff_max=0.05,
        cache_path=str(tmp_path / "judge-cache.sqlite"),
        image_root=str(tmp_path),
    )
    cls = experts.get("openai")
    return cls(cls.config_class(**{**config.__dict__, **overrides}))


def by_answers(scores: dict[tuple[str, str], str]):
    """A server reply function: look the answer pair up in the user text."""

    def reply(body: dict) -> str:
        text = body["messages"][1]["content"][1]["text"]
        found = re.findall(r"\[Answer \d\]\n(.*?)\n\[End of Answer", text, flags=re.S)
        return scores[tuple(found)]

    return reply


@pytest.fixture
def images(tmp_path):
    a = tmp_path / "a.png"
    b = tmp_path / "b.png"
    return (a, write_png(a, (255, 0, 0))), (b, write_png(b, (0, 0, 255)))


@pytest.mark.parametrize(
    ("reply", "scores"),
    [
        ("8 3", [8.0, 3.0]),
        ("8, 3\nAnswer 1 names the organ.", [8.0, 3.0]),
        ("8,3", [8.0, 3.0]),
        ("  7.5 10 \n", [7.5, 10.0]),
        ("\n9 1\nreason", [9.0, 1.0]),
        ("Answer 1: 8, Answer 2: 3", None),
        ("8/10 3/10", None),
        ("8", None),
        ("8 3 5", None),
        ("11 3", None),
        ("nan 3", None),
        ("-1 3", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_rule(reply, scores) -> None:
    assert parse_scores(reply, 2) == scores


def test_registry_config_and_interface(tmp_path) -> None:
    cls = experts.get("openai")
    assert cls is OpenAIExpert and cls.config_class is OpenAIExpertConfig
    config = OpenAIExpertConfig()
    assert (config.model, config.base_url, config.temperature, config.api_key_env) == (
        "gpt-4o",
        None,
        0.2,
        "OPENAI_API_KEY",
    )
    for name, f in OpenAIExpertConfig.__dataclass_fields__.items():
        assert f.metadata.get("help"), f"{name} has no help"
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, OpenAIExpertConfig, prefix="expert_")
    args = parser.parse_args(["--expert-model", "llava", "--expert-base-url", "http://127.0.0.1:1/v1"])
    built = dataclass_from_args(OpenAIExpertConfig, args, prefix="expert_")
    assert built.model == "llava" and built.base_url == "http://127.0.0.1:1/v1" and built.temperature == 0.2
    assert (
        dataclass_from_mapping(OpenAIExpertConfig, {"model": "m", "max_concurrency": 2}).max_concurrency == 2
    )
    # Constructing the expert needs no key (a fully cached rerun never asks for one).
    expert = cls(built)
    assert isinstance(expert, Expert) and expert.name == "openai"
    with pytest.raises(BadInput, match="instruction version"):
        cls(OpenAIExpertConfig(instruction_version="v0"))


def test_judge_round_trip_request_body(fake_openai, fake_key, images, tmp_path) -> None:
    (a, data), _ = images
    fake_openai.reply = lambda body: "9 2\nAnswer 1 is right; answer 2 names the wrong organ."
    expert = make_expert(fake_openai, tmp_path)
    assert expert.judge(str(a), "Which organ is shown?", ["liver", "spleen"]) == [9.0, 2.0]
    (body,) = fake_openai.bodies
    assert body["model"] == "judge-vlm" and body["temperature"] == 0.2 and body["seed"] == 0
    assert body["max_tokens"] == OpenAIExpertConfig().max_tokens
    system, user = body["messages"]
    assert system["role"] == "system" and "radiologist" in system["content"]
    image_part, text_part = user["content"]
    assert image_part["image_url"]["url"] == "data:image/png;base64," + base64.b64encode(data).decode()
    text = text_part["text"]
    assert "Which organ is shown?" in text
    assert "[Answer 1]\nliver\n[End of Answer 1]" in text and "[Answer 2]\nspleen\n[End of Answer 2]" in text
    assert "first line contains only the 2 scores" in text
    assert expert.counts()["calls"] == 1 and expert.counts()["judged"] == 1


def test_malformed_reply_is_counted_not_fatal(fake_openai, fake_key, images, tmp_path) -> None:
    (a, _), (b, _) = images
    fake_openai.reply = by_answers({("yes", "no"): "Answer 1 is better.", ("left", "right"): "6 6"})
    expert = make_expert(fake_openai, tmp_path)
    results = expert.judge_many_detailed(
        [(str(a), "Is it normal?", ["yes", "no"]), (str(b), "Side?", ["left", "right"])]
    )
    assert [r.status for r in results] == ["malformed", "ok"]
    assert results[0].scores is None and results[0].skipped == "malformed judge reply"
    assert results[0].reply == "Answer 1 is better."
    assert results[1].scores == [6.0, 6.0] and results[1].skipped is None
    counts = expert.counts()
    assert (counts["malformed"], counts["judged"], counts["failed"], counts["calls"]) == (1, 1, 0, 2)


def test_rerun_is_served_from_cache_without_key(fake_openai, fake_key, images, tmp_path, monkeypatch) -> None:
    (a, _), (b, data_b) = images
    fake_openai.reply = by_answers({("yes", "no"): "8 2", ("left", "right"): "not a score"})
    items = [
        (str(a), "Is it normal?", ["yes", "no"]),
        {"image": data_b, "question": "Side?", "answers": ["left", "right"]},
    ]
    first = make_expert(fake_openai, tmp_path)
    assert first.judge_many(items) == [[8.0, 2.0], None]
    first.close()
    assert fake_openai.n_requests == 2
    monkeypatch.delenv("MEDVQA_TEST_KEY")  # a rerun on another machine, everything cached
    again = make_expert(fake_openai, tmp_path)
    # the same image given as bytes instead of a path: the key uses its content
    seen = []
    items2 = [(a.read_bytes(), "Is it normal?", ["yes", "no"]), (str(b), "Side?", ["left", "right"])]
    assert again.judge_many_detailed(items2, on_result=lambda i, j: seen.append(i))[0].cached
    assert sorted(seen) == [0, 1]
    assert fake_openai.n_requests == 2  # the server saw no second request
    counts = again.counts()
    assert (counts["cache_hits"], counts["calls"], counts["malformed"]) == (2, 0, 1)
    # Another judge model, another instruction text, other answers: not served from this cache.
    monkeypatch.setenv("MEDVQA_TEST_KEY", FAKE_KEY)
    fake_openai.reply = lambda body: "5 5"
    assert make_expert(fake_openai, tmp_path, model="other-judge").judge_many(items[:1]) == [[5.0, 5.0]]
    assert make_expert(fake_openai, tmp_path, seed=1).judge_many(items[:1]) == [[5.0, 5.0]]
    assert fake_openai.n_requests == 4


def test_crash_mid_batch_never_pays_twice(fake_openai, fake_key, images, tmp_path) -> None:
    (a, _), _ = images
    items = [(str(a), f"question {i}?", ["yes", "no"]) for i in range(6)]
    fake_openai.reply = lambda body: "7 1"
    # Three replies arrive, then the 4th request is refused for good (say the key was revoked
    # mid-run): the run stops with BadInput (exit 2).
    fake_openai.faults.extend([Fault(), Fault(), Fault(), Fault(status=401)])
    expert = make_expert(fake_openai, tmp_path, max_concurrency=1)
    with pytest.raises(BadInput, match="refused the API key"):
        expert.judge_many(items)
    expert.close()
    assert fake_openai.n_requests == 4
    rerun = make_expert(fake_openai, tmp_path, max_concurrency=1)
    assert rerun.judge_many(items) == [[7.0, 1.0]] * 6
    assert fake_openai.n_requests == 4 + 3  # only the three never judged
    assert rerun.counts()["cache_hits"] == 3


@pytest.mark.parametrize(
    "fault",
    [Fault(status=429, headers={"retry-after-ms": "10"}), Fault(status=500), Fault(sleep=0.8)],
    ids=["429", "500", "timeout"],
)
def test_transient_faults_are_retried(fake_openai, fake_key, images, tmp_path, fault) -> None:
    (a, _), _ = images
    fake_openai.faults.append(fault)
    fake_openai.reply = lambda body: "4 9"
    expert = make_expert(fake_openai, tmp_path, timeout=0.4)
    assert expert.judge(str(a), "q?", ["x", "y"]) == [4.0, 9.0]
    assert expert.counts()["retries"] == 1 and expert.counts()["http_requests"] == 2


def test_failed_requests_are_counted_and_asked_again(fake_openai, fake_key, images, tmp_path) -> None:
    (a, _), _ = images
    fake_openai.faults.extend(Fault(status=503) for _ in range(3))
    fake_openai.reply = lambda body: "4 9"
    expert = make_expert(fake_openai, tmp_path, max_retries=2)
    (result,) = expert.judge_many_detailed([(str(a), "q?", ["x", "y"])])
    assert result.status == "failed" and result.scores is None and "HTTP 503" in result.skipped
    assert expert.counts()["failed"] == 1
    assert expert.judge(str(a), "q?", ["x", "y"]) == [4.0, 9.0]  # not cached as a failure


def test_wrong_key_and_unknown_model_are_bad_input(fake_openai, fake_key, images, tmp_path) -> None:
    (a, _), _ = images
    fake_openai.faults.append(Fault(status=401, message=f"Incorrect API key provided: {FAKE_KEY}"))
    with pytest.raises(BadInput) as err:
        make_expert(fake_openai, tmp_path).judge(str(a), "q?", ["x", "y"])
    assert "judge-vlm" in str(err.value) and fake_openai.base_url in str(err.value)
    assert FAKE_KEY not in str(err.value)
    fake_openai.faults.append(Fault(status=404, message="The model `judge-vlm` does not exist."))
    with pytest.raises(BadInput, match=r"judge-vlm.*not found"):
        make_expert(fake_openai, tmp_path).judge(str(a), "q?", ["x", "y"])


def test_bounded_concurrency_and_duplicates_asked_once(fake_openai, fake_key, images, tmp_path) -> None:
    (a, _), _ = images
    fake_openai.delay = 0.1
    fake_openai.reply = lambda body: "3 4"
    expert = make_expert(fake_openai, tmp_path, max_concurrency=4)
    items = [(str(a), f"q{i}?", ["x", "y"]) for i in range(12)] + [(str(a), "q0?", ["x", "y"])]
    assert expert.judge_many(items) == [[3.0, 4.0]] * 13
    assert fake_openai.n_requests == 12 and fake_openai.max_in_flight == 4


def test_bad_items_name_the_record(fake_openai, fake_key, images, tmp_path) -> None:
    (a, _), _ = images
    expert = make_expert(fake_openai, tmp_path)
    with pytest.raises(BadInput, match=r"record 1.*answers"):
        expert.judge_many([(str(a), "q?", ["x", "y"]), (str(a), "q?", [])])
    with pytest.raises(BadInput, match=r"missing\.png.*not found"):
        expert.judge_many([(str(tmp_path / "missing.png"), "q?", ["x", "y"])])
    assert fake_openai.n_requests == 0


def test_key_never_written_or_logged(fake_openai, fake_key, images, tmp_path, caplog, capsys) -> None:
    (a, _), _ = images
    caplog.set_level(logging.DEBUG)
    fake_openai.faults.append(
        Fault(status=429, message=f"slow down {FAKE_KEY}", headers={"retry-after-ms": "5"})
    )
    fake_openai.reply = lambda body: "8 3"
    expert = make_expert(fake_openai, tmp_path)
    results = expert.judge_many_detailed([(str(a), "q?", ["x", "y"])])
    fake_openai.faults.append(Fault(status=403, message=f"key {FAKE_KEY} may not use judge-vlm"))
    with pytest.raises(BadInput) as err:
        expert.judge(str(a), "another q?", ["x", "y"])
    expert.close()
    out = capsys.readouterr()
    texts = [caplog.text, out.out, out.err, str(err.value), repr(expert), str(expert.counts()), str(results)]
    texts += [str(expert.config)]
    assert not [t for t in texts if FAKE_KEY in t]
    assert files_containing(tmp_path, FAKE_KEY) == []
    assert fake_openai.auth[0] == f"Bearer {FAKE_KEY}"  # it was sent, to the server only


def test_instruction_is_versioned() -> None:
    v1 = INSTRUCTIONS["medvqa-judge-v1"]
    text = v1.render("What is shown?", ["a", "b", "c"])
    assert "3 scores" in text and "(for example: 7 3 9)" in text
    assert len(v1.sha256) == 16


def test_medvqa_stllava_judge_with_the_openai_expert(
    fake_openai, images, tmp_path, monkeypatch, capsys
) -> None:
    """The whole judge step through the CLI: judged.jsonl, the cache beside it, a rerun that pays
    nothing, and a wrong key that exits 2 with one line that does not contain the key."""
    import json

    from medvqa.cli import main

    (a, _), (b, _) = images
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    rows = [
        {"id": "a-q0", "image": str(a), "question": "Is it normal?", "answers": ["yes", "no"]},
        {"id": "a-q1", "image": str(a), "question": "Side?", "answers": ["left", "right"]},
        {"id": "b-q0", "image": str(b), "question": "Modality?", "answers": ["ct", "mri"]},
    ]
    run = tmp_path / "run"
    run.mkdir()
    (run / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fake_openai.reply = by_answers(
        {("yes", "no"): "2 9", ("left", "right"): "I cannot tell.", ("ct", "mri"): "7 7"}
    )
    argv = ["stllava", "judge", "--answers", str(run / "answers.jsonl"), "--out", str(run / "judged.jsonl")]
    argv += ["--expert", "openai", "--expert-model", "judge-vlm", "--base-url", fake_openai.base_url]
    argv += ["--root", str(tmp_path)]
    assert main(argv) == 0
    judged = {r["id"]: r for r in map(json.loads, (run / "judged.jsonl").read_text().splitlines())}
    assert judged["a-q0"]["scores"] == [2.0, 9.0] and judged["b-q0"]["scores"] == [7.0, 7.0]
    assert judged["a-q1"]["skipped"] == "malformed judge reply"
    assert (run / "judge-cache.sqlite").exists() and fake_openai.n_requests == 3
    (run / "judged.jsonl").unlink()
    assert main(argv) == 0  # judged again from scratch: every judgment comes from the cache
    assert fake_openai.n_requests == 3

    (run / "answers.jsonl").write_text(json.dumps({**rows[0], "id": "new", "question": "Other?"}) + "\n")
    fake_openai.faults.append(Fault(status=401, message=f"Incorrect API key provided: {FAKE_KEY}"))
    assert main(argv) == 2
    out = capsys.readouterr()
    assert "judge-vlm" in out.err and fake_openai.base_url in out.err and "401" in out.err
    assert FAKE_KEY not in out.out + out.err
    assert files_containing(tmp_path, FAKE_KEY) == []


def test_swap_check_cancels_position_bias(fake_openai, fake_key, images, tmp_path) -> None:
    (a, _), _ = images
    expert = make_expert(fake_openai, tmp_path, swap_check=True)
    fake_openai.reply = lambda body: "8 3"  # a judge that always prefers whatever comes first
    assert expert.judge(str(a), "Is it normal?", ["yes", "no"]) == [5.5, 5.5]
    assert fake_openai.n_requests == 2
    texts = sorted(b["messages"][1]["content"][1]["text"] for b in fake_openai.bodies)
    assert ["[Answer 1]\nno\n" in t and "[Answer 2]\nyes\n" in t for t in texts] == [True, False]
    assert ["[Answer 1]\nyes\n" in t and "[Answer 2]\nno\n" in t for t in texts] == [False, True]

    content = {"yes": "9", "no": "2", "left": "6", "right": "4"}

    def consistent(body: dict) -> str:  # scores follow the answers, not their order
        found = re.findall(
            r"\[Answer \d\]\n(.*?)\n\[End of Answer", body["messages"][1]["content"][1]["text"]
        )
        return " ".join(content[x] for x in found)

    fake_openai.reply = consistent
    results = expert.judge_many_detailed(
        [(str(a), "Is it abnormal?", ["yes", "no"]), (str(a), "Side?", ["left", "right"])]
    )
    assert [r.scores for r in results] == [[9.0, 2.0], [6.0, 4.0]]
    assert "answers swapped" in results[0].reply

    fake_openai.reply = lambda body: (
        "9 2" if "[Answer 1]\nyes" in body["messages"][1]["content"][1]["text"] else "?"
    )
    (bad,) = expert.judge_many_detailed([(str(a), "Fluid?", ["yes", "no"])])
    assert bad.status == "malformed" and bad.scores is None
    counts = expert.counts()
    assert (counts["items"], counts["judged"], counts["malformed"], counts["calls"]) == (4, 3, 1, 8)


def test_judge_step_does_not_record_failed_requests_so_a_rerun_asks_again(
    fake_openai, fake_key, images, tmp_path
) -> None:
    """A request that fails after its retries is not an unjudgeable item: it is left out of
    judged.jsonl (and not cached), so rerunning the step pays for it once more."""
    import json

    from medvqa.trainers import stllava_med as st

    (a, _), (b, _) = images
    rows = [
        {"id": "a-q0", "image": str(a), "question": "Is it normal?", "answers": ["yes", "no"]},
        {"id": "b-q0", "image": str(b), "question": "Modality?", "answers": ["ct", "mri"]},
    ]
    answers, judged = tmp_path / "answers.jsonl", tmp_path / "judged.jsonl"
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fake_openai.reply = by_answers({("yes", "no"): "2 9", ("ct", "mri"): "8 1"})
    expert = make_expert(fake_openai, tmp_path, max_retries=0, max_concurrency=1)
    fake_openai.faults.append(Fault(status=500))  # the first request fails, no retry left
    counts = st.judge_answers(answers, judged, expert)
    assert counts["failed"] == 1 and counts["judged"] == 1 and counts["unjudgeable"] == 0
    assert len(judged.read_text().splitlines()) == 1

    counts = st.judge_answers(answers, judged, expert)
    assert counts == {"judged": 2, "unjudgeable": 0, "failed": 0}
    assert {r["id"] for r in map(json.loads, judged.read_text().splitlines())} == {"a-q0", "b-q0"}


# --- what comes back is stored safely, what goes out is confined (issue 11, items 6, 11, 13) -------


def test_a_lone_surrogate_in_a_judge_reply_is_cached_and_judged(
    fake_openai, fake_key, images, tmp_path
) -> None:
    (a, _), _ = images
    fake_openai.reply = lambda body: "8 3\nAnswer 1 \ud800 is right."
    expert = make_expert(fake_openai, tmp_path)
    (j,) = expert.judge_many_detailed([(str(a), "Is it normal?", ["yes", "no"])])
    assert j.status == "ok" and j.scores == [8.0, 3.0] and "\ufffd" in j.reply
    expert.close()
    again = make_expert(fake_openai, tmp_path)
    assert again.judge(str(a), "Is it normal?", ["yes", "no"]) == [8.0, 3.0]
    assert fake_openai.n_requests == 1 and again.counts()["cache_hits"] == 1


def test_content_null_judge_reply_is_a_failed_request(fake_openai, fake_key, images, tmp_path) -> None:
    (a, _), _ = images
    fake_openai.reply = lambda body: None
    expert = make_expert(fake_openai, tmp_path)
    (j,) = expert.judge_many_detailed([(str(a), "Is it normal?", ["yes", "no"])])
    assert j.status == "failed" and j.scores is None and "no content" in j.error
    assert expert.counts()["failed"] == 1
    fake_openai.reply = lambda body: "8 3"
    assert expert.judge(str(a), "Is it normal?", ["yes", "no"]) == [8.0, 3.0]  # asked again: not cached
    assert fake_openai.n_requests == 2


def test_a_key_echoed_in_a_judge_reply_is_not_stored(fake_openai, images, tmp_path, monkeypatch) -> None:
    (a, _), _ = images
    key = "medvqa-local-judge-secret-4242"
    monkeypatch.setenv("MEDVQA_TEST_KEY", key)
    fake_openai.reply = lambda body: f"8 3\nauth was {fake_openai.auth[-1]}"
    expert = make_expert(fake_openai, tmp_path, max_concurrency=1)
    (j,) = expert.judge_many_detailed([(str(a), "Is it normal?", ["yes", "no"])])
    expert.close()
    assert j.scores == [8.0, 3.0] and key not in j.reply and "Bearer ***" in j.reply
    assert files_containing(tmp_path, key) == []


def test_judge_uploads_only_images_inside_the_declared_root(fake_openai, fake_key, tmp_path) -> None:
    """Paths named in answers.jsonl are not trusted: absolute paths outside the root, `..`, an
    escaping symlink and a missing root are refused before anything is sent."""
    root = tmp_path / "data"
    root.mkdir()
    inside = root / "a.png"
    write_png(inside)
    secret = tmp_path / "private.png"
    write_png(secret, (1, 2, 3))
    (root / "link.png").symlink_to(secret)
    fake_openai.reply = lambda body: "8 3"
    expert = make_expert(fake_openai, tmp_path, image_root=str(root))
    assert expert.judge(str(inside), "q?", ["a", "b"]) == [8.0, 3.0]
    assert expert.judge("a.png", "q?", ["a", "b"]) == [8.0, 3.0]  # relative to the root
    for bad in (str(secret), "../private.png", str(root / ".." / "private.png"), "link.png", "/etc/hostname"):
        with pytest.raises(BadInput, match="field 'image'"):
            expert.judge(bad, "q?", ["a", "b"])
    with pytest.raises(BadInput, match="declared folder"):
        make_expert(fake_openai, tmp_path, image_root="").judge(str(inside), "q?", ["a", "b"])
    assert fake_openai.n_requests == 1  # the second judgment came from the cache; nothing else went out


def test_stllava_judge_refuses_an_image_outside_root(
    fake_openai, images, tmp_path, monkeypatch, capsys
) -> None:
    import json

    from medvqa.cli import main

    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    (a, _), _ = images
    (tmp_path / "data").mkdir()
    answers = tmp_path / "answers.jsonl"
    answers.write_text(
        json.dumps({"id": "x", "image": str(a), "question": "q?", "answers": ["a", "b"]}) + "\n"
    )
    argv = ["stllava", "judge", "--answers", str(answers), "--out", str(tmp_path / "judged.jsonl")]
    argv += ["--expert", "openai", "--base-url", fake_openai.base_url, "--root", str(tmp_path / "data")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "outside the declared root" in err and len(err.strip().splitlines()) == 1
    assert fake_openai.n_requests == 0


# --- the expert's own config is flags and TOML keys (issue 12) --------------------------------------


def test_expert_config_fields_are_stllava_flags(fake_openai, images, tmp_path, monkeypatch, capsys) -> None:
    """`--expert-FIELD` for every field of the expert's config dataclass, checked against the
    chosen expert; `--expert-options KEY=VALUE` (the TOML table's flag form) too."""
    import json

    from medvqa.cli import main

    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    (a, _), _ = images
    answers = tmp_path / "answers.jsonl"
    answers.write_text(
        json.dumps({"id": "x", "image": str(a), "question": "q?", "answers": ["a", "b"]}) + "\n"
    )
    fake_openai.reply = lambda body: "6 4"
    argv = ["stllava", "judge", "--answers", str(answers), "--expert", "openai", "--root", str(tmp_path)]
    argv += ["--expert-model", "judge-vlm", "--base-url", fake_openai.base_url]
    flags = ["--expert-temperature", "0", "--expert-max-tokens", "40", "--expert-swap-check"]
    assert main([*argv, "--out", str(tmp_path / "j1.jsonl"), *flags]) == 0
    assert [(b["temperature"], b["max_tokens"]) for b in fake_openai.bodies] == [(0.0, 40), (0.0, 40)]

    assert (
        main([*argv, "--out", str(tmp_path / "j2.jsonl"), "--expert-options", "temperature=0.7,seed=5"]) == 0
    )
    assert (fake_openai.bodies[-1]["temperature"], fake_openai.bodies[-1]["seed"]) == (0.7, 5)

    capsys.readouterr()
    bad = ["stllava", "judge", "--answers", str(answers), "--out", str(tmp_path / "j3.jsonl")]
    assert main([*bad, "--expert", "phantom", "--expert-swap-check"]) == 2
    err = capsys.readouterr().err
    assert "expert 'phantom'" in err and "swap_check" in err and len(err.strip().splitlines()) == 1
    assert main([*argv, "--out", str(tmp_path / "j4.jsonl"), "--expert-options", "max_tokens=many"]) == 2
    assert "max_tokens" in capsys.readouterr().err


def test_expert_options_are_checked_when_the_config_is_built() -> None:
    """A misspelt judge setting is refused when STLLaVAMedConfig is built (so a sweep refuses it
    at load, before any job runs), and a TOML-written config round-trips."""
    import tomllib

    from medvqa.sweeps.config import settings_toml
    from medvqa.trainers.stllava_med.config import STLLaVAMedConfig

    cfg = STLLaVAMedConfig(expert="openai", expert_options={"model": "gpt-4o", "swap_check": True})
    assert cfg.expert_options["model"] == "gpt-4o"
    with pytest.raises(BadInput, match=r"expert 'openai': unknown key\(s\) \['modle'\]"):
        STLLaVAMedConfig(expert="openai", expert_options={"modle": "gpt-4o"})
    with pytest.raises(BadInput, match="temperature"):
        STLLaVAMedConfig(expert="openai", expert_options={"temperature": "hot"})
    table = tomllib.loads(settings_toml({"expert": "openai", "expert_options": cfg.expert_options}))
    assert table["trainer"]["expert_options"] == {"model": "gpt-4o", "swap_check": True}


def test_build_expert_declares_the_image_root(tmp_path) -> None:
    """`stllava judge --root` is the openai judge's image root; the trainer passes the benchmark's
    data folder (TrainRequest.data_root), so `train --expert openai` judges without extra flags."""
    from medvqa.fractions import fraction_request
    from medvqa.trainers.stllava_med.judging import build_expert
    from medvqa.types import VQASample

    assert build_expert("openai", root=str(tmp_path)).config.image_root == str(tmp_path)
    assert build_expert("openai", image_root="/data/x").config.image_root == "/data/x"
    assert build_expert("phantom", image_root="/data/x").config.root == ""  # not the phantom's root
    samples = [VQASample(f"q{i}", f"i{i}.png", "q?", "yes", "CLOSED", "toy", "train") for i in range(4)]
    request = fraction_request(samples, 0.5, 0, base_model="hf:m", out_dir=tmp_path, data_root="/data/x")
    assert request.data_root == "/data/x"
