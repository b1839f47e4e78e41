"""`TrainConfig`: the optimisation knobs every trainer shares, and named presets of a config class.

trl style: one typed, defaulted, documented field each; each trainer's own config dataclass
extends it, and the CLI flags and sweep TOML keys are derived from that one class (`medvqa.config`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from medvqa.errors import BadInput


@dataclass
class TrainConfig:
    """Optimisation knobs shared by every trainer (the trl/transformers names, where there is one)."""

    learning_rate: float = field(default=2e-5, metadata={"help": "peak learning rate"})
    vision_lr_scale: float = field(
        default=1.0,
        metadata={
            "help": "learning rate of the vision tower and projector as a multiple of learning_rate "
            "(LLaVA-style recipes train them slower; STLLaVA-Med's stage 1: ViT 5e-5 vs LLM 2e-4 = 0.25)"
        },
    )
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps; -1 = use num_train_epochs"})
    num_train_epochs: float = field(
        default=1.0, metadata={"help": "epochs over the data (if max_steps = -1)"}
    )
    max_epochs: float = field(
        default=0.0,
        metadata={
            "help": "cap max_steps at this many epochs over the training rows (small fractions stop "
            "sooner at the same config); 0 = no cap"
        },
    )
    per_device_train_batch_size: int = field(default=32, metadata={"help": "batch size per device"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "transformers scheduler name"})
    warmup_ratio: float = field(default=0.0, metadata={"help": "fraction of steps spent warming up"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm"})
    max_length: int = field(default=0, metadata={"help": "truncate sequences to this many tokens; 0 = never"})
    logging_steps: int = field(
        default=50, metadata={"help": "log (and append to train_log.jsonl) every N steps"}
    )
    save_steps: int = field(
        default=0,
        metadata={"help": "write a resumable trl checkpoint every N steps (0 = none; a killed run restarts)"},
    )
    prompt_policy: str = field(
        default="",
        metadata={"help": "prompt policy for training rows; empty = the benchmark's (evaluation's)"},
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = field(
        default="auto", metadata={"help": "auto = bf16 on a GPU that has it, else fp32 (CPU always fp32)"}
    )
    preprocess: Literal["auto", "once", "per_batch"] = field(
        default="auto",
        metadata={
            "help": "once = tokenize rows and process each image once before training; per_batch = trl's "
            "collators every step; auto = once when the pixels fit in 2 GiB and the processor is LLaVA-style"
        },
    )
    report_to: str = field(
        default="none",
        metadata={
            "help": "transformers trackers, comma-separated: tensorboard, wandb, mlflow, trackio, all, none"
        },
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute activations in backward (less GPU memory, ~20% slower)"}
    )
    attn_implementation: str = field(
        default="",
        metadata={
            "help": "transformers attention kernel (eager, sdpa, flash_attention_2); empty = the model's"
        },
    )
    use_lora: bool = field(
        default=False, metadata={"help": "train a LoRA adapter (peft) instead of all weights"}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_target_modules: str = field(
        default="all-linear", metadata={"help": "peft target_modules: 'all-linear' or comma-separated names"}
    )

    def __post_init__(self) -> None:
        """Ranges, checked when the config is built: `medvqa train` and a sweep's load both refuse a
        bad value before any model is loaded (subclasses with checks of their own call this too)."""
        checks = [
            ("learning_rate", self.learning_rate >= 0, ">= 0"),
            ("vision_lr_scale", self.vision_lr_scale >= 0, ">= 0"),
            ("max_steps", self.max_steps == -1 or self.max_steps >= 1, "-1 or >= 1"),
            ("num_train_epochs", self.num_train_epochs > 0, "> 0"),
            ("max_epochs", self.max_epochs >= 0, ">= 0"),
            ("per_device_train_batch_size", self.per_device_train_batch_size >= 1, ">= 1"),
            ("gradient_accumulation_steps", self.gradient_accumulation_steps >= 1, ">= 1"),
            ("warmup_ratio", 0 <= self.warmup_ratio <= 1, "in [0, 1]"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("max_grad_norm", self.max_grad_norm >= 0, ">= 0"),
            ("max_length", self.max_length >= 0, ">= 0"),
            ("logging_steps", self.logging_steps >= 1, ">= 1"),
            ("save_steps", self.save_steps >= 0, ">= 0"),
            ("lora_r", self.lora_r >= 1, ">= 1"),
            ("lora_dropout", 0 <= self.lora_dropout < 1, "in [0, 1)"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise BadInput(f"{type(self).__name__}: {name!r} must be {rule}, got {getattr(self, name)!r}")


def config_with_preset(cls: type, presets: Mapping[str, Mapping[str, Any]], preset: str | None) -> Any:
    """`cls()` with the named preset's overrides (None/'' = the dataclass defaults)."""
    if not preset:
        return cls()
    if preset not in presets:
        raise BadInput(f"unknown preset {preset!r} for {cls.__name__}; known: {', '.join(sorted(presets))}")
    return dataclasses.replace(cls(), **dict(presets[preset]))


def resolve_trainer_config(
    trainer_cls: type,
    *,
    preset: str = "",
    config_file: str | Path = "",
    settings: Mapping[str, Any] | None = None,
) -> Any:
    """A trainer's config the way every entry point builds it: the trainer's defaults → `preset` →
    the TOML file's `[trainer]` table (or its top level) → `settings` (e.g. flags), checked against
    the trainer's config dataclass. Used by `medvqa train`, `medvqa stllava` and the sweep's checks."""
    from medvqa.config import dataclass_from_mapping
    from medvqa.io import read_toml

    cfg_cls = trainer_cls.config_class
    name = getattr(trainer_cls, "name", "") or trainer_cls.__name__
    presets = getattr(trainer_cls, "presets", {}) or {}
    if preset and preset not in presets:
        raise BadInput(
            f"trainer {name!r} has no preset {preset!r}; known: {', '.join(sorted(presets)) or '(none)'}"
        )
    values = dataclasses.asdict(dataclasses.replace(cfg_cls(), **dict(presets.get(preset, {}))))
    if config_file:
        path = Path(config_file)
        table = read_toml(path, what="config file")
        table = table.get("trainer", table)
        # keys and types, over the values so far: a check across fields sees the preset's, not the defaults
        dataclass_from_mapping(cfg_cls, {**values, **table}, where=str(path))
        values.update(table)
    known = {f.name for f in dataclasses.fields(cfg_cls)}
    for key, value in (settings or {}).items():
        if key not in known:
            raise BadInput(
                f"--{key.replace('_', '-')} is not a setting of trainer {name!r} "
                f"({cfg_cls.__name__}); see medvqa train --trainer {name} --show-config"
            )
        values[key] = value
    return cfg_cls(**values)
