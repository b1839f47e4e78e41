"""VQA-RAD (Lau et al., 2018): radiology VQA, from the original release or the Hugging Face parquet.

Layouts (detected; `root` may be the folder holding the files or its parent):

- **original**: `VQA_RAD Dataset Public.json` + `VQA_RAD Image Folder/`. Records carry `qid`,
  `image_name`, `question`, `answer`, `answer_type`, `phrase_type`, ...; the test split is the
  records whose `phrase_type` is `test_freeform` or `test_para` (451 questions: 179 OPEN, 272
  CLOSED), train is the rest. `answer_type` is read with stray case/spaces tolerated; numeric
  answers become text. CLOSED = the dataset's `answer_type`.
- **hf-parquet**: `data/train-*.parquet`, `data/test-*.parquet` with columns `image` ({bytes, path}),
  `question`, `answer` (train 1,793 / test 451). No answer type: CLOSED = gold answer is yes/no,
  which changes the split (and is recorded in `closed_rule`).
"""

from __future__ import annotations

from pathlib import Path

from medvqa.benchmarks._files import (
    DATASET_RULE,
    YES_NO_RULE,
    Duplicates,
    OriginalOrParquetBenchmark,
    Problems,
    answer_type_field,
    collect,
    parquet_files,
    parquet_image,
    plain_meta,
    read_parquet_rows,
    require,
    text_field,
    yes_no_type,
)
from medvqa.errors import BadInput
from medvqa.io import read_json
from medvqa.registry import benchmarks
from medvqa.safety import ImageChecker, resolve_inside
from medvqa.types import VQASample

JSON_NAME = "VQA_RAD Dataset Public.json"
IMAGE_DIR = "VQA_RAD Image Folder"
TEST_PHRASES = ("test_freeform", "test_para")


@benchmarks.register("vqa-rad")
class VQARad(OriginalOrParquetBenchmark):
    """VQA-RAD radiology VQA (original JSON release or Hugging Face parquet).

    Options: none.
    """

    name = "vqa-rad"
    version = "1"
    splits = ("train", "test")
    description = "VQA-RAD radiology VQA (original JSON release or Hugging Face parquet)"
    original_layout = f"'{JSON_NAME}' + '{IMAGE_DIR}/'"
    parquet_layout = "data/{train,test}-*.parquet"

    @staticmethod
    def _is_original(d: Path) -> bool:
        return (d / JSON_NAME).is_file()

    def closed_rule(self, root: Path, split: str = "test") -> str:
        return DATASET_RULE if self._locate(root)[0] == "original" else YES_NO_RULE

    def _load_original(
        self, split: str, where: Path, problems: Problems, checker: ImageChecker
    ) -> list[VQASample]:
        file = where / JSON_NAME
        records = read_json(file)
        if not isinstance(records, list):
            raise BadInput(f"expected a JSON list of records, got {type(records).__name__}", path=file)
        image_dir = where / IMAGE_DIR
        if not image_dir.is_dir():
            raise BadInput(f"image folder '{IMAGE_DIR}/' not found beside the JSON", path=where)
        dups = Duplicates(file)

        def make(file: Path, index: object, rec: object) -> VQASample | None:
            phrase = text_field(rec, "phrase_type", path=file, index=index)
            in_test = phrase.lower() in TEST_PHRASES
            if in_test != (split == "test"):
                return None
            qid = text_field(rec, "qid", path=file, index=index)
            dups.check(qid, index)
            image_name = text_field(rec, "image_name", path=file, index=index)
            image = resolve_inside(
                where, image_name, base=image_dir, path=file, index=index, field="image_name"
            )
            checker.check(image, path=file, index=index, field="image_name")
            meta = {
                "image_id": image_name,
                "answer_type_source": "dataset",
                "phrase_type": phrase,
            }
            for key, out in (("image_organ", "organ"), ("question_type", "question_type")):
                if isinstance(rec, dict) and isinstance(rec.get(key), str) and rec[key].strip():
                    meta[out] = rec[key].strip()
            return VQASample(
                id=qid,
                image=str(image),
                question=text_field(rec, "question", path=file, index=index),
                answer=text_field(rec, "answer", path=file, index=index),
                answer_type=answer_type_field(rec, path=file, index=index),  # type: ignore[arg-type]
                benchmark=self.name,
                split=split,
                meta=plain_meta(meta),
            )

        items = ((file, f"#{i} (qid {_qid(r)})", r) for i, r in enumerate(records))
        return collect(items, make, problems)

    def _load_parquet(
        self, split: str, where: Path, problems: Problems, checker: ImageChecker
    ) -> list[VQASample]:
        files = parquet_files(where, [split])
        if not files:
            raise BadInput(
                f"no parquet shards for split {split!r} (expected data/{split}-*.parquet)", path=where
            )

        counter = iter(range(10**9))

        def make(file: Path, index: object, row: dict) -> VQASample:
            n = next(counter)
            image, image_id = parquet_image(
                require(row, "image", path=file, index=index), root=where, path=file, index=index
            )
            checker.check(image, path=file, index=index, field="image")
            answer = text_field(row, "answer", path=file, index=index)
            return VQASample(
                id=f"{split}-{n:05d}",
                image=image if isinstance(image, bytes) else str(image),
                question=text_field(row, "question", path=file, index=index),
                answer=answer,
                answer_type=yes_no_type(answer),  # type: ignore[arg-type]
                benchmark=self.name,
                split=split,
                meta={"image_id": image_id, "answer_type_source": "gold"},
            )

        rows = ((f, f"row {i}", r) for f, i, r in read_parquet_rows(files, ["image", "question", "answer"]))
        return collect(rows, make, problems)


def _qid(rec: object) -> object:
    return rec.get("qid") if isinstance(rec, dict) else None
