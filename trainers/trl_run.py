"""Our side of trl: its config arguments, running (and resuming) a trainer, progress logging, one SFT fit.

- `trl_kwargs`: CPU-safe trl `SFTConfig`/`DPOConfig` arguments from a `TrainConfig` (bf16 and
  gradient checkpointing off on CPU, no worker processes, reporting only where asked).
- `run_trainer`: `trainer.train()` resuming from the newest trl `checkpoint-N` (on CPU with the
  heap built before training frozen, `frozen_heap`; trl's LM-head tiles no wider than the
  vocabulary, `vocabulary_wide_tiles`).
- `progress_callback`: appends each trl log record to `train_log.jsonl`.
- `fit_sft`: one trl `SFTTrainer` run on prompt/completion rows (loss on the completion only).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from medvqa.io import JsonlAppender
from medvqa.trainers.batching import sft_data
from medvqa.trainers.config import TrainConfig
from medvqa.trainers.models import lora_config

log = logging.getLogger("medvqa.train")


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch
    from transformers import set_seed

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    set_seed(seed)


def _precision(cfg: TrainConfig) -> dict[str, bool]:
    import torch

    cuda = torch.cuda.is_available()
    if cfg.precision == "fp32" or not cuda:
        return {"bf16": False, "fp16": False}
    if cfg.precision == "fp16":
        return {"bf16": False, "fp16": True}
    if cfg.precision == "bf16":
        return {"bf16": True, "fp16": False}
    return {"bf16": bool(torch.cuda.is_bf16_supported()), "fp16": False}


def trl_kwargs(cfg: TrainConfig, output_dir: Path, seed: int) -> dict[str, Any]:
    """Arguments for trl's `SFTConfig`/`DPOConfig`: CPU-safe, no reporting, resumable if asked.

    Checkpointing is set by its current name (`activation_checkpointing`): trl defaults the
    deprecated `gradient_checkpointing` to True, and only an explicit new name overrides it quietly.
    """
    import torch

    return {
        "output_dir": str(output_dir),
        "use_cpu": not torch.cuda.is_available(),
        **_precision(cfg),
        "activation_checkpointing": cfg.gradient_checkpointing,
        "report_to": report_to(cfg.report_to),
        "dataloader_num_workers": 0,
        "remove_unused_columns": False,
        "learning_rate": cfg.learning_rate,
        "max_steps": cfg.max_steps,
        "num_train_epochs": cfg.num_train_epochs,
        "per_device_train_batch_size": cfg.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "lr_scheduler_type": cfg.lr_scheduler_type,
        "warmup_steps": float(cfg.warmup_ratio) if 0 < cfg.warmup_ratio < 1 else 0,
        "weight_decay": cfg.weight_decay,
        "max_grad_norm": cfg.max_grad_norm,
        "max_length": cfg.max_length or None,
        "logging_steps": cfg.logging_steps,
        "save_strategy": "steps" if cfg.save_steps > 0 else "no",
        "save_steps": cfg.save_steps if cfg.save_steps > 0 else 500,
        "save_total_limit": 1,
        "seed": seed,
        "data_seed": seed,
        "disable_tqdm": True,
    }


def report_to(value: str) -> list[str] | str:
    """`TrainConfig.report_to` for transformers: "none"/"" = no tracker, "all", or a list of names."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names or names == ["none"]:
        return []
    return "all" if names == ["all"] else names


