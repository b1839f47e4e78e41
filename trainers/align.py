"""`align`: image → caption training, the LLaVA stage-1 ("feature alignment") analog.

Gives a randomly initialised tiny model the general image-text grounding that a real LLaVA base
already has, before any VQA: the prompt is a describe-instruction about the image (no answer-style
instruction), the completion is the caption. Projector and language model (and the vision tower)
are all trained; trl `SFTTrainer`, loss on the caption only.

The training samples are caption records as `VQASample`s (question = the instruction, answer =
the caption); `medvqa train --trainer align` builds them from the benchmark's captions (Phantom
ships `captions.jsonl`) or from `--captions FILE.jsonl` (`{"image", "caption"}` per line).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from medvqa.registry import trainers
from medvqa.trainers.base import TrainerPlugin
from medvqa.trainers.config import TrainConfig
from medvqa.types import Checkpoint, TrainRequest, VQASample


@dataclass
class AlignConfig(TrainConfig):
    """Caption-alignment knobs. Defaults: LLaVA stage-1 style (lr 1e-3, 1 epoch, cosine)."""

    learning_rate: float = 1e-3
    warmup_ratio: float = 0.03
    instruction: str = field(
        default="", metadata={"help": "the describe-instruction; empty = the samples' own question text"}
    )


def caption_samples(records: Iterable[Mapping[str, str]], *, benchmark: str, split: str) -> list[VQASample]:
    """Caption records (`{"image_id", "image", "caption"}`) as the samples `align` trains on:
    question = the describe-instruction, answer = the caption."""
    from medvqa.prompts import CAPTION_INSTRUCTION

    return [
        VQASample(
            id=f"{r['image_id']}-caption",
            image=r["image"],
            question=CAPTION_INSTRUCTION,
            answer=r["caption"],
            answer_type="OPEN",
            benchmark=benchmark,
            split=split,
            meta={"image_id": r["image_id"]},
        )
        for r in records
    ]


ALIGN_PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "phantom": {"learning_rate": 1e-3, "max_steps": 600, "warmup_ratio": 0.0, "logging_steps": 100},
}


@trainers.register("align")
class AlignTrainer(TrainerPlugin):
    """Image → caption alignment training (LLaVA stage-1 analog; captions from the benchmark)."""

    name = "align"
    config_class = AlignConfig
    presets = ALIGN_PRESETS
    trains_on = "captions"

    def train(self, request: TrainRequest) -> Checkpoint:
        cfg = self._config(request)
        return self._train_supervised(
            request,
            cfg,
            lambda builder: [
                builder.instruction_row(s.image, cfg.instruction or s.question, s.answer, kind="caption")
                for s in request.train_samples
            ],
            loss="nll (caption only)",
            n_labeled=0,
            n_captions=len(request.train_samples),
        )
