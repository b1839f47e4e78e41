"""STLLaVA-Med preference pairs as a Hugging Face preference dataset in trl's vision DPO format.

    export_pairs("runs/demo/stllava-med/f0.09/s0/checkpoint", "exports/pairs")

Reads `pairs.jsonl` (`{id, image, prompt, answer_type, chosen, rejected, scores}`, the file stage 2
writes to `<checkpoint>/stages/`) and writes, so that anyone can train on them with stock trl:

- `<out>/data/train-00000-of-00001.parquet` — the Hub's layout (`load_dataset("parquet", ...)`, or
  upload the folder as a dataset repo);
- `<out>/disk/` — `datasets.Dataset.save_to_disk` (`datasets.load_from_disk`);
- `<out>/README.md` — a dataset card whose `configs` name the parquet file (`load_dataset(<out>)`).

Columns: `images` (a list of one `datasets.Image`, the bytes embedded, so the export does not depend
on where the run lived), `prompt` (conversational: the user turn as the prompt policy renders the
question, with an `{"type": "image"}` placeholder that trl fills), `chosen` and `rejected` (one
assistant turn each), and `id`, `answer_type`, `category`, `score_chosen`, `score_rejected` beside.
The labeled replay rows stage 2 appends (`"replay": true`, chosen == rejected: the labels themselves,
which only an SFT term can learn from) are not preferences and are left out.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from medvqa.errors import BadInput
from medvqa.io import atomic_write_text

PAIRS = "pairs.jsonl"
PARQUET = Path("data") / "train-00000-of-00001.parquet"
FIELDS = ("id", "image", "prompt", "chosen", "rejected")


def find_pairs(source: str | Path) -> Path:
    """The pairs file: `source` itself, or `source/pairs.jsonl`, or `source/stages/pairs.jsonl`."""
    source = Path(source)
    for cand in (source, source / PAIRS, source / "stages" / PAIRS):
        if cand.is_file():
            return cand
    if not source.exists():
        raise BadInput("does not exist", path=source)
    raise BadInput(f"no {PAIRS} here (nor in stages/); run `medvqa stllava pairs` first", path=source)


def _policy_name(pairs: Path) -> str:
    """The prompt policy the checkpoint was trained with (checkpoint.json beside stages/), else ""."""
    from medvqa.io import read_json

    for folder in (pairs.parent, pairs.parent.parent):
        meta = folder / "checkpoint.json"
        if meta.is_file():
            config = read_json(meta).get("config") or {}
            return str(config.get("prompt_policy") or "")
    return ""


def _messages(policy: Any, question: str, answer_type: str) -> list[dict[str, Any]]:
    """The prompt as chat messages, every content a list of parts (one schema for Arrow)."""
    rendered = policy.render(question, answer_type)
    if rendered.text is not None:
        raise BadInput(
            f"prompt policy {policy.name!r} is a raw-text convention; trl's conversational format needs a "
            "chat policy (e.g. short-answer)"
        )
    return [
        {"role": m["role"], "content": [{"type": p["type"], "text": p.get("text")} for p in m["content"]]}
        for m in rendered.messages
    ]


def _image_bytes(image: Any, *, path: Path, record: object) -> dict[str, Any]:
    """The image's bytes (checked: exists and decodes) for an embedded `datasets.Image` cell."""
    from medvqa.safety import ImageChecker

    if not isinstance(image, str) or not image:
        raise BadInput("image must be a file path", path=path, record=record, field="image")
    file = Path(image)
    ImageChecker("verify").check(file, path=path, index=record, field="image")
    return {"bytes": file.read_bytes(), "path": file.name}


