"""Prompt policies: how a question becomes what the model is shown.

A policy is a small declarative record: either chat messages rendered by each model's own chat
template (`style="chat"`), or one raw-text template with an `<image>` placeholder used verbatim
(`style="raw"`, for published conventions such as LLaVA-Med's). What differs between CLOSED and
OPEN questions is chosen from the sample's `answer_type` (dataset metadata), never from the gold
answer. A policy may also carry the decoding it was published with (`generation`), which
`medvqa eval` applies unless the user overrides it.

Adding a policy is one `register_policy(PromptPolicy(...))` call::

    register_policy(PromptPolicy(
        name="llava-med-v1.5",
        description="LLaVA-Med v1.5 (Mistral [INST] format), greedy",
        style="raw",
        template="[INST] <image>\\n{question} [/INST]",
    ))

Template fields: `{question}` (the question text, stripped), `{suffix}` (the closed options and
instruction for this answer type, with a leading space when non-empty), `{instruction}` (the
same, without the space).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from medvqa.errors import BadInput
from medvqa.types import Prompt

SHORT_ANSWER = "Answer with a single word or phrase."
CLOSED_YES_NO = "Please choose from the following two options: [yes, no]"
IMAGE_PLACEHOLDER = "<image>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

DEFAULT_POLICY = "short-answer"
# What the trainers ask a model to do with an image: STLLaVA-Med's self-questioning and the align
# stage's captions. One source, so the tiny model's vocabulary (Phantom's corpus) always covers them.
ASK_INSTRUCTION = "Ask a question about this image."
CAPTION_INSTRUCTION = "Describe this image."


@dataclass(frozen=True)
class PromptPolicy:
    """One named prompt convention.

    `style="chat"`: messages `[system?] + user[image part, text part]`; the text part is
    `text_template` (default "{question}{suffix}"), and `image_first` says whether the image part
    comes before the text (LLaVA convention) or after it.
    `style="raw"`: `template` is rendered to the exact model input text (one `<image>`).
    `instruction` is appended to every question; `closed_options` (the "[yes, no]" options line) is
    the closed-question switch: when set, it is appended before `instruction` to CLOSED questions
    only (by `answer_type`). `with_closed_options(False)` gives the same policy without it.
    `generation` holds published decoding defaults (GenerationSettings fields), e.g. sampling at
    temperature 0.7; empty means the harness defaults (greedy).
    """

    name: str
    description: str
    style: Literal["chat", "raw"] = "chat"
    template: str = "{question}{suffix}"
    system: str | None = None
    image_first: bool = True
    instruction: str = ""
    closed_options: str = ""
    generation: Mapping[str, Any] = field(default_factory=dict)
    # Published output post-processing: the answer is the generated text up to the first of these
    # strings, stripped (e.g. LLaVA-Med v1.0 cuts at its "###" separator). Empty: kept as generated.
    stop: tuple[str, ...] = ()
    # Reasoning models: score only what follows `</think>` (`NAME+think`). A scoring option: the
    # stored predictions keep the whole text, so switching it rescores without generating again.
    strip_think: bool = False

    def postprocess(self, text: str) -> str:
        """The answer as the convention reads it from the generated text (cut at the first stop string)."""
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=len(text))
        return text[:cut].strip()

    def instruction_for(self, answer_type: str) -> str:
        """The text appended to a question of this answer type (never looks at the gold answer)."""
        if answer_type not in ("OPEN", "CLOSED"):
            raise BadInput(
                f"prompt policy {self.name!r}: answer_type must be OPEN or CLOSED, got {answer_type!r}"
            )
        parts = [self.closed_options if answer_type == "CLOSED" else "", self.instruction]
        return " ".join(p for p in parts if p)

    def with_closed_options(self, enabled: bool) -> PromptPolicy:
        """This policy with the closed-question options switched on (CLOSED_YES_NO) or off."""
        options = (self.closed_options or CLOSED_YES_NO) if enabled else ""
        if options == self.closed_options:
            return self
        suffix = "+options" if enabled else "-options"
        base = self.name.removesuffix("+options").removesuffix("-options")
        return replace(self, name=base + suffix, closed_options=options)

    def with_strip_think(self, enabled: bool) -> PromptPolicy:
        """This policy with `<think>…</think>` stripping before the scorers on (`NAME+think`) or off."""
        if enabled == self.strip_think:
            return self
        base = self.name.removesuffix("+think")
        return replace(self, name=base + "+think" if enabled else base, strip_think=enabled)

    def scored_text(self, text: str) -> str:
        """The part of a stored answer the scorers see (the reasoning cut away under `+think`)."""
        return strip_reasoning(text) if self.strip_think else text

    def render_text(self, question: str, answer_type: str) -> str:
        instruction = self.instruction_for(answer_type)
        return self.template.format(
            question=question.strip(),
            instruction=instruction,
            suffix=f" {instruction}" if instruction else "",
        )

    def render(self, question: str, answer_type: str) -> Prompt:
        """The prompt for one question; `answer_type` comes from the dataset's metadata."""
        text = self.render_text(question, answer_type)
        if self.style == "raw":
            if text.count(IMAGE_PLACEHOLDER) != 1:
                raise ValueError(f"prompt policy {self.name!r}: a raw template needs exactly one <image>")
            return Prompt(text=text, policy=self.name)
        parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
        parts.insert(0 if self.image_first else 1, {"type": "image"})
        messages: list[dict[str, Any]] = []
        if self.system:
            messages.append({"role": "system", "content": [{"type": "text", "text": self.system}]})
        messages.append({"role": "user", "content": parts})
        return Prompt(messages=tuple(messages), policy=self.name)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "style": self.style,
            "template": self.template,
            "system": self.system,
            "image_first": self.image_first,
            "instruction": self.instruction,
            "closed_options": self.closed_options,
            "generation": dict(self.generation),
            "stop": list(self.stop),
            **({"strip_think": True} if self.strip_think else {}),
        }


