"""Prompt policies: rendered text is pinned; CLOSED/OPEN switch comes from answer_type, not the gold."""

from __future__ import annotations

import pytest
from medvqa.errors import BadInput
from medvqa.prompts import (
    CLOSED_YES_NO,
    SHORT_ANSWER,
    PromptPolicy,
    get_policy,
    policy_names,
    register_policy,
)


def _text(prompt) -> str:
    (user,) = [m for m in prompt.messages if m["role"] == "user"]
    return next(p["text"] for p in user["content"] if p["type"] == "text")


def test_short_answer_is_default_and_pinned() -> None:
    policy = get_policy()
    assert policy.name == "short-answer"
    closed = policy.render("  Is this a CT scan? ", "CLOSED")
    assert closed.policy == "short-answer" and closed.text is None
    assert closed.messages == (
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {
                    "type": "text",
                    "text": "Is this a CT scan? Answer with a single word or phrase.",
                },
            ],
        },
    )
    assert _text(policy.render("What organ is shown?", "OPEN")) == f"What organ is shown? {SHORT_ANSWER}"


def test_closed_options_switch() -> None:
    # Off by default: SLAKE's CLOSED questions include non-yes/no answers ("Liver").
    assert get_policy("short-answer-options") is get_policy("short-answer")
    with_options = get_policy("short-answer+options")
    assert with_options.name == "short-answer+options"
    assert (
        _text(with_options.render("Is it normal?", "CLOSED"))
        == f"Is it normal? {CLOSED_YES_NO} {SHORT_ANSWER}"
    )
    assert _text(with_options.render("Is it normal?", "OPEN")) == f"Is it normal? {SHORT_ANSWER}"
    on = get_policy("plain+options")
    assert _text(on.render("Is it normal?", "CLOSED")) == f"Is it normal? {CLOSED_YES_NO}"
    assert _text(on.render("Where?", "OPEN")) == "Where?"


def test_render_never_sees_the_answer() -> None:
    import inspect

    params = list(inspect.signature(PromptPolicy.render).parameters)
    assert params == ["self", "question", "answer_type"]
    with pytest.raises(BadInput, match="answer_type"):
        get_policy().render("q", "yes")


def test_unknown_policy_lists_known() -> None:
    with pytest.raises(BadInput, match="short-answer"):
        get_policy("nope")


def test_raw_policy_is_declarative() -> None:
    policy = PromptPolicy(
        name="test-raw",
        description="raw test",
        style="raw",
        template="[INST] <image>\n{question}{suffix} [/INST]",
        closed_options=CLOSED_YES_NO,
        generation={"do_sample": True, "temperature": 0.7},
    )
    register_policy(policy)
    assert "test-raw" in policy_names()
    prompt = get_policy("test-raw").render("Is it?", "CLOSED")
    assert prompt.messages == () and prompt.text == f"[INST] <image>\nIs it? {CLOSED_YES_NO} [/INST]"
    assert get_policy("test-raw").render("Is it?", "OPEN").text == "[INST] <image>\nIs it? [/INST]"
    with pytest.raises(ValueError, match="exactly one"):
        PromptPolicy(name="x", description="", style="raw", template="{question}").render("q", "OPEN")


def test_system_and_image_after_question() -> None:
    policy = PromptPolicy(name="sys-test", description="", system="You are a radiologist.", image_first=False)
    prompt = policy.render("Is it?", "OPEN")
    assert prompt.messages[0] == {
        "role": "system",
        "content": [{"type": "text", "text": "You are a radiologist."}],
    }
    assert [p["type"] for p in prompt.messages[1]["content"]] == ["text", "image"]


def test_cli_lists_and_shows_policies(capsys) -> None:
    from medvqa.cli import main

    assert main(["prompts"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in ("short-answer", "llava-med-v1", "llava-med-v1.5", "stllava-med"))
    assert main(["prompts", "--show", "llava-med-v1.5+options"]) == 0
    shown = capsys.readouterr().out
    assert "[INST] <image>\nIs this a CT scan? " + CLOSED_YES_NO + " [/INST]" in shown
    assert "[INST] <image>\nWhat organ is shown? [/INST]" in shown
    assert main(["prompts", "--show", "nope"]) == 2
    assert "known: llava-med-v1" in capsys.readouterr().err
