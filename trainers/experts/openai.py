"""`openai` expert: an OpenAI-compatible multimodal judge (GPT-4o in the paper; any vLLM model works).

The STLLaVA-Med paper judges each pair of self-generated answers with GPT-4o but does not publish
its instruction, so this one is our own (versioned: `instruction_version`; changing the text means
a new version, and the version is part of every cache key). The reply's first line must hold the
scores (0-10), one per answer: the reference's parse rule (two numbers on the first line, commas
allowed as separators, else unjudgeable), plus a range check. A malformed reply is counted and the
item is unjudgeable (None); it is not an error.

Every reply is stored in an SQLite cache (`medvqa.cache.ResponseCache`) keyed by (model, base URL,
instruction version and text hash, image content hash, question, answers, sampling settings incl.
the seed) the moment it arrives, so a crash or a rerun never pays for the same judgment twice, and a
fully cached rerun needs no API key at all. The key is read from the environment and never stored.

    from medvqa.registry import experts
    Expert = experts.get("openai")
    expert = Expert(Expert.config_class(model="gpt-4o", cache_path="run/judge-cache.sqlite"))
    judgments = expert.judge_many_detailed([(image, question, [a1, a2]), ...])
    expert.counts()  # {"calls": ..., "cache_hits": ..., "malformed": ..., "failed": ..., ...}
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from medvqa.errors import BadInput
from medvqa.openai_support import (
    DEFAULT_API_KEY_ENV,
    ChatClient,
    EndpointError,
    image_data_url,
    map_bounded,
    normalize_base_url,
)
from medvqa.registry import experts
from medvqa.safety import image_sha256

# --------------------------------------------------------------------------------------------------
# The judge instruction (versioned)


@dataclass(frozen=True)
class JudgeInstruction:
    """A system message and a user template (`{question}`, `{answers}`, `{n}`, `{example}`)."""

    version: str
    system: str
    template: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256((self.system + "\x00" + self.template).encode("utf-8")).hexdigest()[:16]

    def render(self, question: str, answers: Sequence[str]) -> str:
        blocks = "\n\n".join(
            f"[Answer {i}]\n{a.strip()}\n[End of Answer {i}]" for i, a in enumerate(answers, start=1)
        )
        example = " ".join(str(s) for s in (7, 3, 9, 5, 0, 10, 6, 2)[: len(answers)])
        return self.template.format(
            question=question.strip(), answers=blocks, n=len(answers), example=example
        )


INSTRUCTIONS: dict[str, JudgeInstruction] = {}


def _register(instruction: JudgeInstruction) -> JudgeInstruction:
    INSTRUCTIONS[instruction.version] = instruction
    return instruction


_register(
    JudgeInstruction(
        version="medvqa-judge-v1",
        system=(
            "You are a board-certified radiologist and pathologist who reviews answers to questions "
            "about medical images (radiographs, CT, MRI, ultrasound, pathology slides, or synthetic "
            "imaging phantoms). You judge strictly from what the image shows and from established "
            "medical knowledge. You are impartial: the order in which answers are presented says "
            "nothing about their quality, and a longer answer is not a better one."
        ),
        template=(
            "Look at the image and read the question about it, then the {n} candidate answers.\n\n"
            "[Question]\n{question}\n\n"
            "{answers}\n\n"
            "[Instruction]\n"
            "Score each answer from 0 to 10 for how well it answers this question about this image.\n"
            "Criteria, in order of importance:\n"
            "1. Correctness: is it true of this image (modality, plane, organ, anatomy, presence and "
            "kind of abnormality, its location, size, count)? A confident claim of a finding that is "
            "not visible is a serious error.\n"
            "2. Relevance: does it answer the question that was asked (a yes/no question with yes or "
            "no, a 'where' question with a location, ...)?\n"
            "3. Precision: a specific correct answer beats a vague or hedged one.\n"
            "4. Concision: a short correct answer is as good as a long correct one; do not reward length.\n"
            "Scale: 10 = correct, complete and specific; 7-9 = correct but less specific or slightly "
            "imprecise; 4-6 = partly correct; 1-3 = mostly wrong; 0 = wrong, unrelated to the image, a "
            "refusal, or empty. Score each answer on its own; equal answers get equal scores. If the "
            "question cannot be answered from the image, an answer that says so scores higher than one "
            "that invents a finding.\n\n"
            "Output format: the first line contains only the {n} scores, in answer order, separated by "
            "a space (for example: {example}). From the second line on, justify the scores in at most "
            "two sentences."
        ),
    )
)

DEFAULT_INSTRUCTION = "medvqa-judge-v1"


def parse_scores(reply: str | None, n: int = 2) -> list[float] | None:
    """The reference's rule: the first line holds exactly `n` numbers (commas count as spaces).

    Anything else — no numbers, a different count, text around them, NaN, a score outside 0-10 — is
    unjudgeable: None.
    """
    if not reply or not reply.strip():
        return None
    first = reply.strip().split("\n", 1)[0].replace(",", " ")
    tokens = first.split()
    if len(tokens) != n:
        return None
    try:
        scores = [float(t) for t in tokens]
    except ValueError:
        return None
    if not all(math.isfinite(s) and 0.0 <= s <= 10.0 for s in scores):
        return None
    return scores


# --------------------------------------------------------------------------------------------------
# Config


@dataclass
class OpenAIExpertConfig:
    """Knobs of the `openai` judge (flags `--expert-...` / a `[expert]` TOML table derive from them)."""

    model: str = field(default="gpt-4o", metadata={"help": "judge model name as the endpoint knows it"})
    base_url: str | None = field(
        default=None,
        metadata={
            "help": "OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 for vLLM; None = the OpenAI API"
        },
    )
    api_key_env: str = field(
        default=DEFAULT_API_KEY_ENV,
        metadata={"help": "environment variable holding the API key (the key itself is never stored)"},
    )
    temperature: float = field(default=0.2, metadata={"help": "judge sampling temperature"})
    max_tokens: int = field(
        default=96, metadata={"help": "reply length limit: the score line + a short reason"}
    )
    seed: int = field(
        default=0, metadata={"help": "sampling seed sent to the endpoint; part of the cache key"}
    )
    image_detail: Literal["auto", "low", "high"] | None = field(
        default=None,
        metadata={"help": "`detail` of the image part (GPT-4o: low is cheaper); None = not sent"},
    )
    instruction_version: str = field(
        default=DEFAULT_INSTRUCTION,
        metadata={
            "help": f"judge instruction version (known: {', '.join(INSTRUCTIONS)}); part of the cache key"
        },
    )
    max_concurrency: int = field(default=8, metadata={"help": "judge requests in flight at once"})
    timeout: float = field(default=60.0, metadata={"help": "seconds per request before it is retried"})
    max_retries: int = field(
        default=5, metadata={"help": "retries on 429/5xx/timeouts before a judgment fails"}
    )
    backoff_initial: float = field(
        default=1.0,
        metadata={"help": "first retry delay in seconds (doubles, with jitter; Retry-After wins)"},
    )
    backoff_max: float = field(default=30.0, metadata={"help": "longest retry delay in seconds"})
    swap_check: bool = field(
        default=False,
        metadata={
            "help": "also judge each item with the answers in reverse order and average (against position bias; 2x cost)"
        },
    )
    image_root: str = field(
        default="",
        metadata={
            "help": "the folder judged images must lie in (absolute paths inside it, or relative to it): "
            "image files are uploaded to the endpoint, so none is read from anywhere else; required "
            "for image paths (stllava judge --root; the trainer passes the benchmark's data folder)"
        },
    )
    cache: bool = field(default=True, metadata={"help": "store every reply in the SQLite cache and reuse it"})
    cache_path: str | None = field(
        default=None,
        metadata={"help": "SQLite judgment cache file; None = ~/.cache/medvqa/openai-judge.sqlite"},
    )


# --------------------------------------------------------------------------------------------------
# The expert


@dataclass(frozen=True)
class JudgeItem:
    image: str | bytes
    question: str
    answers: tuple[str, ...]


@dataclass
class Judgment:
    """The outcome for one item: `scores` (None = unjudgeable) and why."""

    scores: list[float] | None
    status: Literal["ok", "malformed", "failed"]
    reply: str | None = None
    cached: bool = False
    error: str | None = None

    @property
    def skipped(self) -> str | None:
        """A short reason for the `skipped` field of judged.jsonl (None when judged)."""
        if self.status == "ok":
            return None
        if self.status == "malformed":
            return "malformed judge reply"
        return f"judge request failed: {self.error}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _combine_swapped(first: Judgment, swapped: Judgment) -> Judgment:
    """One judgment from an item judged in both answer orders (`swapped` has reversed answers)."""
    cached = first.cached and swapped.cached
    for half in (first, swapped):
        if half.status == "failed":
            return Judgment(None, "failed", None, cached=False, error=half.error)
    for half in (first, swapped):
        if half.status == "malformed":
            return Judgment(None, "malformed", half.reply, cached=cached)
    assert first.scores is not None and swapped.scores is not None
    scores = [(a + b) / 2 for a, b in zip(first.scores, reversed(swapped.scores), strict=True)]
    reply = f"{first.reply}\n---- answers swapped ----\n{swapped.reply}"
    return Judgment(scores, "ok", reply, cached=cached)


def confine_image(image: str, root: str, *, record: object) -> str:
    """The real path of `image` if it lies inside `root` (paths from a file are not trusted: the
    judge uploads what they name). Absolute paths must lead inside `root`, relative ones are taken
    from it; `..`, escaping symlinks and a missing root are BadInput naming the record."""
    from medvqa.safety import resolve_inside

    if not isinstance(image, str) or not image.strip():
        raise BadInput("image must be a path or image bytes", record=record, field="image")
    if not root:
        raise BadInput(
            f"image {image!r}: the openai judge uploads image files, so it reads them only from a "
            "declared folder; give it (stllava judge --root DIR, or the expert's image_root)",
            record=record,
            field="image",
        )
    rel = os.path.relpath(image, root) if os.path.isabs(image) else image
    if rel == ".." or rel.startswith(".." + os.sep):
        raise BadInput(
            f"image {image!r} lies outside the declared root {root}; refused (nothing outside it is uploaded)",
            record=record,
            field="image",
        )
    return str(resolve_inside(Path(root), rel, path=None, index=record, field="image"))


def _as_item(obj: Any, index: int) -> JudgeItem:
    if isinstance(obj, JudgeItem):
        item = obj
    elif isinstance(obj, Mapping):
        try:
            item = JudgeItem(obj["image"], obj["question"], tuple(obj["answers"]))
        except KeyError as exc:
            raise BadInput(
                f"judge item has no {exc.args[0]!r}", record=index, field=str(exc.args[0])
            ) from None
    else:
        try:
            image, question, answers = obj
        except (TypeError, ValueError):
            raise BadInput("judge item must be (image, question, answers)", record=index) from None
        item = JudgeItem(image, question, tuple(answers))
    if not isinstance(item.question, str) or not item.question.strip():
        raise BadInput("empty question", record=index, field="question")
    if not item.answers or not all(isinstance(a, str) for a in item.answers):
        raise BadInput("answers must be a non-empty list of strings", record=index, field="answers")
    return item


@experts.register("openai")
class OpenAIExpert:
    """GPT-4o (or any OpenAI-compatible multimodal model) scoring answers 0-10, cached on disk."""

    name: ClassVar[str] = "openai"
    config_class: ClassVar[type[OpenAIExpertConfig]] = OpenAIExpertConfig

    def __init__(self, config: OpenAIExpertConfig | None = None, **overrides: Any):
        config = config or OpenAIExpertConfig()
        if overrides:
            config = OpenAIExpertConfig(**{**asdict(config), **overrides})
        self.config = config
        if config.instruction_version not in INSTRUCTIONS:
            raise BadInput(
                f"unknown judge instruction version {config.instruction_version!r}; known: {', '.join(INSTRUCTIONS)}",
                field="instruction_version",
            )
        self.instruction = INSTRUCTIONS[config.instruction_version]
        self.base_url = normalize_base_url(config.base_url)
        if config.max_concurrency < 1:
            raise BadInput(
                f"max_concurrency must be >= 1, got {config.max_concurrency}", field="max_concurrency"
            )
        self._client: ChatClient | None = None  # created on the first uncached request
        self._cache: Any = None
        self._lock = threading.Lock()
        self._counts = {"items": 0, "calls": 0, "cache_hits": 0, "judged": 0, "malformed": 0, "failed": 0}

    def __repr__(self) -> str:
        return f"OpenAIExpert(model={self.config.model!r}, base_url={self.base_url!r})"

    # -- plumbing ----------------------------------------------------------------------------------

    @property
    def identity(self) -> dict[str, str]:
        return {"model": self.config.model, "base_url": self.base_url}

    @property
    def cache_path(self) -> Path | None:
        if not self.config.cache:
            return None
        if self.config.cache_path:
            return Path(self.config.cache_path)
        return Path.home() / ".cache" / "medvqa" / "openai-judge.sqlite"

    def _get_cache(self) -> Any:
        with self._lock:
            if self._cache is None and self.cache_path is not None:
                from medvqa.cache import ResponseCache

                self._cache = ResponseCache(self.cache_path)
            return self._cache

    def _get_client(self) -> ChatClient:
        with self._lock:
            if self._client is None:
                c = self.config
                self._client = ChatClient(
                    model=c.model,
                    base_url=c.base_url,
                    api_key_env=c.api_key_env,
                    timeout=c.timeout,
                    max_retries=c.max_retries,
                    backoff_initial=c.backoff_initial,
                    backoff_max=c.backoff_max,
                    max_concurrency=c.max_concurrency,
                )
            return self._client

    def _count(self, name: str, delta: int = 1) -> None:
        with self._lock:
            self._counts[name] += delta

    def counts(self) -> dict[str, int]:
        """items, calls (requests sent, one per uncached judgment request; two per item with
        `swap_check`), cache_hits (requests answered from the cache), judged, malformed,
        failed, plus the client's http_requests (retries included), retries and token usage (the
        cost of this run: cached judgments cost nothing)."""
        with self._lock:
            out = dict(self._counts)
        stats = self._client.stats if self._client is not None else None
        for name, attr in (
            ("http_requests", "requests"),
            ("retries", "retries"),
            ("prompt_tokens", "prompt_tokens"),
            ("completion_tokens", "completion_tokens"),
        ):
            out[name] = getattr(stats, attr) if stats else 0
        return out

    def sampling(self) -> dict[str, Any]:
        c = self.config
        return {"temperature": float(c.temperature), "max_tokens": int(c.max_tokens), "seed": int(c.seed)}

    def cache_key(self, item: JudgeItem, image_hash: str | None = None) -> str:
        from medvqa.cache import request_key

        return request_key(
            self.identity,
            {
                "kind": "judge",
                "instruction_version": self.instruction.version,
                "instruction_sha256": self.instruction.sha256,
                "image_sha256": image_hash or image_sha256(item.image),
                "image_detail": self.config.image_detail,
                "question": item.question,
                "answers": list(item.answers),
                **self.sampling(),
            },
        )

    def messages(self, item: JudgeItem) -> list[dict[str, Any]]:
        """The chat request for one item: system instruction + [image, question and answers]."""
        image_url: dict[str, Any] = {"url": image_data_url(item.image)}
        if self.config.image_detail:
            image_url["detail"] = self.config.image_detail
        return [
            {"role": "system", "content": self.instruction.system},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": image_url},
                    {"type": "text", "text": self.instruction.render(item.question, item.answers)},
                ],
            },
        ]

    def _confined(self, item: JudgeItem, index: int) -> JudgeItem:
        """`item` with its image path resolved inside the declared `root` (refused elsewhere)."""
        if isinstance(item.image, bytes):
            return item
        return JudgeItem(
            confine_image(item.image, self.config.image_root, record=index), item.question, item.answers
        )

    # -- judging -----------------------------------------------------------------------------------

    def judge(self, image: str | bytes, question: str, answers: Sequence[str]) -> list[float] | None:
        """Scores (0-10) for each answer, or None when the reply is malformed or the request failed."""
        return self.judge_many_detailed([(image, question, list(answers))])[0].scores

    def judge_many(self, items: Sequence[Any]) -> list[list[float] | None]:
        """`judge` for many items at once: (image, question, answers) tuples, dicts or `JudgeItem`s."""
        return [j.scores for j in self.judge_many_detailed(items)]

    def judge_many_detailed(
        self, items: Sequence[Any], *, on_result: Callable[[int, Judgment], None] | None = None
    ) -> list[Judgment]:
        """A `Judgment` per item, in order. Cached items are answered first; the rest go to the
        endpoint, at most `max_concurrency` at a time, each reply cached as it arrives. Identical
        items in one batch are asked once. `on_result(index, judgment)` is called (in this thread) as
        each item is resolved. A wrong key / model / URL raises BadInput; other failures only mark
        their items `failed` (not cached, so the next run asks again).

        With `swap_check`, each item is also judged with its answers in reverse order and the two
        score lists are averaged (a failed or malformed half makes the item failed / malformed)."""
        parsed = [self._confined(_as_item(obj, i), i) for i, obj in enumerate(items)]
        self._count("items", len(parsed))
        results: list[Judgment | None] = [None] * len(parsed)

        def emit(i: int, judgment: Judgment) -> None:
            results[i] = judgment
            self._count({"ok": "judged", "malformed": "malformed", "failed": "failed"}[judgment.status])
            if on_result is not None:
                on_result(i, judgment)

        if not self.config.swap_check:
            self._judge_requests(parsed, emit)
        else:
            expanded = []
            for item in parsed:
                expanded += [item, JudgeItem(item.image, item.question, tuple(reversed(item.answers)))]
            halves: dict[int, Judgment] = {}

            def collect(k: int, judgment: Judgment) -> None:
                halves[k] = judgment
                i = k // 2
                if 2 * i in halves and 2 * i + 1 in halves:
                    emit(i, _combine_swapped(halves.pop(2 * i), halves.pop(2 * i + 1)))

            self._judge_requests(expanded, collect)
        return [r for r in results if r is not None]

    def _judge_requests(
        self, parsed: Sequence[JudgeItem], on_result: Callable[[int, Judgment], None]
    ) -> None:
        """One request per distinct item (cache first, then the endpoint); `on_result` per item."""
        cache = self._get_cache()
        hashes: dict[Any, str] = {}  # per image: hashed once per call

        def image_hash(image: str | bytes) -> str:
            ref = ("bytes", hashlib.sha256(image).hexdigest()) if isinstance(image, bytes) else str(image)
            if ref not in hashes:
                hashes[ref] = image_sha256(image)
            return hashes[ref]

        groups: dict[str, list[int]] = {}
        for i, item in enumerate(parsed):
            groups.setdefault(self.cache_key(item, image_hash(item.image)), []).append(i)

        def resolve(key: str, reply: str | None, *, cached: bool, error: str | None = None) -> None:
            for n, i in enumerate(groups[key]):
                if error is not None:
                    judgment = Judgment(None, "failed", None, cached=False, error=error)
                else:
                    scores = parse_scores(reply, len(parsed[i].answers))
                    status: Literal["ok", "malformed"] = "ok" if scores is not None else "malformed"
                    judgment = Judgment(scores, status, reply, cached=cached or n > 0)
                on_result(i, judgment)

        misses: list[str] = []
        for key in groups:
            hit = cache.get(key) if cache is not None else None
            if hit is not None:
                self._count("cache_hits", len(groups[key]))
                resolve(key, str(hit), cached=True)
            else:
                misses.append(key)

        def ask(key: str) -> tuple[str | None, str | None]:
            item = parsed[groups[key][0]]
            client = self._get_client()
            self._count("calls")
            try:
                reply = client.complete(self.messages(item), **self.sampling())
            except EndpointError as exc:
                return None, str(exc)
            if cache is not None:
                cache.put(
                    key,
                    reply,
                    request={
                        **self.identity,
                        "instruction_version": self.instruction.version,
                        "image_sha256": image_hash(item.image),
                        "question": item.question,
                        "answers": list(item.answers),
                        **self.sampling(),
                    },
                )
            return reply, None

        if misses:
            map_bounded(
                ask,
                misses,
                self.config.max_concurrency,
                on_result=lambda j, out: resolve(misses[j], out[0], cached=False, error=out[1]),
            )

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
            if self._cache is not None:
                self._cache.close()
                self._cache = None

    def __enter__(self) -> OpenAIExpert:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
