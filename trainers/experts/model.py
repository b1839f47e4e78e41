"""`model` expert: a VQA model as the judge, reached through the model adapters (`hf:` or `openai:`).

The judge answers each question itself (greedy, the benchmark's prompt policy) and scores each
candidate 10 if it says the same thing (strict normalization: case, punctuation, articles, number
words), else 0; an empty judge answer makes the item unjudgeable. On Phantom, the judge is a model
trained on a separate Phantom build (other images, never the policy's pool or the test split): a
judge that learned the task from its own data, not one that reads the scene. Its own accuracy on
the pool (`agreement`) is reported beside the line it judged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from medvqa.errors import BadInput
from medvqa.registry import experts


@dataclass
class ModelExpertConfig:
    model: str = field(default="", metadata={"help": "the judge model spec: hf:DIR or openai:MODEL@URL"})
    prompt_policy: str = field(default="", metadata={"help": "prompt policy of the judge's questions"})
    batch_size: int = field(default=64, metadata={"help": "questions per generate() call"})
    max_new_tokens: int = field(default=8, metadata={"help": "longest judge answer in tokens"})
    correct_score: float = field(default=10.0, metadata={"help": "score of an answer the judge agrees with"})
    wrong_score: float = field(default=0.0, metadata={"help": "score of any other answer"})


@experts.register("model")
class ModelExpert:
    """Scores answers by agreement with a judge model's own greedy answer."""

    name: ClassVar[str] = "model"
    config_class: ClassVar[type[ModelExpertConfig]] = ModelExpertConfig

    def __init__(self, config: ModelExpertConfig | None = None, **overrides: Any):
        config = config or ModelExpertConfig()
        if overrides:
            config = ModelExpertConfig(**{**asdict(config), **overrides})
        if not config.model:
            raise BadInput("the model expert needs a judge model spec (--expert-model hf:DIR)", field="model")
        self.config = config
        self._model: Any = None
        self._answers: dict[tuple[str, str], str] = {}
        self._counts = {"items": 0, "judged": 0, "empty_judge_answer": 0, "generated": 0}

    def counts(self) -> dict[str, int]:
        return dict(self._counts)

    def _judge_answers(self, keys: Sequence[tuple[Any, str]]) -> list[str]:
        """The judge model's greedy answers (each (image, question) generated once)."""
        from medvqa.models import load_model
        from medvqa.prompts import get_policy
        from medvqa.trainers.rows import guess_answer_type
        from medvqa.types import GenerationRequest, GenerationSettings

        todo = list(dict.fromkeys((str(i), q) for i, q in keys if (str(i), q) not in self._answers))
        if todo:
            if self._model is None:
                self._model = load_model(self.config.model)
            policy = get_policy(self.config.prompt_policy or None)
            settings = GenerationSettings(max_new_tokens=self.config.max_new_tokens)
            bs = max(1, self.config.batch_size)
            for start in range(0, len(todo), bs):
                chunk = todo[start : start + bs]
                requests = [
                    GenerationRequest(image=i, prompt=policy.render(q, guess_answer_type(q)))
                    for i, q in chunk
                ]
                for key, text in zip(chunk, self._model.generate(requests, settings), strict=True):
                    self._answers[key] = text
                self._counts["generated"] += len(chunk)
        return [self._answers[(str(i), q)] for i, q in keys]

    def judge_many(self, items: Sequence[Any]) -> list[list[float] | None]:
        from medvqa.scoring import normalize_strict

        items = [(it["image"], it["question"], it["answers"]) if isinstance(it, dict) else it for it in items]
        truths = self._judge_answers([(image, question) for image, question, _ in items])
        out: list[list[float] | None] = []
        for (_, _, answers), truth in zip(items, truths, strict=True):
            self._counts["items"] += 1
            truth_norm = normalize_strict(truth or "")
            if not truth_norm:
                self._counts["empty_judge_answer"] += 1
                out.append(None)
                continue
            self._counts["judged"] += 1
            out.append(
                [
                    self.config.correct_score
                    if normalize_strict(a or "") == truth_norm
                    else self.config.wrong_score
                    for a in answers
                ]
            )
        return out

    def judge(self, image: str | bytes, question: str, answers: Sequence[str]) -> list[float] | None:
        return self.judge_many([(image, question, answers)])[0]

    def agreement(self, samples: Sequence[Any]) -> dict[str, Any]:
        """The judge's own accuracy on labeled samples (its answer vs the gold answer)."""
        from medvqa.trainers.experts.accuracy import judge_accuracy

        return {**judge_accuracy(self, samples, self.config.correct_score), "judge_model": self.config.model}
