"""Any LLaVA-Med `test.json` + image folder: data that others (or `medvqa data convert`) converted.

Layout: `root/{split}.json` (e.g. `test.json`, as in LLaVA-Med's `data_RAD/`, `Slake1.0/`,
`pvqa/` downstream folders) and the images in `root/images/` (or `root/` itself). Options name
another file (`file="test_w_options.json"`) or image folder (`image_folder="imgs"`), both
relative to the root. `root` may also be the JSON file itself.

Each item: `id`, `image` (a path relative to the image folder), `conversations` (LLaVA-Med also
spells it `conversatons`) whose first human turn is the question (the `<image>` token is removed)
and whose first gpt turn is the gold answer, and `answer_type` (OPEN/CLOSED). An item without
`answer_type` is typed by the yes/no rule, and the benchmark records that rule.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from medvqa.benchmarks._files import (
    DATASET_RULE,
    Duplicates,
    FileBenchmark,
    Problems,
    collect,
    no_layout,
    plain_meta,
    text_field,
    yes_no_type,
)
from medvqa.errors import BadInput
from medvqa.registry import benchmarks
from medvqa.safety import ImageChecker, resolve_inside
from medvqa.types import VQASample


@dataclasses.dataclass(frozen=True)
class LlavaMedJsonOptions:
    file: str = dataclasses.field(
        default="", metadata={"help": "the JSON file, relative to the root (default: {split}.json)"}
    )
    image_folder: str = dataclasses.field(
        default="",
        metadata={
            "help": "the image folder, relative to the root (default: images/ if present, else the root)"
        },
    )


@benchmarks.register("llava-med-json")
class LlavaMedJson(FileBenchmark):
    """Any LLaVA-Med test.json + image folder (data converted by others or by `medvqa data convert`).

    Options: `file` (JSON file relative to the root; default `{split}.json`) and `image_folder`
    (relative to the root; default `images/` if present, else the root),
    e.g. `LlavaMedJson(file="test_w_options.json", image_folder="imgs")`.
    """

    name = "llava-med-json"
    version = "1"
    splits = ("train", "test")
    description = "Any LLaVA-Med test.json + image folder"
    Options = LlavaMedJsonOptions

    def canonical_split(self, split: str) -> str:
        if not split or "/" in split or "\\" in split or split.startswith("."):
            raise BadInput(f"split must be a plain name (the JSON file's stem), got {split!r}")
        return split

    def _paths(self, root: Path, split: str) -> tuple[Path, Path, Path]:
        """(data root, JSON file, image folder)."""
        root = Path(root)
        if root.is_file():
            data_root, file = root.parent, root
        else:
            data_root = root
            name = self.options.file or f"{split}.json"
            file = (
                resolve_inside(root, name, path=root, index=None, field="file")
                if root.is_dir()
                else root / name
            )
            if not file.is_file():
                raise no_layout(self.name, root, [f"{name} (a LLaVA-Med JSON list) + images/"])
        if self.options.image_folder:
            images = resolve_inside(
                data_root, self.options.image_folder, path=data_root, index=None, field="image_folder"
            )
            if not images.is_dir():
                raise BadInput("image folder not found", path=images, field="image_folder")
        else:
            images = data_root / "images" if (data_root / "images").is_dir() else data_root
        return data_root, file, images

    def detect_layout(self, root: Path, split: str = "test") -> str:
        _, file, images = self._paths(root, split)
        return f"LLaVA-Med JSON {file} with images in {images}"

    def closed_rule(self, root: Path, split: str = "test") -> str:
        _, file, _ = self._paths(root, split)
        from medvqa.answer_files import _records

        if all(isinstance(r, dict) and "answer_type" in r for _, r in _records(file)):
            return DATASET_RULE
        return "gold answer is yes/no for items without answer_type"

    def _load(self, split: str, root: Path, problems: Problems, checker: ImageChecker) -> list[VQASample]:
        from medvqa.answer_files import _llava_med_item, _records  # the same parser as `medvqa score`

        data_root, file, images = self._paths(root, split)
        dups = Duplicates(file)

        def make(file: Path, label: object, rec: Any) -> VQASample:
            index = f"{label} (id {_id(rec)})"
            if not isinstance(rec, dict):
                raise BadInput(f"expected an object, got {type(rec).__name__}", path=file, record=label)
            source = "dataset" if "answer_type" in rec else "gold"
            parsed = _llava_med_item(
                rec if source == "dataset" else {**rec, "answer_type": "OPEN"},
                path=file,
                record=str(label),
                image_root=images,
                benchmark=self.name,
                split=split,
            )
            dups.check(parsed.id, index, field="id")
            image_name = text_field(rec, "image", path=file, index=index)
            image = resolve_inside(data_root, image_name, base=images, path=file, index=index, field="image")
            checker.check(image, path=file, index=index, field="image")
            meta = plain_meta({k: v for k, v in parsed.meta.items() if k != "image_path"})
            if source == "gold" or "answer_type_source" not in meta:
                meta["answer_type_source"] = source
            answer_type = parsed.answer_type if source == "dataset" else yes_no_type(parsed.answer)
            return dataclasses.replace(parsed, image=str(image), answer_type=answer_type, meta=meta)

        return collect(((file, label, rec) for label, rec in _records(file)), make, problems)


def _id(rec: Any) -> Any:
    return rec.get("id") if isinstance(rec, dict) else None
