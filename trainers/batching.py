"""Training batches from rows encoded once: tokens and pixels computed before training, not per step.

trl's vision collators (`DataCollatorForVisionLanguageModeling`, `DataCollatorForVisionPreference`)
decode every image and run the processor on every batch: at 2,500 steps over 720 rows each row
is decoded and tokenized ~110 times, and on the tiny model that costs as much as the training
step itself. `encode_rows` runs the processor once per row (pixels kept once per distinct image)
and the collators here only pad and stack, with trl's own `pad` and `flush_left` and in trl's
order, so a batch is the same tensors trl would build (tested against trl's collators).

The dataset handed to trl holds the row number and an `images` marker, so trl still takes it for
the vision dataset it is (no text-only preparation) and uses the collator given to it.

`preprocess="auto"` encodes once when the distinct images' pixels fit in `PIXEL_BUDGET_BYTES`
and the processor returns only `input_ids`, `attention_mask` and `pixel_values` (LLaVA-style);
otherwise (a large real dataset, a processor with grid/size tensors) trl's per-batch collators run.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from medvqa.trainers.rows import load_pil

log = logging.getLogger("medvqa.train")

PIXEL_BUDGET_BYTES = 2 * 1024**3
SUPPORTED_KEYS = frozenset({"input_ids", "attention_mask", "pixel_values"})
ENCODE_CHUNK = 64


def _image_key(ref: Any) -> Any:
    """A hashable key of a `datasets.Image`-style reference (path or {"bytes", "path"})."""
    if isinstance(ref, Mapping):
        return ("bytes", ref.get("bytes")) if ref.get("bytes") is not None else ("path", ref.get("path"))
    return ("path", str(ref))


def _pil(ref: Any) -> Any:
    if isinstance(ref, Mapping):
        return load_pil(ref["bytes"] if ref.get("bytes") is not None else ref["path"])
    return load_pil(ref)


def _unpadded(ids: Any, mask: Any) -> list[Any]:
    return [row[m.bool()] for row, m in zip(ids, mask)]


def ensure_pad_token(model: Any, processor: Any) -> None:
    """What trl does before building its own collator (skipped when a collator is given): a pad token
    (the tokenizer's, else EOS), mirrored onto the model's configs."""
    tok = getattr(processor, "tokenizer", processor)
    tok.pad_token = tok.pad_token or tok.eos_token
    model.config.get_text_config().pad_token_id = tok.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tok.pad_token_id


class PixelStore:
    """One pixel tensor per distinct image (several QA rows share an image)."""

    def __init__(self) -> None:
        self.index: dict[Any, int] = {}
        self.tensors: list[Any] = []

    def add(self, key: Any, pixels: Any) -> int:
        if key not in self.index:
            self.index[key] = len(self.tensors)
            self.tensors.append(pixels.clone())
        return self.index[key]

    def stack(self, ids: Sequence[int]) -> Any:
        import torch

        return torch.stack([self.tensors[i] for i in ids])


@dataclass
class Encoded:
    """Rows encoded once: `examples` (token ids + pixel index per row) and the shared pixel store."""

    examples: list[dict[str, Any]]
    pixels: PixelStore
    pad_token_id: int
    block_pad_id: int


def can_encode_once(rows: Sequence[Mapping[str, Any]], processor: Any, mode: str) -> bool:
    """Whether `mode` ("auto" | "once" | "per_batch") means encoding these rows up front."""
    if mode == "per_batch" or not rows:
        return False
    if any(len(r.get("images") or ()) != 1 for r in rows):
        return False  # one image per row is what the collators below stack
    probe = processor(images=[_pil(rows[0]["images"][0])], text=[rows[0]["prompt"]], return_tensors="pt")
    if set(probe) - SUPPORTED_KEYS:
        if mode == "once":
            log.warning(
                "preprocess=once: the processor returns %s; using trl's per-batch collator", sorted(probe)
            )
        return False
    if mode == "once":
        return True
    n_images = len({_image_key(r["images"][0]) for r in rows})
    need = n_images * probe["pixel_values"][0].numel() * probe["pixel_values"].element_size()
    if need > PIXEL_BUDGET_BYTES:
        log.info(
            "preprocess=auto: %d images need %.1f GiB of pixels; trl's per-batch collator",
            n_images,
            need / 2**30,
        )
        return False
    return True


def encode_rows(rows: Sequence[Mapping[str, Any]], processor: Any, completion_keys: Sequence[str]) -> Encoded:
    """Tokenize each row's prompt (with its image, as trl's collator does) and completions, once.

    `completion_keys`: ("completion",) for SFT rows, ("chosen", "rejected") for preference rows.
    Extra row fields are not carried (the collators need only these).
    """
    tok = getattr(processor, "tokenizer", processor)
    pixels = PixelStore()
    examples: list[dict[str, Any]] = []
    for start in range(0, len(rows), ENCODE_CHUNK):
        chunk = rows[start : start + ENCODE_CHUNK]
        refs = [r["images"][0] for r in chunk]
        prompts = processor(
            images=[_pil(ref) for ref in refs],
            text=[r["prompt"] for r in chunk],
            padding=True,
            padding_side="left",
            return_tensors="pt",
            add_special_tokens=False,
        )
        prompt_ids = _unpadded(prompts["input_ids"], prompts["attention_mask"])
        completions = {}
        for key in completion_keys:
            out = processor(
                text=[r[key] for r in chunk],
                padding=True,
                padding_side="right",
                return_tensors="pt",
                add_special_tokens=False,
            )
            completions[key] = _unpadded(out["input_ids"], out["attention_mask"])
        for i, ref in enumerate(refs):
            ex = {
                "images": ref,
                "prompt_ids": prompt_ids[i],
                "pixel_index": pixels.add(_image_key(ref), prompts["pixel_values"][i]),
            }
            for key in completion_keys:
                ex[f"{key}_ids"] = completions[key][i]
            examples.append(ex)
    return Encoded(examples, pixels, int(tok.pad_token_id), int(tok.pad_token_id or tok.eos_token_id))


def encoded_dataset(encoded: Encoded) -> Any:
    """A `datasets.Dataset` the trainer's sampler indexes: the row number (and an `images` marker)."""
    from datasets import Dataset

    refs = [e["images"] for e in encoded.examples]
    marker = [ref if isinstance(ref, str) else "<image bytes>" for ref in refs]
    return Dataset.from_dict({"images": marker, "row": list(range(len(refs)))})


