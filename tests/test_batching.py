"""Rows encoded once (`medvqa.trainers.batching`) give exactly trl's batches, and exactly its training.

The speed-up of encoding rows once (tokens, pixels) is only allowed if nothing else changes: the
collated tensors equal trl's own vision collators', and a short real SFT run with
`preprocess="once"` ends on the same weights as one with trl's per-batch collator.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from medvqa.trainers import batching
from medvqa.trainers.rows import RowBuilder, load_pil, qa_rows


@pytest.fixture(scope="module")
def samples(phantom_root):
    from medvqa.benchmarks.phantom import Phantom

    return Phantom().load("train", Path(phantom_root))[:40]


@pytest.fixture(scope="module")
def model_and_processor(tiny_model_dir):
    from medvqa.trainers.models import load_model_and_processor

    return load_model_and_processor(f"hf:{tiny_model_dir}")


def _assert_same_batch(ours: dict, theirs) -> None:
    import torch

    assert set(ours) == set(theirs), (sorted(ours), sorted(theirs))
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype, key
        assert torch.equal(ours[key], theirs[key]), key


def _decoded(rows):
    return [{**r, "images": [load_pil(r["images"][0])]} for r in rows]


@pytest.mark.parametrize("max_length", [None, 20])
def test_sft_batches_equal_trls_vision_collator(model_and_processor, samples, max_length):
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    model, processor = model_and_processor
    rows = qa_rows(samples, RowBuilder(processor, ""))
    dataset, collator = batching.sft_data(rows, model, processor, mode="once", max_length=max_length)
    assert isinstance(collator, batching.EncodedSFTCollator)
    trl = DataCollatorForVisionLanguageModeling(
        processor=processor, completion_only_loss=True, max_length=max_length
    )
    for idx in ([0, 1, 2, 3, 4, 5, 6, 7], [39, 3, 17, 3, 22]):  # mixed lengths, a repeated row
        _assert_same_batch(collator([dataset[i] for i in idx]), trl(_decoded([rows[i] for i in idx])))


def test_preference_batches_equal_trls_vision_preference_collator(model_and_processor, samples):
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    model, processor = model_and_processor
    builder = RowBuilder(processor, "")
    rows = [
        builder.pair_row(s.image, s.question, s.answer_type, s.answer, "no idea at all " * (i % 3))
        for i, s in enumerate(samples)
    ]
    dataset, collator = batching.preference_data(rows, model, processor, mode="once", max_length=None)
    trl = DataCollatorForVisionPreference(processor=processor)
    idx = [5, 0, 9, 13, 2, 2]
    _assert_same_batch(collator([dataset[i] for i in idx]), trl(_decoded([rows[i] for i in idx])))


def test_pixels_are_kept_once_per_image(model_and_processor, samples):
    _, processor = model_and_processor
    rows = qa_rows(samples, RowBuilder(processor, ""))
    encoded = batching.encode_rows(rows, processor, ("completion",))
    assert len(encoded.examples) == len(rows)
    assert len(encoded.pixels.tensors) == len({s.image for s in samples}) < len(rows)


def test_auto_falls_back_to_trls_collator_when_pixels_do_not_fit(model_and_processor, samples, monkeypatch):
    model, processor = model_and_processor
    rows = qa_rows(samples, RowBuilder(processor, ""))
    assert batching.can_encode_once(rows, processor, "auto")
    monkeypatch.setattr(batching, "PIXEL_BUDGET_BYTES", 1000)
    assert not batching.can_encode_once(rows, processor, "auto")
    assert batching.can_encode_once(rows, processor, "once")
    dataset, collator = batching.sft_data(rows, model, processor, mode="auto", max_length=None)
    assert collator is None and "completion" in dataset.column_names  # trl's lazy rows
    assert not batching.can_encode_once(rows, processor, "per_batch")


def _train(tiny_model_dir, samples, tmp_path, preprocess: str) -> dict:
    from medvqa.trainers.models import load_model_and_processor
    from medvqa.trainers.sft import SFTTrainerPlugin
    from medvqa.trainers.trl_run import fit_sft

    cfg = dataclasses.replace(
        SFTTrainerPlugin.make_config("phantom"),
        max_steps=4,
        per_device_train_batch_size=8,
        logging_steps=2,
        preprocess=preprocess,
    )
    model, processor = load_model_and_processor(f"hf:{tiny_model_dir}")
    rows = qa_rows(samples, RowBuilder(processor, ""))
    out = tmp_path / preprocess
    model = fit_sft(
        model, processor, rows, cfg, work_dir=out / "_trl", log_path=out / "log.jsonl", seed=3, stage="sft"
    )
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_training_on_encoded_rows_ends_on_trls_weights(tiny_model_dir, samples, tmp_path):
    import torch

    ours = _train(tiny_model_dir, samples, tmp_path, "once")
    theirs = _train(tiny_model_dir, samples, tmp_path, "per_batch")
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    from medvqa.trainers.models import load_model_and_processor

    base, _ = load_model_and_processor(f"hf:{tiny_model_dir}")
    moved = any(not torch.equal(v, ours[k]) for k, v in base.state_dict().items())
    assert moved  # four real optimizer steps happened


def test_same_seed_same_threads_same_bytes(tiny_model_dir, samples, tmp_path):
    """Same machine, threads and seed: the saved weights are identical bytes (issue 15)."""
    from medvqa.fractions import manifest_hash
    from medvqa.io import read_jsonl
    from medvqa.trainers.sft import SFTTrainerPlugin
    from medvqa.types import TrainRequest

    cfg = dataclasses.replace(
        SFTTrainerPlugin.make_config("phantom"), max_steps=4, per_device_train_batch_size=8, logging_steps=1
    )

    def train(name: str) -> Path:
        request = TrainRequest(
            base_model=f"hf:{tiny_model_dir}",
            train_samples=samples,
            out_dir=tmp_path / name,
            seed=5,
            fraction=1.0,
            manifest_hash=manifest_hash(samples),
            config=cfg,
        )
        return SFTTrainerPlugin().train(request).path

    a, b = train("a"), train("b")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    losses = [[r["loss"] for r in read_jsonl(p / "train_log.jsonl") if "loss" in r] for p in (a, b)]
    assert losses[0] == losses[1] and len(losses[0]) == 4
