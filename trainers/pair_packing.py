"""One forward per preference pair: the shared prompt once, then the chosen and the rejected answer.

trl's `DPOTrainer` runs a batch of B pairs as 2B rows, `[chosen rows; rejected rows]`, each the
prompt followed by its answer. A pair's two rows hold the same prompt and the same image: on the
tiny Phantom model that is ~33 of ~37 tokens and the whole vision tower, computed twice. Packed, a
pair is one row

    prompt[:-1] | prompt[-1] chosen | prompt[-1] rejected

with the rejected block's positions restarting where the prompt ends and a block mask that lets
each answer see the prompt and itself, never the other answer. The last prompt token is repeated
in front of the rejected answer, so every answer token is predicted by the position just before
it, as trl's (fused) LM head expects. Each answer token then sees exactly the tokens, positions
and image it sees in trl's own batch: the per-token outputs are the same numbers up to float
rounding, and they are scattered back to trl's `[2B, L - 1]` layout, so trl computes every loss,
metric and log record itself. `tests/test_pair_packing.py` pins losses and gradients against
trl's unpacked batch.

Packing is skipped (trl's forward runs) when a batch is not B identical-prompt pairs laid out as
trl lays them out (left-flushed, one image per row), with kernels that take no custom 4D mask
(flash attention), and for mixture-of-experts router losses, which read a 2D mask.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Model inputs packing understands: anything else (image grids, token types, ...) runs unpacked.
_PACKABLE_INPUTS = frozenset({"input_ids", "attention_mask", "pixel_values", "labels", "use_cache"})


@dataclass
class PackedPairs:
    """A batch of B pairs as B packed rows, and where trl's per-token positions come from in it."""

    inputs: dict[str, Any]  # input_ids, 4D attention_mask, position_ids, pixel_values, labels
    source: Any  # [2B, L - 1]: flat index into the packed [B, Lp - 1] per-token outputs
    valid: Any  # [2B, L - 1]: True where trl's row has an answer token to score


def pack_pairs(
    inputs: Mapping[str, Any], *, mask_dtype: Any, fill_id: int, special_ids: frozenset[int] = frozenset()
) -> PackedPairs | None:
    """`inputs` (trl's `[chosen; rejected]` batch with `completion_mask`) packed one row per pair,
    or None when the batch is not pairs that share their prompt and image.

    `mask_dtype`: `torch.bool` (True = attend, for SDPA) or a float dtype (an additive mask, for
    eager attention). `fill_id` pads the packed rows (never attended, never scored).
    `special_ids`: tokens that must not be repeated (an image placeholder: one image per row)."""
    import torch

    if set(inputs) - _PACKABLE_INPUTS - {"completion_mask"}:
        return None
    ids, mask, completion = inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]
    pixels = inputs.get("pixel_values")
    rows, width = ids.shape
    if rows % 2 or mask.dim() != 2:
        return None
    pairs = rows // 2
    cols = torch.arange(width, device=ids.device)
    length = mask.sum(1)
    answer = completion.bool().sum(1)
    prompt = length - answer
    # trl's layout: tokens flushed left, the answer the tail of them, a prompt of at least one token
    if not (
        torch.equal(mask.bool(), cols < length[:, None])
        and torch.equal(completion.bool(), (cols >= prompt[:, None]) & (cols < length[:, None]))
        and bool((prompt >= 1).all())
    ):
        return None
    in_prompt = cols < prompt[:, None]
    prompt_ids = ids.masked_fill(~in_prompt, -1)
    if not (
        torch.equal(prompt[:pairs], prompt[pairs:]) and torch.equal(prompt_ids[:pairs], prompt_ids[pairs:])
    ):
        return None
    last_prompt = ids[torch.arange(pairs, device=ids.device), prompt[:pairs] - 1]
    if any(int(token) in special_ids for token in last_prompt.unique()):
        return None
    if pixels is not None and (pixels.shape[0] != rows or not torch.equal(pixels[:pairs], pixels[pairs:])):
        return None

    p, k, m = prompt[:pairs], answer[:pairs], answer[pairs:]
    packed_len = p + k + 1 + m
    packed_width = int(packed_len.max())
    q = torch.arange(packed_width, device=ids.device)[None, :]
    in_chosen = q < (p + k)[:, None]  # prompt, then the chosen answer
    real = q < packed_len[:, None]
    # the rejected block starts at the prompt's last column of its own row: [prompt[-1], rejected]
    source_col = torch.where(in_chosen, q, q - (k + 1)[:, None]).clamp(0, width - 1)
    source_row = torch.arange(pairs, device=ids.device)[:, None] + torch.where(in_chosen, 0, pairs)
    packed_ids = ids[source_row, source_col].masked_fill(~real, fill_id)
    position_ids = source_col.masked_fill(~real, 0)
    # blocks: 0 = prompt[:-1] (seen by both answers), 1 = prompt[-1] + chosen, 2 = prompt[-1] + rejected
    block = torch.where(in_chosen, (q >= (p - 1)[:, None]).long(), 2)
    is_answer = real & (source_col >= p[:, None]) & ((q < (p + k)[:, None]) | (q > (p + k)[:, None]))
    labels = packed_ids.masked_fill(~is_answer, -100)

    causal = q <= q.T  # [query, key]: a key at or before the query
    sees = (
        causal[None]
        & real[:, None, :]
        & ((block[:, None, :] == 0) | (block[:, None, :] == block[:, :, None]))
    )
    sees |= torch.eye(packed_width, dtype=torch.bool, device=ids.device)[None]  # padding sees itself
    if mask_dtype == torch.bool:
        attention = sees[:, None]
    else:
        attention = torch.zeros(sees.shape, dtype=mask_dtype, device=ids.device)
        attention = attention.masked_fill(~sees, torch.finfo(mask_dtype).min)[:, None]

    # trl's per-token row j, column t scores token t + 1: packed column t (chosen) or t + k + 1
    t = torch.arange(width - 1, device=ids.device)[None, :]
    shift = torch.cat((torch.zeros_like(k), k + 1))[:, None]
    pair_of_row = torch.arange(rows, device=ids.device) % pairs
    packed_col = (t + shift).clamp(max=packed_width - 2)
    source = pair_of_row[:, None] * (packed_width - 1) + packed_col
    valid = completion[:, 1:].bool()
    packed = {
        "input_ids": packed_ids,
        "attention_mask": attention,
        "position_ids": position_ids,
        "labels": labels,
    }
    if pixels is not None:
        packed["pixel_values"] = pixels[:pairs]
    return PackedPairs(packed, source, valid)


