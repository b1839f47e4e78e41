"""`noisy-phantom` expert: the Phantom scene oracle with a seeded error rate (judge-quality curves).

The scene oracle is always right, so on Phantom its feedback is label-equivalent: an upper bound.
This expert flips each verdict (correct ↔ wrong) with probability `error_rate`, decided by a hash
of (seed, image name, question, answer): the same answer to the same question is always judged the
same way, whatever the order, batch or rank that asks. Gain over SFT at error rates 0/10/20/30%
shows how fast STLLaVA-Med's gain erodes as the judge gets worse.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from medvqa.errors import BadInput
from medvqa.registry import experts
from medvqa.trainers.experts.phantom import PhantomExpert, PhantomExpertConfig
from medvqa.types import stable_hash


@dataclass
class NoisyPhantomExpertConfig(PhantomExpertConfig):
    error_rate: float = field(default=0.1, metadata={"help": "probability that a verdict is flipped"})
    seed: int = field(default=0, metadata={"help": "seed of which verdicts are flipped"})


@experts.register("noisy-phantom")
class NoisyPhantomExpert(PhantomExpert):
    """The Phantom oracle, wrong on a seeded `error_rate` share of its verdicts."""

    name: ClassVar[str] = "noisy-phantom"
    config_class: ClassVar[type[NoisyPhantomExpertConfig]] = NoisyPhantomExpertConfig

    def __init__(self, config: NoisyPhantomExpertConfig | None = None, **overrides: Any):
        config = config or NoisyPhantomExpertConfig()
        if overrides:
            config = NoisyPhantomExpertConfig(**{**config.__dict__, **overrides})
        if not 0.0 <= config.error_rate <= 1.0:
            raise BadInput(f"error_rate must be in [0, 1], got {config.error_rate}", field="error_rate")
        super().__init__(config)
        self.config: NoisyPhantomExpertConfig = config
        self._counts["flipped"] = 0

    def _flipped(self, image: str | bytes, question: str, answer: str) -> bool:
        key = stable_hash(
            [self.config.seed, Path(str(image)).stem, question.strip().lower(), answer.strip()], 16
        )
        return random.Random(int(key, 16)).random() < self.config.error_rate

    def judge(self, image: str | bytes, question: str, answers: Sequence[str]) -> list[float] | None:
        scores = super().judge(image, question, answers)
        if scores is None:
            return None
        hi, lo = self.config.correct_score, self.config.wrong_score
        out = []
        for a, s in zip(answers, scores, strict=True):
            if self._flipped(image, question, a or ""):
                self._counts["flipped"] += 1
                s = lo if s == hi else hi
            out.append(s)
        return out