def resume_checkpoint(output_dir: Path) -> str | None:
    """The newest trl `checkpoint-N` folder in `output_dir` (a killed run resumes from it)."""
    if not output_dir.is_dir():
        return None
    ckpts = sorted(
        (p for p in output_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    return str(ckpts[-1]) if ckpts else None


def drop_trl_checkpoints(output_dir: Path) -> None:
    import shutil

    for p in output_dir.glob("checkpoint-*"):
        shutil.rmtree(p, ignore_errors=True)
    for d in (output_dir, output_dir.parent):
        if d.is_dir() and d.name in ("_trl", "stage1", "dpo") and not any(d.iterdir()):
            d.rmdir()


def run_trainer(trainer: Any, output_dir: Path) -> Any:
    """`trainer.train()`, resuming from the newest trl checkpoint in `output_dir` if one exists."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # TrainingProgress logs instead (no raw dict prints)
    resume = resume_checkpoint(output_dir)
    if resume:
        log.info("resuming from %s", resume)
    t0 = time.perf_counter()
    with frozen_heap(trainer.args.device.type == "cpu"), vocabulary_wide_tiles(trainer.model):
        result = trainer.train(resume_from_checkpoint=resume)
    log.info("trained %d steps in %.1f s", trainer.state.global_step, time.perf_counter() - t0)
    return result


@contextlib.contextmanager
def frozen_heap(enabled: bool = True) -> Iterator[None]:
    """What is alive now (modules, samples, the model) is left out of garbage collection meanwhile.

    transformers starts `train()` with accelerate's `free_memory()`, a full `gc.collect()`: on a
    process that imported torch, transformers and trl that walk alone is 0.15-0.4 s of CPU (the
    larger the heap, the longer: pytest's is large), several steps of the tiny model. Frozen
    (`gc.freeze`), those objects are skipped by it and by any collection during training; what
    training makes is collected as usual, and `gc.unfreeze` hands the rest back afterwards. Only on
    CPU: that collection is what lets CUDA memory held by dead cycles go before training starts.
    """
    if not enabled:
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


# trl's fused LM head (`trl.trainer.utils.add_fused_lm_head`, used by SFTTrainer and DPOTrainer)
# reads the width of its vocabulary tiles from this module constant at every forward.
_TRL_TILE_WIDTH = ("trl.trainer.utils", "_CHUNKED_LOGPROB_CHUNK_SIZE")


@contextlib.contextmanager
def vocabulary_wide_tiles(model: Any) -> Iterator[None]:
    """trl's LM-head tiles no wider than the model's vocabulary while it trains (the same numbers).

    trl computes the per-token log-probabilities (and the entropy and token accuracy it logs) tile by
    tile, each tile a `[tokens, 32768]` buffer of which the first `vocab` columns are used. With the
    tiny model's 136-token vocabulary that is a 99.6%-empty buffer: a fresh 150 MB allocation per
    forward and per backward, one page touched per row, and matrix products written 128 KB apart,
    4x the cost of the plain LM head; a quarter of the gap between `medvqa train` and a raw PyTorch
    loop (tests/perf/test_training_perf.py). A vocabulary under the default width is one tile either
    way, so a tile exactly as wide computes the same bits (tests/test_process_cost.py); a larger
    vocabulary keeps trl's width. Without the constant (another trl) nothing changes.
    """
    import importlib

    module_name, name = _TRL_TILE_WIDTH
    module = importlib.import_module(module_name)
    default = getattr(module, name, None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    vocab = int(head.weight.shape[0]) if head is not None else 0
    if not isinstance(default, int) or not 0 < vocab < default:
        yield
        return
    setattr(module, name, vocab)
    try:
        yield
    finally:
        setattr(module, name, default)


def _progress_callback_class() -> type:
    from transformers import TrainerCallback

    class TrainingProgress(TrainerCallback):
        """Appends every trl log record (loss, lr, rewards, ...) to a JSONL file and the logger."""

        def __init__(self, path: Path, stage: str):
            self.path = Path(path)
            self.stage = stage
            self.t0 = time.perf_counter()

        def on_log(
            self, args: Any, state: Any, control: Any, logs: Mapping[str, Any] | None = None, **kw: Any
        ):
            if not state.is_world_process_zero or not logs:
                return
            row = {
                "stage": self.stage,
                "step": state.global_step,
                "max_steps": state.max_steps,
                "elapsed_s": round(time.perf_counter() - self.t0, 2),
                **{k: (float(v) if isinstance(v, int | float) else v) for k, v in logs.items()},
            }
            with JsonlAppender(self.path) as out:
                out.write([row])
            shown = {k: round(v, 4) for k, v in logs.items() if isinstance(v, float)}
            log.info("[%s] step %d/%d %s", self.stage, state.global_step, state.max_steps, shown)

    return TrainingProgress


def progress_callback(path: Path, stage: str) -> Any:
    return _progress_callback_class()(path, stage)


VISION_PARTS = ("vision_tower", "multi_modal_projector", "mm_projector")


def is_vision_param(name: str) -> bool:
    """A parameter of the vision tower or the projector (by its name in `named_parameters()`)."""
    return any(part in name for part in VISION_PARTS)


def scale_vision_lr(trainer: Any, scale: float) -> None:
    """Give the vision tower's and projector's parameters `scale` x the learning rate.

    The trainer's own optimizer (class, betas, weight-decay groups) is created now and each of its
    groups split in two (vision, the rest); the scheduler, created at `train()`, scales both alike.
    """
    opt = trainer.create_optimizer()
    vision = {id(p) for n, p in trainer.model.named_parameters() if is_vision_param(n)}
    groups = []
    for group in opt.param_groups:
        settings = {k: v for k, v in group.items() if k != "params"}
        for mine, mult in ((lambda p: id(p) in vision, scale), (lambda p: id(p) not in vision, 1.0)):
            params = [p for p in group["params"] if mine(p)]
            if params:
                groups.append({**settings, "params": params, "lr": settings["lr"] * mult})
    opt.param_groups.clear()  # no step taken yet: no state to move
    for group in groups:
        opt.add_param_group(group)


def step_budget(cfg: TrainConfig, n_rows: int) -> int:
    """`cfg.max_steps`, capped at `cfg.max_epochs` epochs over `n_rows` rows (-1 stays -1: epochs decide).

    One config then trains every fraction sensibly: e.g. 2,500 steps capped at 25 epochs is 563
    steps on 720 rows (batch 32) and the full 2,500 on 8,000.
    """
    if cfg.max_epochs <= 0 or cfg.max_steps == -1:
        return cfg.max_steps
    from medvqa.distributed import world_size

    per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world_size()
    return max(1, min(cfg.max_steps, math.ceil(cfg.max_epochs * n_rows / per_step)))


def sft_trainer(
    model: Any,
    processor: Any,
    rows: Sequence[Mapping[str, Any]],
    cfg: TrainConfig,
    *,
    work_dir: Path,
    log_path: Path,
    seed: int,
    stage: str,
) -> Any:
    """trl's `SFTTrainer` on prompt/completion rows, ready to train (rows encoded once unless
    `cfg.preprocess` says otherwise; loss on the completion only)."""
    from trl import SFTConfig, SFTTrainer

    seed_everything(seed)
    budget = dataclasses.replace(cfg, max_steps=step_budget(cfg, len(rows)))
    args = SFTConfig(**trl_kwargs(budget, work_dir, seed), completion_only_loss=True)
    dataset, collator = sft_data(
        rows, model, processor, mode=cfg.preprocess, max_length=cfg.max_length or None
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=dataset,
        processing_class=processor,
        peft_config=lora_config(cfg) if cfg.use_lora else None,
        callbacks=[progress_callback(log_path, stage)],
    )
    if cfg.vision_lr_scale != 1.0:
        scale_vision_lr(trainer, cfg.vision_lr_scale)
    return trainer


def fit_sft(
    model: Any,
    processor: Any,
    rows: Sequence[Mapping[str, Any]],
    cfg: TrainConfig,
    *,
    work_dir: Path,
    log_path: Path,
    seed: int,
    stage: str,
    merge_lora: bool = True,
) -> Any:
    """Train `model` with trl's `SFTTrainer` on prompt/completion rows (loss on the completion only).

    Returns the trained model; with LoRA, the PEFT model (saved as an adapter) unless `merge_lora`
    (then merged, e.g. to serve as the next stage's base). trl checkpoints go to `work_dir` (resumable).
    """
    trainer = sft_trainer(
        model, processor, rows, cfg, work_dir=work_dir, log_path=log_path, seed=seed, stage=stage
    )
    run_trainer(trainer, work_dir)
    model = trainer.model
    if cfg.use_lora and merge_lora:
        model = model.merge_and_unload()
    return model