def unpack(packed: PackedPairs, outputs: Any) -> Any:
    """trl's per-token fields (`[B, Lp - 1]`, packed) back in trl's `[2B, L - 1]` layout, zero where
    trl's row has no answer token (as the fused head leaves them); scalar fields as they are."""
    import torch

    per_token = {}
    for name, value in outputs.items():
        if (
            isinstance(value, torch.Tensor)
            and value.dim() == 2
            and value.shape[0] == packed.source.shape[0] // 2
        ):
            gathered = value.reshape(-1)[packed.source]
            per_token[name] = torch.where(packed.valid, gathered, torch.zeros_like(gathered))
    if "label_mask" in per_token:
        per_token["label_mask"] = packed.valid
    return type(outputs)(**{**dict(outputs.items()), **per_token})


class PairPackedForward:
    """Calls `model` as trl's `DPOTrainer` does (`fused_lm_head=True`, labels), one packed row per
    pair where the batch allows; any other call goes to `model` unchanged."""

    def __init__(self, model: Any, completion_mask: Any) -> None:
        self.model, self.completion_mask = model, completion_mask

    def __call__(self, *, fused_lm_head: bool = False, **kwargs: Any) -> Any:
        settings = _packing_settings(self.model) if fused_lm_head else None
        packed = settings and pack_pairs({**kwargs, "completion_mask": self.completion_mask}, **settings)
        if not packed:
            return self.model(**kwargs, fused_lm_head=fused_lm_head)
        outputs = self.model(**packed.inputs, use_cache=False, fused_lm_head=True)
        return unpack(packed, outputs)


def _packing_settings(model: Any) -> dict[str, Any] | None:
    """`pack_pairs`' mask type, fill token and special tokens for `model`; None where its attention
    kernel takes no custom 4D mask."""
    import torch

    config = getattr(getattr(model, "module", model), "config", None)  # DDP wraps the model
    if config is None:
        return None
    text = config.get_text_config()
    kernel = str(getattr(text, "_attn_implementation", None) or getattr(config, "_attn_implementation", ""))
    if kernel == "sdpa":
        mask_dtype = torch.bool
    elif kernel == "eager":
        mask_dtype = next(model.parameters()).dtype
    else:
        return None
    special = {
        getattr(config, name, None) for name in ("image_token_id", "image_token_index", "video_token_id")
    }
    special_ids = frozenset(int(i) for i in special if isinstance(i, int))
    fill = getattr(text, "pad_token_id", None)
    fill_id = int(fill) if isinstance(fill, int) and fill not in special_ids else 0
    return {"mask_dtype": mask_dtype, "fill_id": fill_id, "special_ids": special_ids}


@functools.cache
def pair_packing_dpo_trainer_class() -> type:
    """trl's `DPOTrainer` whose policy (and reference) forwards run one packed row per pair."""
    from trl import DPOTrainer

    class PairPackingDPOTrainer(DPOTrainer):
        def _compute_loss(self, model: Any, inputs: Mapping[str, Any], return_outputs: bool) -> Any:
            return super()._compute_loss(
                PairPackedForward(model, inputs["completion_mask"]), inputs, return_outputs
            )

        def compute_ref_log_probs(self, model: Any, inputs: Mapping[str, Any]) -> Any:
            return super().compute_ref_log_probs(PairPackedForward(model, inputs["completion_mask"]), inputs)

    return PairPackingDPOTrainer
