"""`TrainConfig.max_epochs`: one config trains every fraction sensibly (the step cap follows the data)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from medvqa.trainers.config import TrainConfig
from medvqa.trainers.trl_run import step_budget


def test_step_budget_caps_steps_at_epochs(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = TrainConfig(max_steps=2500, per_device_train_batch_size=32, max_epochs=25)
    assert step_budget(cfg, 720) == 563  # 9% of Phantom's 8,000 QA: 22.5 steps an epoch
    assert step_budget(cfg, 8000) == 2500  # the full set: the step count decides
    assert step_budget(dataclasses.replace(cfg, max_epochs=0), 720) == 2500  # no cap
    assert step_budget(dataclasses.replace(cfg, max_steps=-1), 720) == -1  # epochs decide anyway
    assert step_budget(dataclasses.replace(cfg, gradient_accumulation_steps=2), 720) == 282
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert step_budget(cfg, 720) == 282  # two ranks see the epoch in half the steps


def test_negative_max_epochs_is_refused():
    from medvqa.errors import BadInput

    with pytest.raises(BadInput, match="max_epochs"):
        TrainConfig(max_epochs=-1)


def test_training_stops_at_the_epoch_cap(tiny_model_dir, phantom_root, tmp_path):
    from medvqa.benchmarks.phantom import Phantom
    from medvqa.fractions import manifest_hash
    from medvqa.io import read_jsonl
    from medvqa.trainers.sft import SFTTrainerPlugin
    from medvqa.types import TrainRequest

    samples = Phantom().load("train", Path(phantom_root))[:40]
    cfg = dataclasses.replace(
        SFTTrainerPlugin.make_config("phantom"),
        max_steps=100,
        max_epochs=2,
        per_device_train_batch_size=8,
        logging_steps=1,
    )
    request = TrainRequest(
        base_model=f"hf:{tiny_model_dir}",
        train_samples=samples,
        out_dir=tmp_path / "ckpt",
        seed=0,
        fraction=1.0,
        manifest_hash=manifest_hash(samples),
        config=cfg,
    )
    ckpt = SFTTrainerPlugin().train(request)
    steps = [r["step"] for r in read_jsonl(ckpt.path / "train_log.jsonl") if "loss" in r]
    assert steps[-1] == 10  # 2 epochs × 5 batches, not 100
    assert ckpt.meta["config"]["max_steps"] == 100 and ckpt.meta["config"]["max_epochs"] == 2
