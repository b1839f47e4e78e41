"""STLLaVA-Med's DPO step (`stllava_med.dpo`): its reference cost, its step budget, its bytes (issue 15)."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest

N_PAIRS, N_REPLAY, BATCH = 16, 8, 8  # 24 rows: 3 steps per epoch


@pytest.fixture(scope="module")
def pair_rows(phantom_root):
    """Pairs as `pairs.jsonl` holds them (right vs a wrong answer), then labeled replay rows."""
    from medvqa.benchmarks.phantom import Phantom

    samples = Phantom().load("train", Path(phantom_root))[: N_PAIRS + N_REPLAY]
    answers = sorted({s.answer for s in samples})
    rng = random.Random(0)
    rows = []
    for i, s in enumerate(samples):
        replay = i >= N_PAIRS
        rejected = s.answer if replay else rng.choice([a for a in answers if a != s.answer])
        row = {"id": s.id, "image": str(s.image), "prompt": s.question, "answer_type": s.answer_type}
        rows.append({**row, "chosen": s.answer, "rejected": rejected, **({"replay": True} if replay else {})})
    return rows


def _cfg(**changes):
    from medvqa.trainers.stllava_med import STLLaVAMedTrainer

    # preset phantom: full fine-tuning, explicit reference, sigmoid+sft, replay rows
    base = {"dpo_batch_size": BATCH, "logging_steps": 1, "dpo_num_train_epochs": 2.0}
    return dataclasses.replace(STLLaVAMedTrainer.make_config("phantom"), **{**base, **changes})


def _trainer(tiny_model_dir, rows, tmp_path, name: str, **changes):
    from medvqa.trainers.stllava_med.dpo import dpo_trainer

    work = tmp_path / name
    trainer, _, _ = dpo_trainer(
        Path(tiny_model_dir), rows, _cfg(**changes), seed=0, work_dir=work, log_path=work / "log.jsonl"
    )
    return trainer


def test_trl_still_refuses_to_precompute_the_reference_on_our_dpo_data(
    tiny_model_dir, pair_rows, tmp_path, monkeypatch
):
    """Why DPO keeps `precompute_ref_log_probs=False`: trl 1.16 refuses it for vision datasets
    (huggingface/trl#5867). When a trl release accepts our data, this fails: time to measure it."""
    import trl

    class PrecomputingConfig(trl.DPOConfig):
        def __init__(self, **kwargs):
            super().__init__(**{**kwargs, "precompute_ref_log_probs": True})

    monkeypatch.setattr(trl, "DPOConfig", PrecomputingConfig)
    with pytest.raises(ValueError, match="precompute_ref_log_probs=True` is not supported for vision"):
        _trainer(tiny_model_dir, pair_rows, tmp_path, "precompute")


def test_the_reference_runs_once_before_training_and_the_losses_are_the_same(
    tiny_model_dir, pair_rows, tmp_path
):
    """The reference's log-probs are computed once per row before training (3 batches of 8 rows),
    never during its 2 epochs, and training gives the losses the per-step reference gives (trl's
    per-batch collators, where the reference runs on every step), to float rounding."""
    from medvqa.io import read_jsonl
    from medvqa.trainers.trl_run import run_trainer

    calls: dict[str, list[int]] = {"precomputed": [], "per_step": []}
    losses = {}
    for name, preprocess in (("precomputed", "once"), ("per_step", "per_batch")):
        trainer = _trainer(tiny_model_dir, pair_rows, tmp_path, name, preprocess=preprocess)
        trainer.ref_model.register_forward_hook(lambda module, args, output, name=name: calls[name].append(1))
        run_trainer(trainer, tmp_path / name)
        assert trainer.state.global_step == 2 * len(pair_rows) // BATCH == 6
        losses[name] = [r["loss"] for r in read_jsonl(tmp_path / name / "log.jsonl") if "loss" in r]
    assert calls["precomputed"] == [] and len(calls["per_step"]) == 6
    assert len(losses["precomputed"]) == 6
    assert losses["precomputed"] == pytest.approx(losses["per_step"], rel=1e-4, abs=1e-5)


def test_the_reference_is_precomputed_in_one_forward_per_batch_of_rows(
    tiny_model_dir, pair_rows, tmp_path, monkeypatch
):
    """Precomputing is one reference forward per batch of rows (24 rows, batch 8: 3), at set-up."""
    import medvqa.trainers.models as models
    from medvqa.trainers.stllava_med import dpo

    calls: list[int] = []
    load = models.load_model_and_processor

    def counted_load(*args, **kwargs):
        model, processor = load(*args, **kwargs)
        model.register_forward_hook(lambda module, a, output: calls.append(1))
        return model, processor

    monkeypatch.setattr(models, "load_model_and_processor", counted_load)
    trainer = _trainer(tiny_model_dir, pair_rows, tmp_path, "count")
    assert trainer.precompute_ref_logps and len(calls) == 3
    assert len(trainer.data_collator.reference) == len(pair_rows)
    assert dpo.precompute_reference(trainer, object(), BATCH) is False  # trl's collators: nothing to carry


def test_dpo_max_epochs_caps_dpo_max_steps_and_stage1s_cap_does_not(tiny_model_dir, pair_rows, tmp_path):
    steps = {
        name: _trainer(tiny_model_dir, pair_rows, tmp_path, name, **changes).args.max_steps
        for name, changes in {
            "capped": {"dpo_max_steps": 50, "dpo_max_epochs": 1.0},  # 24 rows / batch 8 = 3 steps an epoch
            "uncapped": {"dpo_max_steps": 50},
            "stage1_cap": {"dpo_max_steps": 50, "max_epochs": 1.0},  # stage 1's rows, not DPO's
            "epochs_decide": {"dpo_max_steps": -1, "dpo_max_epochs": 1.0},
        }.items()
    }
    assert steps == {"capped": 3, "uncapped": 50, "stage1_cap": 50, "epochs_decide": -1}


def test_dpo_config_refuses_a_negative_epoch_cap():
    from medvqa.errors import BadInput

    with pytest.raises(BadInput, match="dpo_max_epochs"):
        _cfg(dpo_max_epochs=-1.0)


def test_same_seed_same_dpo_bytes(tiny_model_dir, pair_rows, tmp_path):
    """Two DPO runs, same seed, threads and machine: identical weights and losses; the policy moved,
    and another seed (another batch order) ends elsewhere, so equal bytes are not a given."""
    from medvqa.io import atomic_write_jsonl, read_jsonl
    from medvqa.trainers.stllava_med.dpo import train_dpo

    pairs = tmp_path / "pairs.jsonl"
    atomic_write_jsonl(pairs, pair_rows)
    cfg = _cfg(dpo_max_steps=50, dpo_max_epochs=2.0)  # the cap decides: 6 steps
    runs = [tmp_path / name for name in ("a", "b", "other_seed")]
    metrics = [train_dpo(Path(tiny_model_dir), pairs, out, cfg, seed=s) for out, s in zip(runs, (4, 4, 5))]
    assert metrics[0] == metrics[1] and metrics[0]["steps"] == 6
    assert (metrics[0]["n_pairs"], metrics[0]["n_replay"]) == (N_PAIRS, N_REPLAY)
    weights = [(out / "model.safetensors").read_bytes() for out in runs]
    assert weights[0] == weights[1] != weights[2]
    assert weights[0] != (Path(tiny_model_dir) / "model.safetensors").read_bytes()
    losses = [[r["loss"] for r in read_jsonl(out / "train_log.jsonl") if "loss" in r] for out in runs]
    assert losses[0] == losses[1] and len(losses[0]) == 6


def test_report_pairs_are_a_seeded_sample_of_the_pairs_only():
    """The after-DPO margin is measured on <= dpo_report_pairs pairs, never on replay rows; same
    pairs and seed → same rows, another seed → other rows; 0 = every pair."""
    from medvqa.trainers.stllava_med.dpo import report_indices

    rows = [{"replay": i % 3 == 0} for i in range(300)]
    pairs = [i for i, r in enumerate(rows) if not r["replay"]]
    picked = report_indices(rows, 50, seed=0)
    assert len(picked) == 50 and picked == sorted(picked) and set(picked) <= set(pairs)
    assert report_indices(rows, 50, seed=0) == picked
    assert report_indices(rows, 50, seed=1) != picked
    assert report_indices(rows, 0, seed=0) == pairs
    assert report_indices(rows, 1000, seed=0) == pairs