def _padded(seqs: list[Any], pad_id: int, side: str) -> tuple[Any, Any]:
    """(ids, mask) as the tokenizer pads a batch: `pad_id` on `side`."""
    import torch
    from trl.trainer.utils import pad

    return pad(seqs, pad_id, side), pad([torch.ones_like(t) for t in seqs], 0, side)


def _concat(p_ids: Any, p_mask: Any, c_ids: Any, c_mask: Any, max_length: int | None) -> tuple:
    """trl's prompt/completion assembly: prompts (left-padded) + completions (right-padded), flushed left."""
    import torch
    from trl.trainer.utils import flush_left

    input_ids = torch.cat((p_ids, c_ids), dim=1)
    attention_mask = torch.cat((p_mask, c_mask), dim=1)
    completion_mask = torch.cat((torch.zeros_like(p_mask), c_mask), dim=1)
    attention_mask, input_ids, completion_mask = flush_left(attention_mask, input_ids, completion_mask)
    if max_length is not None:
        input_ids = input_ids[:, :max_length]
        attention_mask = attention_mask[:, :max_length]
        completion_mask = completion_mask[:, :max_length]
    return input_ids, attention_mask, completion_mask


class EncodedSFTCollator:
    """`DataCollatorForVisionLanguageModeling` (prompt/completion, completion-only loss) on encoded rows."""

    def __init__(self, encoded: Encoded, max_length: int | None, completion_only_loss: bool = True):
        self.encoded, self.max_length, self.completion_only_loss = encoded, max_length, completion_only_loss

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        examples = [self.encoded.examples[int(it["row"])] for it in items]
        pad_id = self.encoded.pad_token_id
        input_ids, attention_mask, completion_mask = _concat(
            *_padded([e["prompt_ids"] for e in examples], pad_id, "left"),
            *_padded([e["completion_ids"] for e in examples], pad_id, "right"),
            self.max_length,
        )
        labels = input_ids.clone()
        labels[attention_mask == 0] = -100
        if self.completion_only_loss:
            labels[completion_mask == 0] = -100
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": self.encoded.pixels.stack([e["pixel_index"] for e in examples]),
            "labels": labels,
        }


