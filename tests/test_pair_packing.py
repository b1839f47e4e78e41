"""DPO pairs packed one row per pair (`trainers.pair_packing`): trl's losses, metrics and gradients."""

from __future__ import annotations

import random

import pytest

from tests.test_stllava_dpo import BATCH, _trainer, pair_rows  # noqa: F401 (pair_rows: a fixture)


@pytest.fixture(scope="module")
def varied_pairs(pair_rows):  # noqa: F811
    """test_stllava_dpo's pairs (and replay rows), each rejected answer 1 to 3 wrong words: chosen
    and rejected answers of different lengths in one batch."""
    answers = sorted({r["chosen"] for r in pair_rows})
    rng = random.Random(0)
    return [
        r
        if r.get("replay")
        else {**r, "rejected": " ".join(rng.sample([a for a in answers if a != r["chosen"]], 1 + i % 3))}
        for i, r in enumerate(pair_rows)
    ]


def _trl_loss(trainer, model, batch):
    """trl's own `DPOTrainer._compute_loss` (the packing trainer overrides it)."""
    from trl import DPOTrainer

    return DPOTrainer._compute_loss(trainer, model, batch, False)


def _loss_and_grads(trainer, batch, packed: bool):
    from medvqa.trainers.pair_packing import PairPackedForward

    model = trainer.model
    model.train()
    model.zero_grad()
    forward = PairPackedForward(model, batch["completion_mask"]) if packed else model
    trainer._metrics["train"].clear()
    trainer._total_train_tokens = 0  # trl's running count, logged as num_tokens
    loss = _trl_loss(trainer, forward, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.item(), grads, metrics


def _a_moved_batch(trainer, rows: int):
    """A batch after one optimiser step, so rewards and margins are not all zero."""
    batch = trainer.data_collator([{"row": i} for i in range(rows)])
    loss = _trl_loss(trainer, trainer.model, batch)
    loss.backward()
    import torch

    with torch.no_grad():
        for p in trainer.model.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad
    return batch


@pytest.mark.parametrize(
    ("attn", "loss"), [("sdpa", "sigmoid+sft"), ("eager", "sigmoid"), ("sdpa", "sigmoid")]
)
def test_a_packed_pair_gives_trls_loss_metrics_and_gradients(
    tiny_model_dir, varied_pairs, tmp_path, attn, loss
):
    """One batch of 8 pairs (answers of different lengths), through trl's own `_compute_loss`: packed
    and as trl's 16 rows, the same loss, the same logged metrics and the same gradients, to float
    rounding (relative to the gradient's norm: a key bias, whose true gradient is 0, is all noise)."""
    import torch

    trainer = _trainer(
        tiny_model_dir, varied_pairs, tmp_path, f"{attn}-{loss}", attn_implementation=attn, dpo_loss=loss
    )
    assert trainer.model.config.get_text_config()._attn_implementation == attn
    batch = _a_moved_batch(trainer, BATCH)
    answer_lengths = batch["completion_mask"].sum(1).tolist()
    assert len(set(answer_lengths)) > 1  # chosen and rejected answers of several lengths
    plain_loss, plain_grads, plain_metrics = _loss_and_grads(trainer, batch, packed=False)
    packed_loss, packed_grads, packed_metrics = _loss_and_grads(trainer, batch, packed=True)
    assert packed_loss == pytest.approx(plain_loss, rel=1e-5)
    assert plain_metrics["rewards/margins"] != 0
    assert packed_metrics.keys() == plain_metrics.keys()
    for key, value in plain_metrics.items():
        assert packed_metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert packed_grads.keys() == plain_grads.keys()
    norm = torch.sqrt(sum(g.pow(2).sum() for g in plain_grads.values()))
    worst = max((packed_grads[n] - g).abs().max() for n, g in plain_grads.items())
    assert worst <= 1e-5 * norm


def test_packing_runs_one_row_per_pair_and_the_image_once(tiny_model_dir, varied_pairs, tmp_path):
    """The policy sees B rows (not 2B) and B images, each row shorter than prompt + both answers."""
    import torch
    from medvqa.trainers.pair_packing import pack_pairs

    trainer = _trainer(tiny_model_dir, varied_pairs, tmp_path, "shape")
    batch = trainer.data_collator([{"row": i} for i in range(BATCH)])
    seen = []
    trainer.model.register_forward_hook(
        lambda module, args, kwargs, output: seen.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    _trl_loss(trainer, trainer.model, batch)  # trl's: 2B rows
    trainer.compute_loss(trainer.model, batch)  # the packing trainer's
    keys = ("input_ids", "attention_mask", "pixel_values", "completion_mask")
    packed = pack_pairs({k: batch[k] for k in keys}, mask_dtype=torch.bool, fill_id=0)
    assert seen[0][0] == 2 * BATCH and seen[1][0] == BATCH
    assert packed.inputs["pixel_values"].shape[0] == BATCH
    assert seen[1][1] < 2 * seen[0][1]


def test_batches_that_are_not_shared_prompt_pairs_run_as_trl_runs_them(
    tiny_model_dir, varied_pairs, tmp_path
):
    """Another prompt or another image in a pair's rejected row, or an odd row count: no packing,
    and the loss is trl's own."""
    import torch
    from medvqa.trainers.pair_packing import PairPackedForward, pack_pairs

    trainer = _trainer(tiny_model_dir, varied_pairs, tmp_path, "fallback")
    batch = trainer.data_collator([{"row": i} for i in range(BATCH)])
    keys = ("input_ids", "attention_mask", "pixel_values", "completion_mask")
    settings = {"mask_dtype": torch.bool, "fill_id": 0}
    assert pack_pairs({k: batch[k] for k in keys}, **settings) is not None
    other_prompt = dict(batch, input_ids=batch["input_ids"].clone())
    other_prompt["input_ids"][BATCH, 20] += 1  # a question word of pair 0's rejected row
    other_image = dict(batch, pixel_values=batch["pixel_values"].clone())
    other_image["pixel_values"][BATCH] += 1
    odd = {k: batch[k][:-1] for k in keys}
    extra = dict(batch, image_sizes=torch.ones(2 * BATCH, 2))
    image_token = trainer.model.config.image_token_id
    for name, changed in {"prompt": other_prompt, "image": other_image, "odd": odd, "extra": extra}.items():
        assert pack_pairs({k: changed[k] for k in changed if not k.startswith("ref_")}, **settings) is None, (
            name
        )
    assert (
        pack_pairs({k: batch[k] for k in keys}, **settings, special_ids=frozenset({image_token})) is not None
    )
    last_prompt = int(
        batch["input_ids"][0, int((batch["attention_mask"][0] - batch["completion_mask"][0]).sum()) - 1]
    )
    assert pack_pairs({k: batch[k] for k in keys}, **settings, special_ids=frozenset({last_prompt})) is None
    trainer.model.train()
    plain = _trl_loss(trainer, trainer.model, other_prompt).item()
    fallback = _trl_loss(
        trainer, PairPackedForward(trainer.model, other_prompt["completion_mask"]), other_prompt
    )
    assert fallback.item() == plain


def test_kernels_without_custom_masks_are_not_packed(tiny_model_dir):
    from medvqa.trainers.models import load_model_and_processor
    from medvqa.trainers.pair_packing import _packing_settings

    model, _ = load_model_and_processor(f"hf:{tiny_model_dir}", attn_implementation="eager")
    assert _packing_settings(model)["mask_dtype"] == next(model.parameters()).dtype
    model.config.get_text_config()._attn_implementation = "flash_attention_2"
    assert _packing_settings(model) is None


def test_training_packed_follows_trls_rows(tiny_model_dir, varied_pairs, tmp_path):
    """Two epochs of DPO (6 steps) packed and as trl's rows: the same per-step losses and the same
    reference log-probs, to float rounding; the reference is precomputed packed as well."""
    from medvqa.io import read_jsonl
    from medvqa.trainers.trl_run import run_trainer

    losses, references = {}, {}
    for name, pack in (("packed", True), ("rows", False)):
        trainer = _trainer(tiny_model_dir, varied_pairs, tmp_path, name, dpo_pack_pairs=pack)
        assert (type(trainer).__name__ == "PairPackingDPOTrainer") is pack
        references[name] = trainer.data_collator.reference
        run_trainer(trainer, tmp_path / name)
        losses[name] = [r["loss"] for r in read_jsonl(tmp_path / name / "log.jsonl") if "loss" in r]
    assert len(losses["packed"]) == 2 * len(varied_pairs) // BATCH == 6
    assert losses["packed"] == pytest.approx(losses["rows"], rel=1e-4, abs=1e-5)
    flat = [v for pair in references["packed"] for v in pair]
    assert flat == pytest.approx([v for pair in references["rows"] for v in pair], rel=1e-5)
