"""The Phantom `Benchmark`: registry name `phantom`, loading a folder written by `write_phantom`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medvqa.benchmarks._files import FileBenchmark, Problems, collect, is_unicode, plain_meta
from medvqa.benchmarks.phantom.files import inside, load_captions, read_manifest, split_file
from medvqa.benchmarks.phantom.grammar import corpus_texts
from medvqa.benchmarks.phantom.taxonomy import GENERATOR_VERSION, SPLITS
from medvqa.errors import BadInput
from medvqa.registry import benchmarks
from medvqa.safety import ImageChecker, PathGuard
from medvqa.types import VQASample


@benchmarks.register("phantom")
class Phantom(FileBenchmark):
    """Phantom: synthetic radiology-like VQA (ct/mri/x-ray, head/chest/abdomen, lesions), built offline."""

    name = "phantom"
    version = GENERATOR_VERSION
    splits = SPLITS
    description = (
        "Procedurally generated radiology-like VQA (modality, region, plane, lesions), deterministic from a "
        "seed; the embedded default of the CPU demo."
    )
    has_captions = True
    # Phantom's images are written by `write_phantom`: by default a load checks that each exists (and
    # the pixel cap, from its header); a corrupt one is reported where it is decoded.
    image_check = "exists"

    def detect_layout(self, root: Path, split: str = "test") -> str:
        manifest = read_manifest(root)
        config = manifest.get("config", {})
        return (
            f"phantom generator v{manifest['version']} (seed {config.get('seed')}, {config.get('size')} px, "
            f"data key {manifest.get('data_key')})"
        )

    def closed_rule(self, root: Path, split: str = "test") -> str:
        return "dataset answer_type (generated yes/no questions)"

    def load_captions(self, root: Path, split: str) -> list[Mapping[str, str]]:
        return load_captions(root, split)

    def vocabulary(self) -> list[str]:
        return corpus_texts()

    def canonical_split(self, split: str) -> str:
        return split  # `split_file` checks it against the folder (and names the build command)

    def _load(self, split: str, root: Path, problems: Problems, checker: ImageChecker) -> list[VQASample]:
        from medvqa.io import iter_jsonl

        path = split_file(root, split, "samples.jsonl")
        seen: set[str] = set()
        guard = PathGuard(root)

        def make(file: Path, lineno: Any, record: Any) -> VQASample:
            return self._sample(guard, file, lineno, record, split, seen, checker)

        return collect(((path, lineno, record) for lineno, record in iter_jsonl(path)), make, problems)

    @staticmethod
    def _sample(
        guard: PathGuard,
        path: Path,
        lineno: int,
        record: Any,
        split: str,
        seen: set[str],
        checker: ImageChecker,
    ) -> VQASample:
        where = {"path": path, "record": f"line {lineno}"}
        if not isinstance(record, dict):
            raise BadInput("expected a JSON object", **where)
        for key in ("id", "image", "question", "answer", "answer_type"):
            if not isinstance(record.get(key), str) or not record[key].strip():
                raise BadInput("missing or empty field", **where, field=key)
            if not is_unicode(record[key]):
                raise BadInput("text is not valid Unicode (a lone surrogate)", **where, field=key)
        if record["answer_type"] not in ("OPEN", "CLOSED"):
            raise BadInput(
                f"answer_type must be OPEN or CLOSED, got {record['answer_type']!r}",
                **where,
                field="answer_type",
            )
        if record["id"] in seen:
            raise BadInput(f"duplicate question id {record['id']!r}", **where, field="id")
        seen.add(record["id"])
        image = inside(guard, record["image"], path, lineno, "image")
        checker.check(image, path=path, index=f"line {lineno}", field="image")
        meta = record.get("meta") or {}
        if not isinstance(meta, dict):
            raise BadInput(f"expected an object, got {type(meta).__name__}", **where, field="meta")
        return VQASample(
            id=record["id"],
            image=str(image),
            question=record["question"],
            answer=record["answer"],
            answer_type=record["answer_type"],
            benchmark="phantom",
            split=split,
            meta=plain_meta(meta),
        )
