"""`phantom` expert: the scene-grounded oracle judge for Phantom images.

It parses the question with the Phantom grammar (`benchmarks.phantom.parse_question`), looks up
the true answer for the image's scene (`answer_for`) and scores each candidate answer 0–10:
10 when it says the true answer (`answer_matches`: case, punctuation, articles, digits,
x-ray spellings), else 0. A question outside the grammar, or one whose answer is undefined for that
scene (e.g. "where is the lesion?" with two lesions), is unjudgeable: `judge` returns None and
the pair is skipped — never guessed. Only training-split scenes are used by default: the judge
must not look at test images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from medvqa.errors import BadInput
from medvqa.registry import experts


@dataclass
class PhantomExpertConfig:
    root: str = field(
        default="",
        metadata={"help": "Phantom data root; empty = found from each image's path (ROOT/split/images/)"},
    )
    split: str = field(
        default="train", metadata={"help": "the split whose scenes may be judged (never test)"}
    )
    correct_score: float = field(default=10.0, metadata={"help": "score of an answer that says the truth"})
    wrong_score: float = field(default=0.0, metadata={"help": "score of any other answer"})


@experts.register("phantom")
class PhantomExpert:
    """Oracle judge for Phantom: parses the question, scores answers 0/10 against the scene."""

    name: ClassVar[str] = "phantom"
    config_class: ClassVar[type[PhantomExpertConfig]] = PhantomExpertConfig

    def __init__(self, config: PhantomExpertConfig | None = None, **overrides: Any):
        config = config or PhantomExpertConfig()
        if overrides:
            config = PhantomExpertConfig(**{**asdict(config), **overrides})
        if config.split == "test":
            raise BadInput(
                "the phantom expert judges training images only, not the test split", field="split"
            )
        self.config = config
        self._scenes: dict[Path, dict[str, Any]] = {}  # root -> {image_id: Scene}
        self._counts = {"items": 0, "judged": 0, "unparseable": 0, "undefined": 0, "unknown_image": 0}

    def counts(self) -> dict[str, int]:
        return dict(self._counts)

    def _root_for(self, image: str | bytes) -> Path:
        if self.config.root:
            return Path(self.config.root)
        if isinstance(image, bytes):
            raise BadInput("the phantom expert needs image paths (or --root), got image bytes", field="image")
        path = Path(image)
        # ROOT/<split>/images/<image_id>.png
        return path.parent.parent.parent

    def _scene(self, image: str | bytes) -> Any:
        from medvqa.benchmarks.phantom import load_scenes

        root = self._root_for(image).resolve()
        if root not in self._scenes:
            self._scenes[root] = load_scenes(root, self.config.split)
        image_id = Path(str(image)).stem
        return self._scenes[root].get(image_id)

    def judge(self, image: str | bytes, question: str, answers: Sequence[str]) -> list[float] | None:
        from medvqa.benchmarks.phantom import answer_for, answer_matches, parse_question

        self._counts["items"] += 1
        scene = self._scene(image)
        if scene is None:
            self._counts["unknown_image"] += 1
            return None
        parsed = parse_question(question)
        if parsed is None:
            self._counts["unparseable"] += 1
            return None
        gold = answer_for(scene, parsed)
        if gold is None:
            self._counts["undefined"] += 1
            return None
        self._counts["judged"] += 1
        return [
            self.config.correct_score if answer_matches(gold, a or "") else self.config.wrong_score
            for a in answers
        ]

    def judge_many(self, items: Sequence[Any]) -> list[list[float] | None]:
        return [self.judge(*_unpack(item)) for item in items]

    def agreement(self, samples: Sequence[Any]) -> dict[str, Any]:
        """Share of labeled samples whose gold answer this judge scores as correct (its accuracy)."""
        from medvqa.trainers.experts.accuracy import judge_accuracy

        return judge_accuracy(self, samples, self.config.correct_score)

    def category(self, question: str) -> str | None:
        """The question's Phantom slot (None outside the grammar): per-slot pair counts."""
        from medvqa.benchmarks.phantom import parse_question

        parsed = parse_question(question)
        return parsed.slot if parsed is not None else None


def _unpack(item: Any) -> tuple[Any, str, Sequence[str]]:
    if isinstance(item, dict):
        return item["image"], item["question"], item["answers"]
    image, question, answers = item
    return image, question, answers
