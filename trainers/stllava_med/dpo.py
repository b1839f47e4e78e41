"""Stage 2, step 5: trl `DPOTrainer` on `pairs.jsonl`; the reference is the stage-1 model, loaded explicitly.

The reference is frozen, so its log-probs of each row are computed once, before training
(`precompute_reference`), not on every step of every epoch: on the tiny model the reference forward
is about a quarter of a DPO step, and the demo runs 8 epochs. trl's own `precompute_ref_log_probs`
cannot do it: trl 1.16 refuses it for vision datasets at `DPOTrainer.__init__`
(huggingface/trl#5867) and its vision collators do not carry the columns. So the rows encoded once
(`batching.EncodedPreferenceCollator`) carry them, computed with trl's own
`compute_ref_log_probs`, and the trainer's loss reads them as it reads precomputed ones. With trl's
per-batch collators (`preprocess = "per_batch"`, a processor with extra tensors) the reference runs
on every step, as before. `tests/test_stllava_dpo.py` pins both and the equality of the losses.

Each pair runs as one packed row (`pair_packing`, `dpo_pack_pairs`): its prompt and image once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medvqa.errors import BadInput
from medvqa.trainers.config import TrainConfig
from medvqa.trainers.stllava_med.config import DPO_LOSSES, STLLaVAMedConfig
from medvqa.trainers.stllava_med.stagefiles import iter_checked


def dpo_view(cfg: STLLaVAMedConfig) -> TrainConfig:
    """The stage-1 optimisation fields replaced by their `dpo_*` counterparts (stage 1's
    `max_epochs` counts epochs of the labeled rows: it does not cap DPO, `dpo_max_epochs` does)."""
    return dataclasses.replace(
        cfg,
        learning_rate=cfg.dpo_learning_rate,
        num_train_epochs=cfg.dpo_num_train_epochs,
        max_steps=cfg.dpo_max_steps,
        max_epochs=cfg.dpo_max_epochs,
        per_device_train_batch_size=cfg.dpo_batch_size,
        lr_scheduler_type=cfg.dpo_lr_scheduler_type,
        warmup_ratio=cfg.dpo_warmup_ratio,
    )


def dpo_trainer(
    stage1_dir: Path,
    rows_in: list[Mapping[str, Any]],
    cfg: STLLaVAMedConfig,
    *,
    seed: int,
    work_dir: Path,
    log_path: Path,
) -> tuple[Any, Any, Any]:
    """(trl `DPOTrainer`, its dataset, the processor), ready to train: policy and explicit reference
    loaded from stage 1, rows encoded once unless `cfg.preprocess` says otherwise."""
    from medvqa.trainers.batching import preference_data
    from medvqa.trainers.models import load_model_and_processor, lora_config
    from medvqa.trainers.pair_packing import pair_packing_dpo_trainer_class
    from medvqa.trainers.rows import RowBuilder, guess_answer_type
    from medvqa.trainers.trl_run import progress_callback, seed_everything, step_budget, trl_kwargs
    from trl import DPOConfig, DPOTrainer

    seed_everything(seed)
    policy, processor = load_model_and_processor(
        f"hf:{stage1_dir}", attn_implementation=cfg.attn_implementation
    )
    builder = RowBuilder(processor, cfg.prompt_policy)

    def row(p: Mapping[str, Any]) -> dict[str, Any]:
        answer_type = p.get("answer_type") or guess_answer_type(p["prompt"])
        return builder.pair_row(p["image"], p["prompt"], answer_type, p["chosen"], p["rejected"])

    dataset, collator = preference_data(
        [row(p) for p in rows_in], policy, processor, mode=cfg.preprocess, max_length=cfg.max_length or None
    )
    ref_model = None
    if not cfg.use_lora:
        ref_model, _ = load_model_and_processor(
            f"hf:{stage1_dir}", attn_implementation=cfg.attn_implementation
        )
        ref_model.eval()
    view = dpo_view(cfg)
    budget = dataclasses.replace(view, max_steps=step_budget(view, len(rows_in)))  # pairs + replay rows
    args = DPOConfig(
        **trl_kwargs(budget, work_dir, seed),
        beta=cfg.beta,
        loss_type=list(DPO_LOSSES[cfg.dpo_loss]),
        precompute_ref_log_probs=False,  # refused by trl for vision datasets: precompute_reference
        per_device_eval_batch_size=cfg.dpo_batch_size,
    )
    trainer_class = pair_packing_dpo_trainer_class() if cfg.dpo_pack_pairs else DPOTrainer
    trainer = trainer_class(
        model=policy,
        ref_model=ref_model,
        args=args,
        data_collator=collator,
        train_dataset=dataset,
        processing_class=processor,
        peft_config=lora_config(cfg) if cfg.use_lora else None,
        callbacks=[progress_callback(log_path, "dpo")],
    )
    precompute_reference(trainer, collator, cfg.dpo_batch_size)
    return trainer, dataset, processor


def precompute_reference(trainer: Any, collator: Any, batch_size: int) -> bool:
    """The reference's (chosen, rejected) log-probs of every row, once, carried by `collator` (the
    encoded-rows collator) for the trainer's loss; False (nothing done) for trl's own collators.
    Rows of another collator (pairs to `evaluate` on) need the same call before they are scored:
    the reference is frozen, so this is valid before and after training."""
    from medvqa.trainers.batching import EncodedPreferenceCollator

    if not isinstance(collator, EncodedPreferenceCollator):
        return False
    reference = trainer.ref_model or trainer.model  # LoRA: the policy with its adapter disabled
    was_training = reference.training
    reference.eval()
    device = trainer.accelerator.device
    values: list[tuple[float, float]] = []
    rows = len(collator.encoded.examples)
    try:
        for start in range(0, rows, batch_size):
            batch = collator([{"row": i} for i in range(start, min(start + batch_size, rows))])
            chosen, rejected = trainer.compute_ref_log_probs(
                reference, {k: v.to(device) for k, v in batch.items()}
            )
            values += list(zip(chosen.float().cpu().tolist(), rejected.float().cpu().tolist()))
    finally:
        reference.train(was_training)
    collator.reference = values
    trainer.precompute_ref_logps = True  # the loss reads the batch's ref_*_logps (trl's own switch)
    return True


def train_dpo(
    stage1_dir: Path,
    pairs_path: Path,
    out_dir: Path,
    cfg: STLLaVAMedConfig,
    *,
    seed: int,
    work_dir: Path | None = None,
    log_path: Path | None = None,
) -> dict[str, Any]:
    """trl `DPOTrainer` on the pairs (and replay rows); the reference is the stage-1 model.

    (trl would otherwise reload an implicit reference from the policy's `name_or_path`, not from
    memory.) With LoRA the reference is the adapter-disabled policy, i.e. stage 1 as well.
    Returns DPO metrics: reward margin/accuracy on (a sample of) the self-generated pairs after training, steps,
    loss names, and how many rows were pairs and how many labeled replay.
    """
    from medvqa.trainers.checkpoints import save_model
    from medvqa.trainers.trl_run import drop_trl_checkpoints, run_trainer

    rows_in = iter_checked(pairs_path, ("image", "prompt", "chosen", "rejected"))
    pairs = [p for p in rows_in if not p.get("replay")]
    if not pairs:
        raise BadInput("no preference pairs to train on", path=pairs_path)
    work_dir = work_dir or out_dir / "_trl"
    log_path = log_path or out_dir / "train_log.jsonl"
    trainer, dataset, processor = dpo_trainer(
        stage1_dir, rows_in, cfg, seed=seed, work_dir=work_dir, log_path=log_path
    )
    run_trainer(trainer, work_dir)
    pair_set = dataset.select(report_indices(rows_in, cfg.dpo_report_pairs, seed))
    metrics = trainer.evaluate(eval_dataset=pair_set, metric_key_prefix="pairs")
    save_model(trainer.model, processor, out_dir)
    drop_trl_checkpoints(work_dir)
    return {
        "steps": trainer.state.global_step,
        "loss_type": list(DPO_LOSSES[cfg.dpo_loss]),
        "reference": str(stage1_dir),
        "reward_margin": _metric(metrics, "rewards/margins"),
        "reward_accuracy": _metric(metrics, "rewards/accuracies"),
        "n_pairs": len(pairs),
        "n_report_pairs": len(pair_set),
        "n_replay": len(rows_in) - len(pairs),
    }


def report_indices(rows: Sequence[Mapping[str, Any]], limit: int, seed: int) -> list[int]:
    """Row numbers of the pairs (not replay rows) the after-training margin is measured on: all, or a
    seeded sample of `limit` in file order (the same rows for the same pairs file and seed)."""
    import random

    from medvqa.trainers.stllava_med.stagefiles import seed_for

    idx = [i for i, p in enumerate(rows) if not p.get("replay")]
    if limit and len(idx) > limit:
        idx = sorted(random.Random(seed_for("dpo-report", seed)).sample(idx, limit))
    return idx


def _metric(metrics: Mapping[str, Any], name: str) -> float | None:
    for key, value in metrics.items():
        if key.endswith(name):
            return float(value)
    return None
