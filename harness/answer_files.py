"""Ground-truth and answer files: LLaVA-Med `test.json`, our samples JSONL, LLaVA-Med answer files.

- GT, LLaVA-Med style: a JSON list (or JSONL) of items `{"id", "image", "answer_type",
  "conversations": [{"from": "human", "value": "<image>\\nQuestion"}, {"from": "gpt", "value": "gold"}]}`
  (`conversations` is misspelled `conversatons` in some published files; `answer_type` is OPEN or
  CLOSED, stray case and spaces tolerated; a numeric gold is scored as its text).
- GT, ours: JSONL of `VQASample.to_json()` rows (`id`, `image`, `question`, `answer`,
  `answer_type`, `benchmark`, `split`, `meta`).
- Predictions: LLaVA-Med answer-file JSONL, one `{"question_id", "text", "prompt", "answer_id",
  "model_id", "metadata"}` per line (only `question_id` and `text` are required). They are joined
  to the GT by id, never by order.

Every problem is a `BadInput` naming the file, the record (line or item) and the field.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medvqa.errors import BadInput
from medvqa.io import atomic_write_json, iter_jsonl, read_json
from medvqa.types import VQASample, stable_hash

IMAGE_TOKEN = "<image>"
LLAVA_MED_BENCHMARK = "llava-med-json"


@dataclass(frozen=True)
class AnswerRecord:
    """One line of an answer file: the question id, the answer text and the rest of the row."""

    question_id: str
    text: str
    line: int
    row: Mapping[str, Any]


# --------------------------------------------------------------------------------------------
# small field helpers
# --------------------------------------------------------------------------------------------


def _text(value: Any, *, path: Path, record: Any, field: str) -> str:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate (legal in JSON): it could never be written back
            raise BadInput(
                "text is not valid Unicode (a lone surrogate)", path=path, record=record, field=field
            ) from None
        return value
    if isinstance(value, float) and not math.isfinite(value):
        raise BadInput(f"missing value ({value!r})", path=path, record=record, field=field)  # not "nan"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # numeric answers (VQA-RAD counts, sizes) are scored as text
    raise BadInput(f"expected text, got {_kind(value)}", path=path, record=record, field=field)


def _id(value: Any, *, path: Path, record: Any, field: str) -> str:
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise BadInput(
        f"expected a non-empty string or integer id, got {_kind(value)}",
        path=path,
        record=record,
        field=field,
    )


def _kind(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {json.dumps(value, default=str)[:40]}"


def parse_answer_type(value: Any, *, path: Path, record: Any) -> str:
    """OPEN or CLOSED (case and surrounding spaces tolerated); anything else is a BadInput."""
    kind = value.strip().upper() if isinstance(value, str) else None
    if kind not in ("OPEN", "CLOSED"):
        raise BadInput(
            f"unknown answer_type {value!r} (expected OPEN or CLOSED)",
            path=path,
            record=record,
            field="answer_type",
        )
    return kind


def _records(path: Path) -> list[tuple[str, Any]]:
    """(record label, object) pairs of a JSON list file or a JSONL file (detected from the content)."""
    try:
        with open(path, encoding="utf-8") as fh:
            head = fh.read(4096).lstrip("\ufeff \t\r\n")
    except FileNotFoundError:
        raise BadInput("file not found", path=path) from None
    except IsADirectoryError:
        raise BadInput("is a folder, expected a file", path=path) from None
    except UnicodeDecodeError as exc:
        raise BadInput(f"not UTF-8 text ({exc.reason})", path=path) from None
    if not head:
        raise BadInput("file is empty", path=path)
    if head.startswith("["):
        data = read_json(path)
        if not isinstance(data, list):
            raise BadInput("expected a JSON list of items", path=path)
        records = [(f"item {i}", obj) for i, obj in enumerate(data)]
    else:
        records = [(f"line {lineno}", obj) for lineno, obj in iter_jsonl(path)]
    if not records:
        raise BadInput("no items in file", path=path)
    return records


# --------------------------------------------------------------------------------------------
# ground truth
# --------------------------------------------------------------------------------------------


def read_gt(
    path: str | os.PathLike[str], *, image_root: str | os.PathLike[str] | None = None
) -> list[VQASample]:
    """Read a GT file, whichever kind it is: LLaVA-Med `test.json` (list or JSONL) or samples JSONL.

    Each record is recognised by its fields: `conversations`/`conversatons` → LLaVA-Med item,
    `answer` → harness sample. Ids must be unique.
    """
    path = Path(path)
    samples = []
    for label, obj in _records(path):
        if not isinstance(obj, dict):
            raise BadInput(f"expected a JSON object, got {_kind(obj)}", path=path, record=label)
        if "conversations" in obj or "conversatons" in obj:
            samples.append(_llava_med_item(obj, path=path, record=label, image_root=image_root))
        elif "answer" in obj:
            samples.append(sample_from_json(obj, path=path, record=label))
        elif "question_id" in obj and "text" in obj:
            raise BadInput(
                "this looks like an answer file (question_id, text), not ground truth: swap --gt and --pred?",
                path=path,
                record=label,
            )
        else:
            raise BadInput(
                "neither a LLaVA-Med item (no 'conversations') nor a harness sample (no 'answer')",
                path=path,
                record=label,
                field="conversations",
            )
        if not samples[-1].answer.strip():  # llava-med's substring rule would count it as correct
            field = "answer" if "answer" in obj else "conversations[1].value"
            raise BadInput(
                "empty gold answer (refused: it would count as correct)",
                path=path,
                record=f"{label} (id {samples[-1].id})",
                field=field,
            )
    _check_unique([s.id for s in samples], path=path, what="GT ids")
    return samples


def _llava_med_item(
    obj: Mapping[str, Any],
    *,
    path: Path,
    record: str,
    image_root: str | os.PathLike[str] | None,
    benchmark: str = LLAVA_MED_BENCHMARK,
    split: str = "test",
) -> VQASample:
    if "id" not in obj:
        raise BadInput("missing field", path=path, record=record, field="id")
    sid = _id(obj["id"], path=path, record=record, field="id")
    record = f"{record} (id {sid})"
    key = "conversations" if "conversations" in obj else "conversatons"
    if key not in obj:
        raise BadInput("missing field", path=path, record=record, field="conversations")
    turns = obj[key]
    if not isinstance(turns, list) or len(turns) < 2:
        raise BadInput(
            "expected a list of at least 2 turns (question, answer)", path=path, record=record, field=key
        )
    for i, turn in enumerate(turns[:2]):
        if not isinstance(turn, dict) or "value" not in turn:
            raise BadInput(
                "expected a turn object with a 'value'", path=path, record=record, field=f"{key}[{i}].value"
            )
    question = _text(turns[0]["value"], path=path, record=record, field=f"{key}[0].value")
    question = question.replace(IMAGE_TOKEN, "").strip()
    answer = _text(turns[1]["value"], path=path, record=record, field=f"{key}[1].value")
    if "answer_type" not in obj:
        raise BadInput("missing field", path=path, record=record, field="answer_type")
    answer_type = parse_answer_type(obj["answer_type"], path=path, record=record)
    image_rel = obj.get("image")
    if image_rel is not None and not isinstance(image_rel, str):
        raise BadInput(
            f"expected an image path, got {_kind(image_rel)}", path=path, record=record, field="image"
        )
    root = Path(image_root) if image_root is not None else path.parent
    meta: dict[str, Any] = dict(obj["meta"]) if isinstance(obj.get("meta"), dict) else {}
    meta.setdefault("image_id", image_rel if image_rel else f"item:{sid}")
    return VQASample(
        id=sid,
        image=str(root / image_rel) if image_rel else "",
        question=question,
        answer=answer,
        answer_type=answer_type,  # type: ignore[arg-type]
        benchmark=benchmark,
        split=split,
        meta=meta,
    )


def sample_from_json(
    obj: Mapping[str, Any], *, path: Path | str = "<memory>", record: Any = None
) -> VQASample:
    """A `VQASample` from its `to_json()` form, validating each field (BadInput names the field)."""
    path = Path(path)
    for required in ("id", "answer", "answer_type"):
        if required not in obj:
            raise BadInput("missing field", path=path, record=record, field=required)
    sid = _id(obj["id"], path=path, record=record, field="id")
    record = f"{record} (id {sid})" if record is not None else f"id {sid}"
    meta = obj.get("meta") or {}
    if not isinstance(meta, dict):
        raise BadInput(f"expected an object, got {_kind(meta)}", path=path, record=record, field="meta")
    image = obj.get("image", "")
    if not isinstance(image, str):
        raise BadInput(f"expected an image path, got {_kind(image)}", path=path, record=record, field="image")
    return VQASample(
        id=sid,
        image=image,
        question=_text(obj.get("question", ""), path=path, record=record, field="question"),
        answer=_text(obj["answer"], path=path, record=record, field="answer"),
        answer_type=parse_answer_type(obj["answer_type"], path=path, record=record),  # type: ignore[arg-type]
        benchmark=str(obj.get("benchmark", "")),
        split=str(obj.get("split", "")),
        meta=meta,
    )


def read_samples_jsonl(path: str | os.PathLike[str]) -> list[VQASample]:
    """Read our own samples JSONL (one `VQASample.to_json()` per line)."""
    path = Path(path)
    samples = []
    for label, obj in _records(path):
        if not isinstance(obj, dict):
            raise BadInput(f"expected a JSON object, got {_kind(obj)}", path=path, record=label)
        samples.append(sample_from_json(obj, path=path, record=label))
    _check_unique([s.id for s in samples], path=path, what="sample ids")
    return samples


def write_llava_med_test_json(
    samples: Iterable[VQASample], path: str | os.PathLike[str], *, root: str | os.PathLike[str] | None = None
) -> int:
    """Write samples as a LLaVA-Med `test.json` (what LLaVA-Med's `model_vqa_med.py` and eval read).

    `image` is written relative to `root` (the data root; default the output file's folder) in
    POSIX form; an image outside it, or held as bytes, is a BadInput (export images first). The
    sample's `meta` rides along under "meta" (ignored by LLaVA-Med's own scripts). Returns the count.
    """
    path = Path(path)
    root_path = Path(root if root is not None else path.parent).resolve()
    items = []
    for sample in samples:
        if isinstance(sample.image, bytes):
            raise BadInput(
                "holds image bytes: write the images to files first", record=sample.id, field="image"
            )
        item: dict[str, Any] = {"id": sample.id}
        if sample.image:
            image = Path(sample.image)
            absolute = (image if image.is_absolute() else root_path / image).resolve()
            try:
                item["image"] = absolute.relative_to(root_path).as_posix()
            except ValueError:
                raise BadInput(
                    f"image {sample.image} is not inside the data root {root_path}",
                    record=sample.id,
                    field="image",
                ) from None
        item["conversations"] = [
            {"from": "human", "value": f"{IMAGE_TOKEN}\n{sample.question}"},
            {"from": "gpt", "value": sample.answer},
        ]
        item["answer_type"] = sample.answer_type
        if sample.meta:
            item["meta"] = dict(sample.meta)
        items.append(item)
    _check_unique([item["id"] for item in items], path=path, what="sample ids")
    atomic_write_json(path, items)
    return len(items)


# --------------------------------------------------------------------------------------------
# predictions
# --------------------------------------------------------------------------------------------


def answer_row(
    sample: VQASample | str,
    text: str,
    *,
    model_id: str = "",
    prompt: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    answer_id: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One answer-file row: LLaVA-Med's fields first, then ours (`extra`, e.g. cache key fields).

    `answer_id` defaults to a hash of (question id, model, text) rather than LLaVA-Med's random
    shortuuid, so a rerun writes the same file. Given a sample, its answer type and image id are
    recorded too (readers of LLaVA-Med files ignore unknown fields).
    """
    qid = sample.id if isinstance(sample, VQASample) else str(sample)
    row: dict[str, Any] = {
        "question_id": qid,
        "prompt": prompt
        if prompt is not None
        else (sample.question if isinstance(sample, VQASample) else ""),
        "text": text,
        "answer_id": answer_id or stable_hash({"question_id": qid, "model_id": model_id, "text": text}),
        "model_id": model_id,
        "metadata": dict(metadata or {}),
    }
    if isinstance(sample, VQASample):
        row["answer_type"] = sample.answer_type
        row["image_id"] = sample.image_id
    for key, value in extra.items():
        if key in row:
            raise TypeError(f"answer_row: {key!r} is already a field of the row")
        row[key] = value
    return row


def read_answer_file(path: str | os.PathLike[str]) -> list[AnswerRecord]:
    """Read a LLaVA-Med answer file (JSONL; a JSON list is accepted too). Ids must be unique."""
    path = Path(path)
    out = []
    for label, obj in _records(path):
        if not isinstance(obj, dict):
            raise BadInput(f"expected a JSON object, got {_kind(obj)}", path=path, record=label)
        if "question_id" not in obj:
            hint = (
                " (this looks like a GT file: swap --gt and --pred?)"
                if "conversations" in obj or "answer" in obj
                else ""
            )
            raise BadInput(f"missing field{hint}", path=path, record=label, field="question_id")
        if "text" not in obj:
            raise BadInput("missing field", path=path, record=label, field="text")
        qid = _id(obj["question_id"], path=path, record=label, field="question_id")
        text = _text(obj["text"], path=path, record=f"{label} (question_id {qid})", field="text")
        out.append(AnswerRecord(question_id=qid, text=text, line=int(label.split()[-1]), row=obj))
    _check_unique([r.question_id for r in out], path=path, what="question ids")
    return out


def join_predictions(
    samples: Sequence[VQASample],
    answers: Sequence[AnswerRecord],
    *,
    gt_path: str | os.PathLike[str] = "GT",
    pred_path: str | os.PathLike[str] = "predictions",
) -> list[str]:
    """The prediction text of each sample, joined by id (not by order).

    GT ids without a prediction and prediction ids not in the GT are one BadInput that says how
    many of each and shows a few (a prediction file for another GT shares no id at all).
    """
    by_id = {a.question_id: a.text for a in answers}
    gt_ids = {s.id for s in samples}
    missing = [s.id for s in samples if s.id not in by_id]
    extra = [a.question_id for a in answers if a.question_id not in gt_ids]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of {len(samples)} GT ids have no prediction (e.g. {_few(missing)})")
        if extra:
            parts.append(
                f"{len(extra)} of {len(answers)} prediction ids are not in the GT (e.g. {_few(extra)})"
            )
        hint = ""
        if len(missing) == len(samples):
            hint = "; no id in common: is this the prediction file for another GT?"
        raise BadInput(f"predictions do not match the GT {gt_path}: {'; '.join(parts)}{hint}", path=pred_path)
    return [by_id[s.id] for s in samples]


def read_gt_and_predictions(
    gt_path: str | os.PathLike[str], pred_path: str | os.PathLike[str]
) -> tuple[list[VQASample], list[str]]:
    """Both files, joined by id: what `medvqa score` scores."""
    samples = read_gt(gt_path)
    answers = read_answer_file(pred_path)
    return samples, join_predictions(samples, answers, gt_path=gt_path, pred_path=pred_path)


def _few(ids: Sequence[str], k: int = 5) -> str:
    shown = ", ".join(repr(i) for i in ids[:k])
    return shown + (", ..." if len(ids) > k else "")


def _check_unique(ids: Sequence[str], *, path: Path, what: str) -> None:
    counts = Counter(ids)
    dups = [i for i, c in counts.items() if c > 1]
    if dups:
        raise BadInput(f"{len(dups)} duplicate {what} (e.g. {_few(dups)})", path=path)
