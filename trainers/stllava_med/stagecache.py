"""Stage cache: stage 1, `questions.jsonl` and `answers.jsonl` computed once for the runs that share them.

Two STLLaVA-Med runs that differ only in what acts after the answers (the judge, the pairs, DPO)
train the same stage 1 and sample the same questions and answers, seed for seed. With
`stage_cache` set these live in `<stage_cache>/<key>/`, the key a hash of everything they depend
on (`key_inputs`): the base model's spec and files (and those of an `answering_model`), the
labeled samples and their images, the unlabeled pool and its images, seed, fraction, library
versions, where it runs (ranks, threads, device), and every config field except those in
`AFTER_ANSWERS`. It is an exclusion list so that a field added later is part of the key: a miss,
never a wrong reuse.

One process computes an entry: its main rank holds the entry's lock while every rank computes
(stage 1 is skipped once its `checkpoint.json` exists and the stage files resume, inside the entry
as in OUT/stages, so a killed run's successor goes on where it stopped). Another process with the
same key waits for the lock, then reuses. A finished entry gets `complete.json`, written atomically
and once, holding its files' digests, which every reuse checks; nothing writes to it again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medvqa.distributed import Dist
from medvqa.errors import BadInput
from medvqa.trainers.stllava_med.config import STAGE_FILES, STLLaVAMedConfig
from medvqa.types import TrainRequest, stable_hash

log = logging.getLogger("medvqa.train")

CACHE_FORMAT = 1  # bump when what an entry holds, or how it is computed, changes: old entries miss
KEY_LENGTH = 20
KEY_FILE = "key.json"  # the key's inputs, for a reader who wants to know what an entry is
COMPLETE_FILE = "complete.json"
CACHED_FILES = ("questions", "answers")

# Config fields that act only after the answers are sampled: the judge, the pairs, DPO, the
# process-group timeout, logging, and the cache's own folder. Every other field is in the key.
AFTER_ANSWERS = frozenset(
    {
        "expert",
        "expert_options",
        "judge_cache",
        "tie_policy",
        "pair_min_margin",
        "pairs_per_question",
        "labeled_replay",
        "dpo_loss",
        "beta",
        "dpo_learning_rate",
        "dpo_num_train_epochs",
        "dpo_max_steps",
        "dpo_max_epochs",
        "dpo_batch_size",
        "dpo_report_pairs",
        "dpo_pack_pairs",
        "dpo_lr_scheduler_type",
        "dpo_warmup_ratio",
        "dist_timeout_s",
        "logging_steps",
        "stage_cache",
    }
)


def base_model_identity(spec: str) -> dict[str, Any]:
    """The base model's spec and a hash of its config and weight files (a retrained base misses)."""
    from medvqa.models import parse_model_spec
    from medvqa.models.hf import model_fingerprint, resolve_model_dir

    adapter_name, target, options = parse_model_spec(spec)
    if adapter_name != "hf":
        raise BadInput(
            f"trainers need an hf: model spec (a transformers checkpoint), got {spec!r}", field="--model"
        )
    model_dir, adapter_dir = resolve_model_dir(target)
    adapter = Path(options["adapter"]).expanduser() if options.get("adapter") else adapter_dir
    # trainers always load float32 (`trainers.models.load_model_and_processor`)
    files = model_fingerprint(model_dir, adapter, "float32", options.get("revision") or None)
    return {"spec": spec, "files": files}


def compute_identity(dist: Dist) -> dict[str, Any]:
    """Where the stages run: rank count (stage 1 trains data-parallel), torch threads, device."""
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"world": dist.world, "threads": torch.get_num_threads(), "device": device}


def _image_digest(image: str | bytes, memo: dict[str, str]) -> str:
    from medvqa.safety import image_sha256

    if isinstance(image, bytes):
        return image_sha256(image)
    if image not in memo:
        memo[image] = image_sha256(image)
    return memo[image]


def samples_digest(samples: Sequence[Any], memo: dict[str, str]) -> str:
    """Hash of the labeled samples in training order: ids, texts, answer types, image paths and bytes."""
    rows = [
        [s.benchmark, s.split, s.id, s.image_id, s.image if isinstance(s.image, str) else "",
         _image_digest(s.image, memo), s.question, s.answer, s.answer_type, s.prompt_answer_type]
        for s in samples
    ]  # fmt: skip
    return stable_hash(rows, 64)


def key_inputs(
    request: TrainRequest, cfg: STLLaVAMedConfig, images: Sequence[str], dist: Dist
) -> dict[str, Any]:
    """Everything stage 1, the questions and the answers depend on (`images`: the unlabeled pool used)."""
    from medvqa.io import library_versions

    memo: dict[str, str] = {}
    pool = [[str(i), _image_digest(str(i), memo)] for i in images]
    return {
        "format": CACHE_FORMAT,
        "base_model": base_model_identity(request.base_model),
        "labeled": {
            "manifest_hash": request.manifest_hash,
            "n": len(request.train_samples),
            "samples": samples_digest(request.train_samples, memo),
        },
        "unlabeled": {"n": len(pool), "images": stable_hash(pool, 64)},
        "seed": request.seed,
        "fraction": request.fraction,
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in AFTER_ANSWERS},
        # an SFT checkpoint copied in as the answering model: its files, so a retrained one misses
        **(
            {"answering_model": base_model_identity(f"hf:{cfg.answering_model}")}
            if cfg.answering_model
            else {}
        ),
        "versions": library_versions(),
        "compute": compute_identity(dist),
    }


