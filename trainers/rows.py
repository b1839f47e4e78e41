"""Training rows in the evaluation format: prompt policy + the model's own chat template.

`RowBuilder` renders a question exactly as `hf:` evaluation shows it to the model (so the
training format is the evaluation format) and writes the completion the chat template would write
after it, ending with EOS; `qa_rows` turns samples into such rows and `to_dataset` into a
`datasets.Dataset` whose images decode lazily.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

from medvqa.errors import BadInput
from medvqa.types import Prompt, VQASample

CLOSED_STARTS = frozenset(
    [
        "is",
        "are",
        "was",
        "were",
        "does",
        "do",
        "did",
        "can",
        "could",
        "has",
        "have",
        "had",
        "will",
        "would",
        "should",
        "shall",
        "may",
        "might",
    ]
)


def guess_answer_type(question: str) -> str:
    """CLOSED for a yes/no-shaped question (starts with an auxiliary verb), else OPEN.

    Used only for self-generated questions, which have no dataset metadata.
    """
    words = question.strip().lower().split()
    return "CLOSED" if words and words[0] in CLOSED_STARTS else "OPEN"


def render_prompt_text(processor: Any, prompt: Prompt) -> str:
    """The exact model input text for a prompt, as `hf:` evaluation builds it.

    Chat messages go through the model's chat template (which writes its own BOS); raw text is
    used verbatim, and since evaluation lets the tokenizer add its BOS there while trl's collators
    never add special tokens, the BOS is written into the text here.
    """
    from medvqa.models.hf import render_prompt_text as eval_render

    text = eval_render(processor, prompt)
    if prompt.text is not None:
        tok = getattr(processor, "tokenizer", processor)
        bos = tok.bos_token
        ids = tok("x", add_special_tokens=True)["input_ids"]
        if bos and ids and ids[0] == tok.bos_token_id and not text.startswith(bos):
            text = bos + text
    return text


def completion_text(processor: Any, prompt: Prompt, prompt_text: str, answer: str) -> str:
    """What follows `prompt_text` when the model says `answer` and stops (ends with the EOS token)."""
    tok = getattr(processor, "tokenizer", processor)
    eos = tok.eos_token or ""
    if prompt.text is None:
        messages = [*prompt.messages, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        full = processor.apply_chat_template(messages, tokenize=False)
        if full.startswith(prompt_text):
            out = full[len(prompt_text) :]
            return out if not eos or eos in out else out + eos
    return f" {answer.strip()}{eos}"


def image_ref(image: str | bytes) -> Any:
    """A value for a `datasets.Image()` column: decoded lazily, per batch."""
    if isinstance(image, bytes):
        return {"bytes": image, "path": None}
    return str(image)


def load_pil(image: str | bytes) -> Any:
    from PIL import Image

    with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as im:
        return im.convert("RGB")


def instruction_prompt(policy: Any, text: str) -> Prompt:
    """The prompt for an instruction that bypasses the policy's own (captions, the ask-instruction),
    in the policy's style. No processor needed: stage-2 sampling through an endpoint uses it too."""
    if policy.style == "raw":
        return Prompt(text=policy.template.replace("{suffix}", "").format(question=text, instruction=""))
    return Prompt(
        messages=({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]},),
        policy="raw-instruction",
    )


class RowBuilder:
    """Builds training rows in the evaluation format (prompt policy + the model's chat template)."""

    def __init__(self, processor: Any, policy_name: str):
        from medvqa.prompts import get_policy

        self.processor = processor
        self.policy = get_policy(policy_name or None)

    def prompt(self, question: str, answer_type: str) -> tuple[Prompt, str]:
        prompt = self.policy.render(question, answer_type)
        return prompt, render_prompt_text(self.processor, prompt)

    def raw_prompt(self, text: str) -> tuple[Prompt, str]:
        """A prompt that bypasses the policy's instruction (captions, the ask-instruction)."""
        prompt = instruction_prompt(self.policy, text)
        return prompt, render_prompt_text(self.processor, prompt)

    def qa_row(self, image: str | bytes, question: str, answer_type: str, answer: str, **extra: Any) -> dict:
        prompt, text = self.prompt(question, answer_type)
        return {
            "images": [image_ref(image)],
            "prompt": text,
            "completion": completion_text(self.processor, prompt, text, answer),
            **extra,
        }

    def instruction_row(self, image: str | bytes, instruction: str, target: str, **extra: Any) -> dict:
        prompt, text = self.raw_prompt(instruction)
        return {
            "images": [image_ref(image)],
            "prompt": text,
            "completion": completion_text(self.processor, prompt, text, target),
            **extra,
        }

    def pair_row(
        self, image: str | bytes, question: str, answer_type: str, chosen: str, rejected: str
    ) -> dict:
        prompt, text = self.prompt(question, answer_type)
        return {
            "images": [image_ref(image)],
            "prompt": text,
            "chosen": completion_text(self.processor, prompt, text, chosen),
            "rejected": completion_text(self.processor, prompt, text, rejected),
        }


def qa_rows(samples: Sequence[VQASample], builder: RowBuilder) -> list[dict]:
    return [builder.qa_row(s.image, s.question, s.prompt_answer_type, s.answer, kind="qa") for s in samples]


def to_dataset(rows: Sequence[Mapping[str, Any]]) -> Any:
    """A `datasets.Dataset` whose `images` column decodes lazily (paths or bytes, never all pixels)."""
    from datasets import Dataset, Image, List

    if not rows:
        raise BadInput("no training rows (empty training set)")
    keys = list(rows[0])
    ds = Dataset.from_dict({k: [r[k] for r in rows] for k in keys})
    return ds.cast_column("images", List(Image()))