class EncodedPreferenceCollator:
    """`DataCollatorForVisionPreference` on encoded rows: chosen rows first, then rejected, one image each."""

    def __init__(self, encoded: Encoded, max_length: int | None):
        self.encoded, self.max_length = encoded, max_length
        # per row: the reference model's (chosen, rejected) log-probs, once computed (stllava_med.dpo)
        self.reference: list[tuple[float, float]] | None = None

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        rows = [int(it["row"]) for it in items]
        examples = [self.encoded.examples[i] for i in rows]
        import torch
        from trl.trainer.utils import pad

        pad_id = self.encoded.pad_token_id
        chosen = _padded([e["chosen_ids"] for e in examples], pad_id, "right")
        rejected = _padded([e["rejected_ids"] for e in examples], pad_id, "right")
        # trl widens the chosen and rejected blocks to one width with `pad_token_id or eos_token_id`
        # (a pad id of 0 reads as unset there); masked positions, copied for identical tensors.
        c_ids = torch.cat(tuple(pad([chosen[0], rejected[0]], padding_value=self.encoded.block_pad_id)))
        c_mask = torch.cat(tuple(pad([chosen[1], rejected[1]], padding_value=0)))
        input_ids, attention_mask, completion_mask = _concat(
            *_padded([e["prompt_ids"] for e in examples] * 2, pad_id, "left"), c_ids, c_mask, self.max_length
        )
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": self.encoded.pixels.stack([e["pixel_index"] for e in examples] * 2),
            "completion_mask": completion_mask,
        }
        if self.reference is not None:  # the keys trl's precomputed-reference loss reads
            batch["ref_chosen_logps"] = torch.tensor([self.reference[i][0] for i in rows])
            batch["ref_rejected_logps"] = torch.tensor([self.reference[i][1] for i in rows])
        return batch


def sft_data(
    rows: Sequence[Mapping[str, Any]], model: Any, processor: Any, *, mode: str, max_length: int | None
) -> tuple[Any, Any]:
    """(train_dataset, data_collator) for trl's `SFTTrainer`: encoded once, or trl's lazy rows + None."""
    from medvqa.trainers.rows import to_dataset

    if not can_encode_once(rows, processor, mode):
        return to_dataset(rows), None
    ensure_pad_token(model, processor)
    encoded = encode_rows(rows, processor, ("completion",))
    return encoded_dataset(encoded), EncodedSFTCollator(encoded, max_length)


def preference_data(
    rows: Sequence[Mapping[str, Any]], model: Any, processor: Any, *, mode: str, max_length: int | None
) -> tuple[Any, Any]:
    """(train_dataset, data_collator) for trl's `DPOTrainer`: encoded once, or trl's lazy rows + None."""
    from medvqa.trainers.rows import to_dataset

    if not can_encode_once(rows, processor, mode):
        return to_dataset(rows), None
    ensure_pad_token(model, processor)
    encoded = encode_rows(rows, processor, ("chosen", "rejected"))
    return encoded_dataset(encoded), EncodedPreferenceCollator(encoded, max_length)
