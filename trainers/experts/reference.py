"""`reference` expert: judges against gold answers of labeled training QA the policy did not train on.

The cheapest verifiable signal on real datasets: the labeled training QA outside the fraction the
policy was trained on (`TrainRequest.heldout_samples`). A generated question about an image is
judgeable only if it matches (after normalization) a held-out question about the same image;
each answer then scores 10 × the token F1 between the answer and the gold answer (10 = same
words). Anything else is unjudgeable (None), never guessed. Test-split samples are refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from medvqa.errors import BadInput
from medvqa.registry import experts
from medvqa.scoring import normalize_strict, strict_open
from medvqa.types import VQASample


def _norm(text: str) -> str:
    """The strict scorer's normalization: a question matches, and an answer counts, as the metric sees it."""
    return normalize_strict(text or "")


def _f1(pred: str, gold: str) -> float:
    """The strict scorer's token F1 (medvqa.scoring.strict_open): the judge and the metric agree."""
    return strict_open(_norm(gold), _norm(pred))[2]


@dataclass
class ReferenceExpertConfig:
    samples_file: str = field(
        default="",
        metadata={
            "help": "held-out labeled TRAINING samples (our samples JSONL); empty = given by the trainer"
        },
    )
    max_score: float = field(
        default=10.0, metadata={"help": "score of an answer with the gold answer's words"}
    )


def _image_key(image: str | bytes, meta_id: str | None = None) -> str:
    if meta_id:
        return meta_id
    if isinstance(image, bytes):
        from medvqa.safety import image_sha256

        return image_sha256(image)[:16]
    return str(Path(image).resolve())


@experts.register("reference")
class ReferenceExpert:
    """Judges against gold answers of held-out labeled training QA (training split only, never test)."""

    name: ClassVar[str] = "reference"
    config_class: ClassVar[type[ReferenceExpertConfig]] = ReferenceExpertConfig
    wants_heldout_samples: ClassVar[bool] = True  # the trainer passes TrainRequest.heldout_samples

    def __init__(
        self,
        config: ReferenceExpertConfig | None = None,
        *,
        samples: Iterable[VQASample] | None = None,
        **overrides: Any,
    ):
        config = config or ReferenceExpertConfig()
        if overrides:
            config = ReferenceExpertConfig(**{**asdict(config), **overrides})
        self.config = config
        if samples is None:
            if not config.samples_file:
                raise BadInput("the reference expert needs held-out training samples (--samples-file)")
            from medvqa.answer_files import read_samples_jsonl  # the one samples-JSONL reader

            samples = read_samples_jsonl(config.samples_file)
        self._gold: dict[tuple[str, str], str] = {}
        self.n_samples = 0
        for s in samples:
            if s.split != "train":
                raise BadInput(
                    f"the reference expert judges with training data only; sample {s.id!r} is from split {s.split!r}",
                    record=s.id,
                    field="split",
                )
            self._gold[(_image_key(s.image), _norm(s.question))] = s.answer
            self.n_samples += 1
        self._counts = {"items": 0, "judged": 0, "no_reference": 0}

    def counts(self) -> dict[str, int]:
        return dict(self._counts)

    def judge(self, image: str | bytes, question: str, answers: Sequence[str]) -> list[float] | None:
        self._counts["items"] += 1
        gold = self._gold.get((_image_key(image), _norm(question)))
        if gold is None:
            self._counts["no_reference"] += 1
            return None
        self._counts["judged"] += 1
        return [round(self.config.max_score * _f1(a, gold), 4) for a in answers]

    def judge_many(self, items: Sequence[Any]) -> list[list[float] | None]:
        out = []
        for item in items:
            if isinstance(item, dict):
                out.append(self.judge(item["image"], item["question"], item["answers"]))
            else:
                out.append(self.judge(*item))
        return out