def cache_key(inputs: Mapping[str, Any]) -> str:
    """The entry's folder name: a hash of `key_inputs`."""
    return stable_hash(dict(inputs), KEY_LENGTH)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class StageEntry:
    """One cache entry: `<cache>/<key>/` with `stage1/` (and `stage1-asker/` or `stage1-qa/` where the
    schedule keeps one), `questions.jsonl`, `answers.jsonl`."""

    dir: Path
    key: str
    reused: bool = False  # complete when this run opened it: nothing computed
    stage1_reused: bool = False  # stage 1 finished there before (a killed run's), questions/answers resumed
    counts: dict[str, Any] = field(default_factory=dict)

    @property
    def stage1(self) -> Path:
        return self.dir / "stage1"

    @property
    def files(self) -> dict[str, Path]:
        return {name: self.dir / STAGE_FILES[name] for name in CACHED_FILES}

    @property
    def complete(self) -> bool:
        return (self.dir / COMPLETE_FILE).is_file()

    def digests(self) -> dict[str, Any]:
        from medvqa.models.hf import folder_fingerprint

        out: dict[str, Any] = {p.name: _sha256(p) for p in self.files.values()}
        models = [self.stage1, *sorted(p.parent for p in self.dir.glob("stage1-*/checkpoint.json"))]
        for folder in models:  # stage 1, and its asker or QA phase where the schedule keeps one
            out[folder.name] = {
                **folder_fingerprint(folder),
                "checkpoint.json": _sha256(folder / "checkpoint.json"),
            }
        return out

    def finish(self, counts: Mapping[str, Any], dist: Dist) -> None:
        """Mark the entry complete (main rank, under the lock, after every rank's last barrier)."""
        from medvqa.io import atomic_write_json

        self.counts = dict(counts)
        if not dist.main:
            return
        if self.complete:  # only the lock holder writes, and only an incomplete entry: never true
            raise BadInput("stage cache entry is already complete; it is never rewritten", path=self.dir)
        marker = {"key": self.key, "format": CACHE_FORMAT, "counts": self.counts, "digests": self.digests()}
        atomic_write_json(self.dir / COMPLETE_FILE, marker)
        log.info("stage cache: %s complete", self.dir)

    def load(self) -> None:
        """The finished entry's counts, after checking its files are the ones it was completed with."""
        from medvqa.io import read_json

        marker = read_json(self.dir / COMPLETE_FILE)
        if marker.get("key") != self.key or marker.get("format") != CACHE_FORMAT:
            raise BadInput(f"{COMPLETE_FILE} is not this entry's (key {self.key})", path=self.dir)
        try:
            now = self.digests()
        except OSError as exc:
            raise BadInput(
                f"stage cache entry lost a file ({exc}); delete the folder to recompute it", path=self.dir
            ) from None
        for name, digest in marker.get("digests", {}).items():
            if now.get(name) != digest:
                raise BadInput(
                    f"stage cache entry changed after it was completed ({name}); delete the folder to "
                    "recompute it",
                    path=self.dir,
                )
        self.counts = dict(marker["counts"])

    def record(self) -> dict[str, Any]:
        """What `checkpoint.json` says of the cache: the key, the entry, what was computed or reused."""
        done = "reused" if self.reused else "computed"
        return {
            "key": self.key,
            "dir": str(self.dir),
            "stage1": "reused" if self.reused or self.stage1_reused else "computed",
            "questions": done,
            "answers": done,
        }


@contextlib.contextmanager
def open_entry(
    cache_dir: Path, request: TrainRequest, cfg: STLLaVAMedConfig, images: Sequence[str], dist: Dist
) -> Iterator[StageEntry]:
    """The run's entry, `reused` if complete; otherwise held by this process's main rank until the
    `with` ends (the caller computes the stages into it and calls `finish`). Every rank enters.

    Only the main rank locks (a rank blocked on a lock would leave the others at a barrier): it
    waits up to `dist_timeout_s` for another process's hold, then all ranks read the marker.
    """
    from medvqa.io import atomic_write_json, output_lock
    from medvqa.trainers.checkpoints import read_checkpoint

    inputs = key_inputs(request, cfg, images, dist)
    key = cache_key(inputs)
    entry = StageEntry(Path(cache_dir) / key, key)
    with contextlib.ExitStack() as stack:
        if dist.main:
            entry.dir.mkdir(parents=True, exist_ok=True)
            if not entry.complete:

                def waiting(pid: str) -> None:
                    log.info("stage cache: waiting for pid %s, which is computing %s", pid, entry.dir)

                stack.enter_context(
                    output_lock(entry.dir, flag="stage_cache", wait_s=cfg.dist_timeout_s, on_wait=waiting)
                )
                if not entry.complete and not (entry.dir / KEY_FILE).is_file():
                    atomic_write_json(entry.dir / KEY_FILE, {"key": entry.key, "inputs": inputs})
        dist.barrier()  # the marker cannot change now: complete, or held by our main rank
        entry.reused = entry.complete
        if entry.reused:
            entry.load()
            log.info("stage cache: reusing stage 1, questions and answers from %s", entry.dir)
        else:
            entry.stage1_reused = read_checkpoint(entry.stage1) is not None
            log.info("stage cache: computing %s (key %s)", entry.dir, entry.key)
        yield entry