def pair_rows(pairs_path: Path, policy_name: str = "") -> list[dict[str, Any]]:
    """The dataset rows of a pairs file (a bad record is a BadInput naming file, line and field)."""
    from medvqa.io import iter_jsonl
    from medvqa.prompts import get_policy

    policy = get_policy(policy_name or None)
    rows, seen = [], set()
    for lineno, pair in iter_jsonl(pairs_path, allow_truncated_tail=True):
        record = f"line {lineno}"
        if not isinstance(pair, dict):
            raise BadInput("expected a JSON object", path=pairs_path, record=record)
        if pair.get("replay"):
            continue  # labeled replay (chosen == rejected): labeled data, not a preference
        for key in FIELDS:
            if not isinstance(pair.get(key), str) or not pair[key].strip():
                raise BadInput("missing or empty text", path=pairs_path, record=record, field=key)
        if pair["id"] in seen:
            continue  # a pair written twice (two writers) is one pair
        seen.add(pair["id"])
        answer_type = str(pair.get("answer_type") or "OPEN").upper()
        scores = pair.get("scores") or [None, None]
        rows.append(
            {
                "id": pair["id"],
                "images": [_image_bytes(pair["image"], path=pairs_path, record=record)],
                "prompt": _messages(policy, pair["prompt"], answer_type),
                "chosen": [{"role": "assistant", "content": [{"type": "text", "text": pair["chosen"]}]}],
                "rejected": [{"role": "assistant", "content": [{"type": "text", "text": pair["rejected"]}]}],
                "answer_type": answer_type,
                "category": str(pair.get("category") or ""),
                "score_chosen": float(scores[0]) if scores[0] is not None else None,
                "score_rejected": float(scores[1]) if len(scores) > 1 and scores[1] is not None else None,
            }
        )
    if not rows:
        raise BadInput(
            "no preference pairs in this file (only labeled replay rows, or none)", path=pairs_path
        )
    return rows


def to_preference_dataset(rows: list[dict[str, Any]], description: str = "") -> Any:
    """A `datasets.Dataset` with `images` as a list of `Image` (bytes embedded)."""
    from datasets import Dataset, DatasetInfo, Image, List

    return Dataset.from_list(rows, info=DatasetInfo(description=description)).cast_column(
        "images", List(Image())
    )


def export_pairs(source: str | Path, out: str | Path, *, prompt_policy: str = "") -> list[Path]:
    """Write the parquet file and the save_to_disk folder of the pairs under `source`; returns them."""
    pairs_path = find_pairs(source)
    from medvqa.prompts import get_policy

    policy = get_policy(prompt_policy or _policy_name(pairs_path) or None).name
    rows = pair_rows(pairs_path, policy)
    description = (
        f"STLLaVA-Med preference pairs (medvqa export --format trl-dpo): {len(rows)} pairs from "
        f"{pairs_path.name}, prompts rendered by the {policy!r} prompt policy; the labeled "
        "replay rows (chosen == rejected) are left out."
    )
    dataset = to_preference_dataset(rows, description)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    parquet = out / PARQUET
    parquet.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parquet.parent, prefix=".train.", suffix=".parquet")
    os.close(fd)
    try:
        dataset.to_parquet(tmp)
        os.replace(tmp, parquet)
    finally:
        Path(tmp).unlink(missing_ok=True)
    disk = out / "disk"
    staging = Path(tempfile.mkdtemp(dir=out, prefix=".disk."))
    try:
        dataset.save_to_disk(str(staging / "disk"))
        if disk.exists():
            shutil.rmtree(disk)
        os.replace(staging / "disk", disk)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    card = out / "README.md"
    atomic_write_text(card, dataset_card(description, len(rows)))
    return [parquet, disk, card]


def dataset_card(description: str, n_pairs: int) -> str:
    """A Hub dataset card whose `configs` point at the parquet file, so that `load_dataset(<out>)` (and
    the Hub, once the folder is uploaded) reads the pairs and not the save_to_disk copy beside them."""
    return (
        "---\n"
        "configs:\n"
        "- config_name: default\n"
        "  data_files:\n"
        "  - split: train\n"
        f"    path: {PARQUET.parent.as_posix()}/train-*.parquet\n"
        "tags:\n- dpo\n- preference\n- medical-vqa\n- trl\n"
        "---\n\n"
        f"# STLLaVA-Med preference pairs ({n_pairs})\n\n{description}\n\n"
        "Columns: `images`, `prompt`, `chosen`, `rejected` (trl's vision DPO format, conversational), "
        "`id`, `answer_type`, `category`, `score_chosen`, `score_rejected`.\n"
    )