def strip_reasoning(text: str) -> str:
    """The answer after a reasoning model's `<think>…</think>` (substring scorers would otherwise
    count every "no" in the reasoning). Text after the last `</think>` (also when the chat template
    opened the `<think>` in the prompt); an unclosed `<think>` drops everything from it (no answer)."""
    if THINK_CLOSE in text:
        return text.rsplit(THINK_CLOSE, 1)[1].strip()
    if THINK_OPEN in text:
        return text.split(THINK_OPEN, 1)[0].strip()
    return text


_POLICIES: dict[str, PromptPolicy] = {}


def register_policy(policy: PromptPolicy) -> PromptPolicy:
    if policy.name in _POLICIES and _POLICIES[policy.name] != policy:
        raise ValueError(f"prompt policy {policy.name!r} is already registered")
    _POLICIES[policy.name] = policy
    return policy


def get_policy(name: str | None = None) -> PromptPolicy:
    """A registered policy; `NAME+options` / `NAME-options` switch the closed-question options,
    `NAME+think` (last) strips reasoning before the scorers."""
    name = name or DEFAULT_POLICY
    if name.endswith("+think"):
        return get_policy(name.removesuffix("+think")).with_strip_think(True)
    for suffix, enabled in (("+options", True), ("-options", False)):
        if name.endswith(suffix) and name.removesuffix(suffix) in _POLICIES:
            return _POLICIES[name.removesuffix(suffix)].with_closed_options(enabled)
    if name not in _POLICIES:
        raise BadInput(f"unknown prompt policy {name!r}; known: {', '.join(sorted(_POLICIES))}")
    return _POLICIES[name]


def policy_names() -> list[str]:
    return sorted(_POLICIES)


# --- built-in policies -------------------------------------------------------------------------

register_policy(
    PromptPolicy(
        name="short-answer",
        description="the model's own chat template + 'Answer with a single word or phrase.' "
        "(short-answer+options adds the [yes, no] options to CLOSED questions, by answer_type)",
        instruction=SHORT_ANSWER,
    )
)

register_policy(
    PromptPolicy(
        name="plain",
        description="the model's own chat template with the bare question (no instruction)",
    )
)

# --- published conventions (exact text of the original evaluation scripts) ----------------------
# The system line shared by LLaVA's `conv_vicuna_v0`/`simple` and `llava_v1` templates.
LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

register_policy(
    PromptPolicy(
        name="llava-med-v1",
        description="LLaVA-Med v1.0 (llava/eval/model_vqa_med.py, conv 'simple'): system line, one "
        "'Hi!' example turn, '###' separator, image after the question; sampling at T=0.7, "
        "answer cut at the first '###'",
        style="raw",
        template=LLAVA_SYSTEM + "###Human: Hi!###Assistant: Hi there!  How can I help you today?\n"
        "###Human: {question}{suffix}\n<image>###",
        generation={"do_sample": True, "temperature": 0.7},
        stop=("###",),
    )
)

register_policy(
    PromptPolicy(
        name="llava-med-v1.5",
        description="LLaVA-Med v1.5 (llava/eval/model_vqa.py, conv 'mistral_instruct'): "
        "[INST] <image>\\n{question} [/INST], greedy",
        style="raw",
        template="[INST] <image>\n{question}{suffix} [/INST]",
    )
)

register_policy(
    PromptPolicy(
        name="stllava-med",
        description="STLLaVA-Med (conv 'llava_v1'): system line, USER: <image>\\n{question} ASSISTANT:, greedy",
        style="raw",
        template=LLAVA_SYSTEM + " USER: <image>\n{question}{suffix} ASSISTANT:",
    )
)
