"""PathVQA (He et al., 2020): pathology VQA, from the original release or the Hugging Face parquet.

Layouts (detected; `root` may be `pvqa/` itself or the folder that holds it):

- **original**: `pvqa/qas/{split}/{split}_qa.pkl` (a pickled list of dicts with `image`,
  `question`, `answer`; test 6,761) + images `pvqa/images/{split}/{image}.jpg`. The pickles are
  read with a restricted unpickler: only plain containers and scalars; a pickle that references
  any callable is refused and never executed.
- **hf-parquet**: `data/{train,validation,test}-*.parquet` with `image` ({bytes, path}),
  `question`, `answer` (test 6,719 after the Hugging Face de-duplication).

Neither layout carries an answer type: CLOSED = gold answer is yes/no (PathVQA's own definition
of its closed-ended questions), recorded in `closed_rule`.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from medvqa.benchmarks._files import (
    IMAGE_SUFFIXES,
    YES_NO_RULE,
    OriginalOrParquetBenchmark,
    Problems,
    collect,
    parquet_files,
    parquet_image,
    read_parquet_rows,
    require,
    text_field,
    yes_no_type,
)
from medvqa.errors import BadInput
from medvqa.registry import benchmarks
from medvqa.safety import ImageChecker, resolve_inside, safe_load_pickle
from medvqa.types import VQASample

PARQUET_SPLITS = {"train": ("train",), "val": ("validation", "val", "valid"), "test": ("test",)}


@benchmarks.register("pathvqa")
class PathVQA(OriginalOrParquetBenchmark):
    """PathVQA pathology VQA (original pvqa pickles + images, or Hugging Face parquet).

    Options: none.
    """

    name = "pathvqa"
    version = "1"
    splits = ("train", "val", "test")
    split_aliases: ClassVar[dict[str, str]] = {"validation": "val", "valid": "val", "validate": "val"}
    description = "PathVQA pathology VQA (original pvqa pickles + images, or Hugging Face parquet)"
    original_layout = "pvqa/qas/{split}/{split}_qa.pkl + pvqa/images/{split}/"
    parquet_layout = "data/{train,validation,test}-*.parquet"

    @staticmethod
    def _is_original(d: Path) -> bool:
        return (d / "qas").is_dir() and (d / "images").is_dir()

    def closed_rule(self, root: Path, split: str = "test") -> str:
        return YES_NO_RULE

    def _sample(
        self, split: str, n: int, image: Path | bytes, image_id: str, question: str, answer: str
    ) -> VQASample:
        return VQASample(
            id=f"{split}-{n:05d}",
            image=image if isinstance(image, bytes) else str(image),
            question=question,
            answer=answer,
            answer_type=yes_no_type(answer),  # type: ignore[arg-type]
            benchmark=self.name,
            split=split,
            meta={"image_id": image_id, "answer_type_source": "gold"},
        )

    def _load_original(
        self, split: str, where: Path, problems: Problems, checker: ImageChecker
    ) -> list[VQASample]:
        file = where / "qas" / split / f"{split}_qa.pkl"
        if not file.is_file():
            raise BadInput(f"split {split!r} not found: expected qas/{split}/{split}_qa.pkl", path=where)
        records = safe_load_pickle(file)
        if not isinstance(records, list):
            raise BadInput(f"expected a pickled list of records, got {type(records).__name__}", path=file)
        image_dir = where / "images" / split

        def make(file: Path, index: object, rec: object) -> VQASample:
            n = int(str(index).split()[0].lstrip("#"))
            name = text_field(rec, "image", path=file, index=index)
            rel = name if name.lower().endswith(IMAGE_SUFFIXES) else f"{name}.jpg"
            image = resolve_inside(where, rel, base=image_dir, path=file, index=index, field="image")
            checker.check(image, path=file, index=index, field="image")
            return self._sample(
                split,
                n,
                image,
                name,
                text_field(rec, "question", path=file, index=index),
                text_field(rec, "answer", path=file, index=index),
            )

        return collect(((file, f"#{i}", r) for i, r in enumerate(records)), make, problems)

    def _load_parquet(
        self, split: str, where: Path, problems: Problems, checker: ImageChecker
    ) -> list[VQASample]:
        files = parquet_files(where, PARQUET_SPLITS[split])
        if not files:
            names = " or ".join(f"data/{s}-*.parquet" for s in PARQUET_SPLITS[split])
            raise BadInput(f"no parquet shards for split {split!r} (expected {names})", path=where)
        counter = iter(range(10**9))

        def make(file: Path, index: object, row: dict) -> VQASample:
            n = next(counter)
            cell = require(row, "image", path=file, index=index)
            image, image_id = parquet_image(cell, root=where, path=file, index=index)
            checker.check(image, path=file, index=index, field="image")
            return self._sample(
                split,
                n,
                image,
                image_id,
                text_field(row, "question", path=file, index=index),
                text_field(row, "answer", path=file, index=index),
            )

        rows = ((f, f"row {i}", r) for f, i, r in read_parquet_rows(files, ["image", "question", "answer"]))
        return collect(rows, make, problems)
