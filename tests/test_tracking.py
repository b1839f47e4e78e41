"""Tracking and model-kernel fields of `TrainConfig` reach transformers (issue 13, "Tracking").

- `report_to="tensorboard"`: a real SFT run writes TensorBoard event files that tensorboard's own
  reader reads back (one loss scalar per logged step); the default writes none.
- `gradient_checkpointing` and `attn_implementation` are config fields, off / the model's own by
  default; building trl's configs leaves the process-wide warnings filters alone.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import pytest
from medvqa.fractions import manifest_hash
from medvqa.trainers.sft import SFTTrainerPlugin
from medvqa.types import TrainRequest


def _train(tiny_model_dir, phantom_root, out: Path, **overrides):
    from medvqa.benchmarks.phantom import Phantom

    samples = Phantom().load("train", Path(phantom_root))[:48]
    cfg = dataclasses.replace(
        SFTTrainerPlugin.make_config("phantom"),
        max_steps=3,
        per_device_train_batch_size=8,
        logging_steps=1,
        **overrides,
    )
    request = TrainRequest(
        base_model=f"hf:{tiny_model_dir}",
        train_samples=samples,
        out_dir=out,
        seed=0,
        fraction=1.0,
        manifest_hash=manifest_hash(samples),
        config=cfg,
    )
    return SFTTrainerPlugin().train(request)


def test_tensorboard_event_file_holds_the_training_loss(tiny_model_dir, phantom_root, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ckpt = _train(tiny_model_dir, phantom_root, tmp_path / "tb", report_to="tensorboard")
    events = sorted((ckpt.path / "_trl" / "runs").rglob("events.out.tfevents.*"))
    assert events, sorted(p.name for p in ckpt.path.rglob("*"))
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert "train/loss" in acc.Tags()["scalars"], acc.Tags()
    losses = acc.Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2, 3]
    assert all(e.value > 0 for e in losses)
    assert ckpt.meta["config"]["report_to"] == "tensorboard"


def test_default_reports_to_no_tracker(tiny_model_dir, phantom_root, tmp_path):
    ckpt = _train(tiny_model_dir, phantom_root, tmp_path / "none")
    assert not list(ckpt.path.rglob("events.out.tfevents.*"))


def test_report_to_values():
    from medvqa.trainers.trl_run import report_to

    assert report_to("none") == [] and report_to("") == []
    assert report_to("tensorboard, wandb") == ["tensorboard", "wandb"]
    assert report_to("all") == "all"


def test_checkpointing_is_a_field_and_configs_leave_warning_filters_alone(tmp_path):
    from medvqa.trainers.trl_run import trl_kwargs
    from trl import DPOConfig, SFTConfig

    cfg = SFTTrainerPlugin.make_config("phantom")
    before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        off = SFTConfig(**trl_kwargs(cfg, tmp_path, 0))
        on = DPOConfig(**trl_kwargs(dataclasses.replace(cfg, gradient_checkpointing=True), tmp_path, 0))
    assert not [w for w in caught if "checkpointing" in str(w.message)]
    assert list(warnings.filters) == before  # no process-wide filter installed by library code
    assert off.gradient_checkpointing is False and off.activation_checkpointing is False
    assert on.gradient_checkpointing is True and on.activation_checkpointing is True


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_attn_implementation_reaches_the_model(tiny_model_dir, kernel):
    from medvqa.trainers.models import load_model_and_processor

    model, _ = load_model_and_processor(f"hf:{tiny_model_dir}", attn_implementation=kernel)
    assert model.config._attn_implementation == kernel
