"""The core types, in one place. Small, frozen, JSON-friendly.

Every other module speaks these: benchmarks produce `VQASample`s, models answer them under
`GenerationSettings`, scorers turn predictions into `MetricValue`s, trainers turn a
`TrainRequest` into a `Checkpoint`, experts return scores for answer candidates.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

AnswerType = Literal["OPEN", "CLOSED"]


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hex digest of a JSON-serialisable object, independent of dict order and process."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:length]


@dataclass(frozen=True)
class VQASample:
    """One question about one image, with its gold answer.

    `image` is an absolute path resolved inside the benchmark's data root, or the encoded image
    bytes (parquet layouts). `answer_type` comes from the dataset's own metadata where it has one.
    `meta` carries what else the dataset knows: modality, organ, content type, `image_id`, ...
    """

    id: str
    image: str | bytes
    question: str
    answer: str
    answer_type: AnswerType
    benchmark: str
    split: str
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def image_id(self) -> str:
        """The identity of the image (for clustering CIs and image-level fractions)."""
        if "image_id" in self.meta:
            return str(self.meta["image_id"])
        if isinstance(self.image, bytes):
            from medvqa.safety import image_sha256  # the one image hash (short: an id, not a key)

            return image_sha256(self.image)[:16]
        return str(self.image)

    @property
    def prompt_answer_type(self) -> AnswerType:
        """The answer type a prompt policy may see.

        The dataset's own `answer_type` where it has one. Layouts without one define CLOSED as "gold
        answer is yes/no" (`meta["answer_type_source"] == "gold"`); a prompt that offered "[yes, no]"
        for exactly those would leak the label, so they are prompted as OPEN.
        """
        return "OPEN" if self.meta.get("answer_type_source") == "gold" else self.answer_type

    def to_json(self) -> dict[str, Any]:
        if isinstance(self.image, bytes):
            raise TypeError("samples holding image bytes cannot be written to JSONL; export the image first")
        return {
            "id": self.id,
            "image": self.image,
            "question": self.question,
            "answer": self.answer,
            "answer_type": self.answer_type,
            "benchmark": self.benchmark,
            "split": self.split,
            "meta": dict(self.meta),
        }


@dataclass(frozen=True)
class GenerationSettings:
    """How a model is asked to answer. Part of every cache key and every score record."""

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def fingerprint(self) -> str:
        return stable_hash(self.to_json())


@dataclass(frozen=True)
class Prompt:
    """What a model is shown for one sample, as chosen by a prompt policy (never from the gold answer).

    Either chat `messages` in the transformers/OpenAI shape, the image as a `{"type": "image"}` part
    (each adapter renders them its own way: a chat template, a data URL), or, for a published
    raw-text convention, `text` with one `<image>` placeholder, used verbatim.
    """

    messages: tuple[Mapping[str, Any], ...] = ()
    text: str | None = None
    policy: str = ""


@dataclass(frozen=True)
class GenerationRequest:
    """One thing to answer: an image (path or bytes) and the prompt about it.

    `seed`, when set, is this request's own sampling seed (None: `GenerationSettings.seed`). A
    sampled answer then depends only on (model, request, settings, seed) — not on the batch it
    shares or the requests before it — so a resumed or re-batched stage draws the same samples,
    and a seeded request is cacheable. n samples of one question are n requests with n seeds
    (hf: one `torch.Generator` per request; openai: `seed` in each HTTP request).
    """

    image: str | bytes
    prompt: Prompt
    id: str = ""
    seed: int | None = None


@dataclass(frozen=True)
class MetricValue:
    """One number of a score, in percent, with how many items it averages and its 95% CI."""

    value: float
    n: int
    ci_low: float | None = None
    ci_high: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Checkpoint:
    """A trained model folder (loadable by the `hf:` adapter) and what produced it.

    `meta` is the content of `checkpoint.json`: trainer, fraction, seed, data-manifest hash,
    n_labeled (QA samples), n_pairs (preference pairs), versions, config.
    """

    path: Path
    meta: Mapping[str, Any]

    @property
    def model_spec(self) -> str:
        return f"hf:{self.path}"


@dataclass(frozen=True)
class TrainRequest:
    """Everything a trainer needs: a base model, labeled samples at some fraction, unlabeled images."""

    base_model: str
    train_samples: Sequence[VQASample]
    out_dir: Path
    seed: int = 0
    fraction: float = 1.0
    manifest_hash: str = ""
    unlabeled_images: Sequence[str] = ()
    config: Any = None  # the trainer's own config dataclass
    # Samples the policy did not train on (for the `reference` expert); never test data.
    heldout_samples: Sequence[VQASample] = ()
    # The benchmark's data folder, where the images lie: an expert that uploads images (openai)
    # reads them only from inside it. "" = unknown.
    data_root: str = ""


@runtime_checkable
class VQAModel(Protocol):
    """A model that answers (image, prompt) pairs. Adapters: `hf`, `openai`."""

    spec: str

    @property
    def fingerprint(self) -> str:
        """Identity of the weights (or endpoint + model name): part of every prediction cache key."""
        ...

    def generate(self, requests: Sequence[GenerationRequest], settings: GenerationSettings) -> list[str]: ...


@runtime_checkable
class Expert(Protocol):
    """A judge: scores each answer to a question about an image, or returns None (unjudgeable)."""

    name: ClassVar[str]

    def judge(self, image: str | bytes, question: str, answers: Sequence[str]) -> list[float] | None: ...


@dataclass(frozen=True)
class NoOptions:
    """This benchmark takes no options."""


@dataclass(frozen=True)
class SkippedRecord:
    """A record a loader skipped under `skip_bad`: where it was and why.

    Every benchmark lists these in `Benchmark.skipped` after `load`, so an eval can count them in
    `scores.json` and list them in `skipped.jsonl` instead of letting `n` shrink silently.
    """

    error: str  # the full one-line message (file, record, field, what is wrong)
    path: str = ""
    record: str = ""
    field: str = ""

    @classmethod
    def from_error(cls, exc: Exception) -> SkippedRecord:
        def text(value: object) -> str:
            return "" if value is None else str(value)

        return cls(
            error=str(exc),
            path=text(getattr(exc, "path", None)),
            record=text(getattr(exc, "record", None)),
            field=text(getattr(exc, "field", None)),
        )

    def to_json(self) -> dict[str, str]:
        return {"stage": "load", **asdict(self)}

    def __str__(self) -> str:
        return self.error


class Benchmark:
    """Base class of a benchmark: the whole contract callers may rely on, declared here.

    Subclasses register themselves with `@benchmarks.register("name")` (the registry refuses a class
    that is not a `Benchmark`) and implement `load` (and usually `detect_layout`, `closed_rule`).

    - `Options`: a frozen dataclass, one field per option with its default and `metadata={"help"}`;
      `Benchmark(**options)` converts (CLI strings too) and validates them. A non-default option is
      part of `version`, so predictions cached for one setting are never served for another.
    - `load(split, root, *, skip_bad, check_images, max_pixels)`: every benchmark takes every keyword;
      afterwards `skipped` lists the records skipped under `skip_bad=True` (`SkippedRecord`s).
    - `closed_rule(root, split)`: how CLOSED is defined ("dataset answer_type" or "gold answer is
      yes/no"), because it changes the split and every report must say which was used.
    - `prompt_policy`: the prompt policy of this benchmark's convention ("" = the harness default).
    - `has_captions` / `load_captions(root, split)`: one caption per image, for the align stage.
    - `vocabulary()`: every text a model of this benchmark must tokenize, where the benchmark can
      enumerate them (a generated one can; `[]` otherwise): `model init-tiny --corpus NAME`.
    """

    name: ClassVar[str] = ""
    version: str = "0"  # the class's version; an instance with non-default options extends it
    splits: ClassVar[tuple[str, ...]] = ("train", "test")
    description: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    prompt_policy: ClassVar[str] = ""
    has_captions: ClassVar[bool] = False

    def __init__(self, **options: Any):
        from medvqa.config import dataclass_from_mapping

        self.options = dataclass_from_mapping(
            self.Options, options, where=f"benchmark {self.name!r}", what="option", from_strings=True
        )
        changed = {
            f.name: getattr(self.options, f.name)
            for f in fields(self.options)
            if getattr(self.options, f.name) != f.default
        }
        self.version = f"{type(self).version}" + "".join(f"+{k}={v}" for k, v in sorted(changed.items()))
        self.skipped: list[SkippedRecord] = []

    def detect_layout(self, root: Path, split: str = "test") -> str:
        """Which of the known on-disk layouts `root` holds (raise BadInput if none)."""
        raise NotImplementedError

    def closed_rule(self, root: Path, split: str = "test") -> str:
        return "dataset answer_type"

    def load(
        self,
        split: str,
        root: Path,
        *,
        skip_bad: bool = False,
        check_images: str | None = None,
        max_pixels: int | None = None,
    ) -> list[VQASample]:
        """The samples of `split` under `root`; a bad record is a BadInput, or skipped into `skipped`.

        `check_images`: "exists", "verify" (parse) or "decode" (every pixel); None: the benchmark's
        default (`verify` for downloaded data).
        `max_pixels`: the pixel cap above which an image is refused (None: the harness default; 0: none).
        """
        raise NotImplementedError

    def vocabulary(self) -> list[str]:
        return []

    def load_captions(self, root: Path, split: str) -> list[Mapping[str, str]]:
        """`{"image_id", "image" (absolute, inside root), "caption"}` per image, where `has_captions`."""
        from medvqa.errors import BadInput

        raise BadInput(f"benchmark {self.name!r} has no captions")
