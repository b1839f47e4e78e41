"""SLAKE (Liu et al., 2021): bilingual (English/Chinese) radiology VQA with organ/modality metadata.

Layout (detected; `root` may be `Slake1.0/` itself or the folder that holds it):
`Slake1.0/{train,validate,test}.json` (`validation.json` is accepted for validate) + images
`Slake1.0/imgs/xmlabN/source.jpg`. Records carry `qid`, `img_name`, `question`, `answer`,
`answer_type`, `q_lang`, `modality`, `location`, `content_type`, `base_type`.

English only by default (`q_lang == "en"`: test 1,061 questions, 645 OPEN / 416 CLOSED); the
`lang` option selects `zh` or `all`. CLOSED = the dataset's `answer_type`, and SLAKE's CLOSED
includes answers that are not yes/no ("Which is bigger, ...?" → "Liver").
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar, Literal

from medvqa.benchmarks._files import (
    DATASET_RULE,
    Duplicates,
    FileBenchmark,
    Problems,
    answer_type_field,
    collect,
    find_root,
    no_layout,
    plain_meta,
    text_field,
)
from medvqa.errors import BadInput
from medvqa.io import read_json
from medvqa.registry import benchmarks
from medvqa.safety import ImageChecker, resolve_inside
from medvqa.types import VQASample

SPLIT_FILES = {
    "train": ("train.json",),
    "validate": ("validate.json", "validation.json"),
    "test": ("test.json",),
}


@dataclasses.dataclass(frozen=True)
class SlakeOptions:
    lang: Literal["en", "zh", "all"] = dataclasses.field(
        default="en", metadata={"help": "question language: en (the published English split), zh, or all"}
    )


def _is_slake(d: Path) -> bool:
    return (d / "imgs").is_dir() and any((d / f).is_file() for names in SPLIT_FILES.values() for f in names)


@benchmarks.register("slake")
class Slake(FileBenchmark):
    """SLAKE bilingual radiology VQA (Slake1.0 JSON + imgs/), English by default.

    Options: `lang` = "en" (default) | "zh" | "all", e.g. `Slake(lang="zh")`.
    """

    name = "slake"
    version = "1"
    splits = ("train", "validate", "test")
    split_aliases: ClassVar[dict[str, str]] = {"val": "validate", "validation": "validate", "dev": "validate"}
    description = "SLAKE bilingual radiology VQA (Slake1.0 JSON + imgs/), English by default"
    Options = SlakeOptions

    def _locate(self, root: Path) -> Path:
        root = Path(root)
        found = find_root(root, _is_slake)
        if found is None:
            zipped = find_root(root, lambda d: (d / "imgs.zip").is_file() and not (d / "imgs").is_dir())
            if zipped is not None:
                raise BadInput(
                    "SLAKE images are still zipped: unzip imgs.zip here (it holds imgs/xmlabN/)", path=zipped
                )
            raise no_layout(
                self.name, root, ["Slake1.0/{train,validate,test}.json + Slake1.0/imgs/xmlabN/source.jpg"]
            )
        return found

    def detect_layout(self, root: Path, split: str = "test") -> str:
        return f"Slake1.0 JSON ({{train,validate,test}}.json + imgs/) at {self._locate(root)}, lang={self.options.lang}"

    def closed_rule(self, root: Path, split: str = "test") -> str:
        return f"{DATASET_RULE} (SLAKE's CLOSED includes non-yes/no answers)"

    def _load(self, split: str, root: Path, problems: Problems, checker: ImageChecker) -> list[VQASample]:
        where = self._locate(root)
        file = next((where / f for f in SPLIT_FILES[split] if (where / f).is_file()), None)
        if file is None:
            raise BadInput(
                f"split {split!r} not found: expected {' or '.join(SPLIT_FILES[split])}", path=where
            )
        records = read_json(file)
        if not isinstance(records, list):
            raise BadInput(f"expected a JSON list of records, got {type(records).__name__}", path=file)
        dups = Duplicates(file)
        lang = self.options.lang
        image_dir = where / "imgs"

        def make(file: Path, index: object, rec: object) -> VQASample | None:
            q_lang = text_field(rec, "q_lang", path=file, index=index).lower()
            if lang != "all" and q_lang != lang:
                return None
            qid = text_field(rec, "qid", path=file, index=index)
            dups.check(qid, index)
            img_name = text_field(rec, "img_name", path=file, index=index)
            image = resolve_inside(where, img_name, base=image_dir, path=file, index=index, field="img_name")
            checker.check(image, path=file, index=index, field="img_name")
            meta: dict[str, object] = {
                "image_id": img_name,
                "answer_type_source": "dataset",
                "q_lang": q_lang,
            }
            assert isinstance(rec, dict)
            for key, out in (
                ("modality", "modality"),
                ("location", "organ"),
                ("content_type", "content_type"),
                ("base_type", "base_type"),
                ("img_id", "img_id"),
            ):
                if rec.get(key) not in (None, ""):
                    meta[out] = rec[key]
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

        items = (
            (file, f"#{i} (qid {r.get('qid') if isinstance(r, dict) else None})", r)
            for i, r in enumerate(records)
        )
        return collect(items, make, problems)
