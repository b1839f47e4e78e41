"""Tiny trees in every real benchmark layout (VQA-RAD, SLAKE, PathVQA, LLaVA-Med JSON), built by tests.

Each builder writes a few records and tiny images into `root` and returns the folder a user would
pass as `--root`. Counts per split are documented beside each builder so tests can assert them.
"""

from __future__ import annotations

import io
import json
import pickle
import zlib
from pathlib import Path
from typing import Any

from PIL import Image


def image_bytes(seed: int, fmt: str = "JPEG", size: int = 8) -> bytes:
    """A tiny image whose bytes differ per seed."""
    im = Image.new("RGB", (size, size), ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256))
    im.putpixel((seed % size, (seed // size) % size), (255 - (seed % 256), 0, 0))
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def write_image(path: Path, seed: int, fmt: str = "JPEG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(seed, fmt))
    return path


def write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ VQA-RAD

VQA_RAD_JSON = "VQA_RAD Dataset Public.json"
VQA_RAD_IMAGES = "VQA_RAD Image Folder"


def vqa_rad_records() -> list[dict[str, Any]]:
    """train: 3 (2 OPEN, 1 CLOSED), test: 5 (2 OPEN, 3 CLOSED), 3 images; synpic2 is in both splits.

    Quirks of the real file: stray case/space in answer_type, a numeric answer, an OPEN yes/no-free
    question whose answer is a number.
    """

    def rec(qid: Any, image: str, q: str, a: Any, at: str, phrase: str) -> dict[str, Any]:
        return {
            "qid": qid,
            "phrase_type": phrase,
            "qid_linked_id": f"link-{qid}",
            "image_case_url": "https://example.invalid/case",
            "image_name": image,
            "image_organ": "HEAD" if image == "synpic1.jpg" else "CHEST",
            "evaluation": "not evaluated",
            "question": q,
            "question_rephrase": "NULL",
            "question_relation": "NULL",
            "question_frame": "NULL",
            "question_type": "PRES",
            "answer": a,
            "answer_type": at,
        }

    return [
        rec(1, "synpic1.jpg", "Is there a mass?", "Yes", "CLOSED", "freeform"),
        rec(2, "synpic1.jpg", "What organ is shown?", "brain", "OPEN", "para"),
        rec(3, "synpic2.jpg", "Where is the lesion?", "left lung", "OPEN", "freeform"),
        rec(4, "synpic2.jpg", "Is the heart enlarged?", "no", "closed ", "test_freeform"),
        rec(5, "synpic2.jpg", "How many ribs are fractured?", 2, "OPEN", "test_freeform"),
        rec(6, "synpic3.jpg", "Is this an MRI?", "No", " Closed", "test_para"),
        rec(7, "synpic3.jpg", "What plane is this?", "axial", "open", "test_para"),
        rec(8, "synpic3.jpg", "Is the image normal?", "yes", "CLOSED", "test_freeform"),
    ]


def make_vqa_rad_original(root: Path, records: list[dict[str, Any]] | None = None) -> Path:
    for i in (1, 2, 3):
        write_image(root / VQA_RAD_IMAGES / f"synpic{i}.jpg", i)
    write_json(root / VQA_RAD_JSON, vqa_rad_records() if records is None else records)
    return root


def make_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(path, index=False)
    return path


def hf_rows(items: list[tuple[int, str, str]], with_path: bool = True) -> list[dict[str, Any]]:
    """Rows of an HF image dataset: (image seed, question, answer)."""
    return [
        {
            "image": {"bytes": image_bytes(seed, "PNG"), "path": f"img{seed}.png" if with_path else None},
            "question": q,
            "answer": a,
        }
        for seed, q, a in items
    ]


def make_vqa_rad_parquet(root: Path) -> Path:
    """train: 3 rows (2 images); test: 4 rows (2 images, image 2 also in train), 2 yes/no answers."""
    make_parquet(
        root / "data" / "train-00000-of-00001-abc.parquet",
        hf_rows([(1, "is there a mass?", "yes"), (1, "what organ?", "brain"), (2, "where?", "left lung")]),
    )
    make_parquet(
        root / "data" / "test-00000-of-00001-def.parquet",
        hf_rows(
            [
                (2, "is the heart enlarged?", "no"),
                (2, "how many ribs?", "2"),
                (3, "is this an mri?", "Yes"),
                (3, "what plane?", "axial"),
            ]
        ),
    )
    return root


# ------------------------------------------------------------------------------------------ SLAKE


def slake_records(split: str) -> list[dict[str, Any]]:
    """test: en 4 (2 OPEN, 2 CLOSED, one CLOSED answer is "Liver"), zh 2 (1 OPEN, 1 CLOSED); 2 images.

    train / validate: en 2 (1 OPEN, 1 CLOSED), zh 1.
    """
    base = {"train": 0, "validate": 100, "test": 200}[split]
    img = {"train": (1, 2), "validate": (3, 3), "test": (4, 5)}[split]

    def rec(k: int, im: int, q: str, a: Any, at: str, lang: str) -> dict[str, Any]:
        return {
            "img_id": im,
            "img_name": f"xmlab{im}/source.jpg",
            "question": q,
            "answer": a,
            "q_lang": lang,
            "location": "Abdomen",
            "modality": "CT",
            "answer_type": at,
            "base_type": "vqa",
            "content_type": "Organ",
            "triple": ["vhead", "_", "_"],
            "qid": base + k,
        }

    if split == "test":
        return [
            rec(1, img[0], "Which organ is bigger, liver or kidney?", "Liver", "CLOSED", "en"),
            rec(2, img[0], "Does the picture contain a lung?", "No", "CLOSED", "en"),
            rec(3, img[1], "What modality is used?", "CT", "OPEN", "en"),
            rec(4, img[1], "Where is the abnormality?", "Left Lung", "OPEN", "en"),
            rec(5, img[1], "这是什么模态?", "CT", "OPEN", "zh"),
            rec(6, img[0], "图中有肺吗?", "否", "CLOSED", "zh"),
        ]
    return [
        rec(1, img[0], "Is this a CT?", "Yes", "CLOSED", "en"),
        rec(2, img[1], "What organ is shown?", "Liver", "OPEN", "en"),
        rec(3, img[1], "这是什么器官?", "肝脏", "OPEN", "zh"),
    ]


def make_slake(root: Path, *, validation_name: str = "validate.json") -> Path:
    """root/Slake1.0/{train,validate,test}.json + imgs/xmlabN/source.jpg; returns root (the parent)."""
    d = root / "Slake1.0"
    for i in range(1, 6):
        write_image(d / "imgs" / f"xmlab{i}" / "source.jpg", 10 + i)
    write_json(d / "train.json", slake_records("train"))
    write_json(d / validation_name, slake_records("validate"))
    write_json(d / "test.json", slake_records("test"))
    return root


# ------------------------------------------------------------------------------------------ PathVQA


def pathvqa_records(split: str) -> list[dict[str, Any]]:
    """test: 5 (2 yes/no → CLOSED, 3 OPEN), 3 images; train: 3 (1 CLOSED), 2 images (test_0001's twin)."""
    if split == "test":
        return [
            {"image": "test_0000", "question": "is this a tumor?", "answer": "yes"},
            {"image": "test_0000", "question": "what does this show?", "answer": "necrosis"},
            {"image": "test_0001", "question": "is there inflammation?", "answer": "no"},
            {"image": "test_0002", "question": "how is the tissue stained?", "answer": "with h&e"},
            {"image": "test_0002", "question": "what are present?", "answer": "giant cells"},
        ]
    return [
        {"image": f"{split}_0000", "question": "is this normal?", "answer": "no"},
        {"image": f"{split}_0000", "question": "what organ?", "answer": "liver"},
        {"image": f"{split}_0001", "question": "what is shown?", "answer": "fibrosis"},
    ]


def make_pathvqa_original(root: Path, *, splits: tuple[str, ...] = ("train", "val", "test")) -> Path:
    """root/pvqa/qas/{split}/{split}_qa.pkl + root/pvqa/images/{split}/*.jpg; returns root (the parent)."""
    d = root / "pvqa"
    for split in splits:
        records = pathvqa_records(split)
        for name in sorted({r["image"] for r in records}):
            # train_0001 is byte-identical to test_0001: the overlap test counts it.
            seed = 41 if name in ("test_0001", "train_0001") else 50 + zlib.crc32(name.encode()) % 200
            write_image(d / "images" / split / f"{name}.jpg", seed)
        (d / "qas" / split).mkdir(parents=True, exist_ok=True)
        with open(d / "qas" / split / f"{split}_qa.pkl", "wb") as fh:
            pickle.dump(records, fh, protocol=4)
    return root


def make_pathvqa_parquet(root: Path) -> Path:
    """data/{train,validation,test}-*.parquet; test: 4 rows (2 yes/no), 2 images without path (bytes only)."""
    make_parquet(
        root / "data" / "train-00000-of-00001.parquet",
        hf_rows([(60, "is this normal?", "no"), (61, "what organ?", "liver")], with_path=False),
    )
    make_parquet(
        root / "data" / "validation-00000-of-00001.parquet",
        hf_rows([(62, "what is shown?", "fibrosis")], with_path=False),
    )
    make_parquet(
        root / "data" / "test-00000-of-00001.parquet",
        hf_rows(
            [
                (63, "is this a tumor?", "yes"),
                (63, "what does this show?", "necrosis"),
                (64, "is there inflammation?", "No"),
                (64, "how is the tissue stained?", "with h&e"),
            ],
            with_path=False,
        ),
    )
    return root


# ------------------------------------------------------------------------------------------ LLaVA-Med JSON


def llava_med_items() -> list[dict[str, Any]]:
    """3 items: 2 CLOSED, 1 OPEN, 2 images; one uses the misspelled `conversatons`."""

    def item(i: int, image: str, q: str, a: str, at: str, key: str = "conversations") -> dict[str, Any]:
        return {
            "id": i,
            "image": image,
            "answer_type": at,
            key: [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}],
        }

    return [
        item(0, "synpic1.jpg", "Is there a mass?", "yes", "CLOSED"),
        item(1, "synpic1.jpg", "What organ is shown?", "brain", "OPEN", key="conversatons"),
        item(2, "synpic2.jpg", "Which is bigger, liver or kidney?", "liver", "CLOSED"),
    ]


def make_llava_med(root: Path, items: list[dict[str, Any]] | None = None) -> Path:
    write_image(root / "images" / "synpic1.jpg", 71)
    write_image(root / "images" / "synpic2.jpg", 72)
    write_json(root / "test.json", llava_med_items() if items is None else items)
    return root


# ------------------------------------------------------------------------------------------ hostile


def bomb_png(width: int, height: int) -> bytes:
    """A well-formed PNG whose header declares width x height grey pixels, in a few hundred bytes.

    Chunk CRCs are valid (PIL's `verify` accepts it); the zlib stream holds one row of zeros, so
    anything that decodes it either fails or allocates the full declared size first.
    """
    import struct

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    data = zlib.compress(b"\x00" * (width + 1), 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
