"""Step 1 of an eval: the plan — what to run and where, decided without loading a model.

The plan holds the benchmark's questions (after `--limit`), the prompt policy, the decoding
settings, the scoring options and the run folder. Its `key(fingerprint)` is the cache key of every
prediction row: the same plan with the same model always finds the same rows.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medvqa.errors import BadInput
from medvqa.types import Benchmark, GenerationSettings, VQASample, stable_hash

if TYPE_CHECKING:
    from medvqa.evaluate import EvalConfig
    from medvqa.prompts import PromptPolicy

KEY_VERSION = 1


@dataclass(frozen=True)
class EvalPlan:
    """One benchmark split to answer with one model spec, and how to score the answers."""

    benchmark: Benchmark
    split: str
    root: Path
    samples: list[VQASample]
    policy: PromptPolicy
    settings: GenerationSettings
    scorers: tuple[str, ...]
    n_boot: int
    seed: int
    limit: int
    spec: str
    out: Path
    # the records the benchmark skipped while loading (`--skip-bad`), as `SkippedRecord.to_json()`
    load_skips: tuple[dict[str, str], ...] = ()

    @cached_property
    def ids(self) -> list[str]:
        return [s.id for s in self.samples]

    @cached_property
    def ids_hash(self) -> str:
        """The questions asked (a rerun with images that still fail to decode is "already done")."""
        return stable_hash(self.ids)

    @cached_property
    def order(self) -> dict[str, int]:
        return {qid: i for i, qid in enumerate(self.ids)}

    @cached_property
    def generation_policy(self) -> PromptPolicy:
        """The policy as the model sees it: scoring-only options (`+think`) do not change answers."""
        return self.policy.with_strip_think(False)

    @cached_property
    def data_hash(self) -> str:
        """The content of the questions asked, without local paths: two users can tell their data apart."""
        return stable_hash(
            [
                [s.id, s.question, str(s.answer), s.answer_type, _image_ident(s, self.root)]
                for s in self.samples
            ]
        )

    def scoring(self) -> dict[str, Any]:
        """Everything besides the predictions that changes a score: part of what "finished" means."""
        from medvqa.scoring import SCORER_VERSION

        return {
            "scorers": list(self.scorers),
            "scorer_version": SCORER_VERSION,
            "n_boot": self.n_boot,
            "seed": self.seed,
            "strip_think": self.policy.strip_think,
        }

    def key(self, fingerprint: str) -> str:
        return run_key(fingerprint, self.benchmark, self.split, self.generation_policy, self.settings)


def _image_ident(sample: VQASample, root: Path) -> str:
    """The image's dataset id, else its path inside the data root (never an absolute path)."""
    if "image_id" in sample.meta or isinstance(sample.image, bytes):
        return sample.image_id
    try:
        return Path(sample.image).relative_to(root).as_posix()
    except ValueError:
        return Path(sample.image).name


def default_out_dir(model_spec: str, benchmark: str, split: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model_spec.split(",")[0]).strip("_")[-80:] or "model"
    return Path("runs") / "eval" / slug / f"{benchmark}-{split}"


def generation_settings(cfg: EvalConfig, policy: Any) -> GenerationSettings:
    """Harness defaults < the policy's published decoding < explicit flags."""
    values: dict[str, Any] = {**asdict(GenerationSettings()), **dict(policy.generation)}
    if cfg.max_new_tokens is not None:
        values["max_new_tokens"] = cfg.max_new_tokens
    if cfg.temperature is not None:
        values["temperature"] = cfg.temperature
        values["do_sample"] = cfg.temperature > 0
    if cfg.top_p is not None:
        values["top_p"] = cfg.top_p
    values["seed"] = cfg.seed
    if values["max_new_tokens"] < 1:
        raise BadInput("--max-new-tokens must be >= 1")
    if values.get("do_sample") and values.get("temperature", 0) <= 0:
        raise BadInput("sampling needs --temperature > 0")
    return GenerationSettings(**values)


def run_key(fingerprint: str, bench: Any, split: str, policy: Any, settings: GenerationSettings) -> str:
    """The cache key of every prediction row: model identity + benchmark + prompt + decoding."""
    return stable_hash(
        {
            "v": KEY_VERSION,
            "model": fingerprint,
            "benchmark": bench.name,
            "benchmark_version": bench.version,
            "split": split,
            "prompt_policy": policy.to_json(),
            "generation": settings.to_json(),
        }
    )


def make_plan(cfg: EvalConfig, spec: str) -> EvalPlan:
    """Validate `cfg`, load the benchmark's questions and settle every setting (BadInput if wrong)."""
    from medvqa.benchmarks import make_benchmark, parse_options
    from medvqa.prompts import get_policy
    from medvqa.scoring import resolve_scorers

    if cfg.batch_size < 1:
        raise BadInput("--batch-size must be >= 1")
    if cfg.limit < 0:
        raise BadInput("--limit must be >= 0")
    scorers = resolve_scorers(cfg.scorers.split(",") if isinstance(cfg.scorers, str) else cfg.scorers)
    bench = make_benchmark(cfg.benchmark, parse_options(cfg.benchmark_options, flag="--benchmark-options"))
    if cfg.split not in bench.splits:
        raise BadInput(
            f"benchmark {cfg.benchmark!r} has no split {cfg.split!r}; splits: {', '.join(bench.splits)}"
        )
    from medvqa.benchmarks.hub import resolve_root

    resolved = resolve_root(cfg.root)  # a folder, or hf://datasets/OWNER/NAME[@REV] from the HF cache
    root = resolved.path
    if not root.exists():
        raise BadInput("benchmark data folder does not exist", path=root, field="--root")
    bench.version = f"{bench.version}{resolved.version_suffix}"  # the hub commit scored, in every key
    samples: list[VQASample] = bench.load(cfg.split, root, skip_bad=cfg.skip_bad, max_pixels=cfg.max_pixels)
    load_skips = tuple(record.to_json() for record in bench.skipped)
    if cfg.limit:
        samples = samples[: cfg.limit]
    if not samples:
        raise BadInput(f"benchmark {cfg.benchmark!r} split {cfg.split!r} has no questions", path=root)
    policy = get_policy(cfg.prompt_policy or bench.prompt_policy or None)
    settings = generation_settings(cfg, policy)
    out = Path(cfg.out) if cfg.out else default_out_dir(spec, bench.name, cfg.split)
    return EvalPlan(
        benchmark=bench,
        split=cfg.split,
        root=root,
        samples=samples,
        policy=policy,
        settings=settings,
        scorers=scorers,
        n_boot=cfg.n_boot,
        seed=cfg.seed,
        limit=cfg.limit,
        spec=spec,
        out=out,
        load_skips=load_skips,
    )
