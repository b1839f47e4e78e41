"""`sft`: supervised fine-tuning on the labeled QA fraction (the baseline).

trl `SFTTrainer` on prompt/completion rows: the prompt is what evaluation shows the model (the
prompt policy rendered with the model's chat template, image included), the completion is the
gold answer + EOS, and the loss covers the completion only (the `messages` format would also
train on the prompt and the image placeholder tokens). Full fine-tuning by default (right for the
tiny model); `--use-lora` trains a peft LoRA adapter instead and saves the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from medvqa.registry import trainers
from medvqa.trainers.base import TrainerPlugin
from medvqa.trainers.config import TrainConfig
from medvqa.types import Checkpoint, TrainRequest


@dataclass
class SFTTrainConfig(TrainConfig):
    """SFT knobs. Defaults: LLaVA-style fine-tuning (lr 2e-5, 3 epochs, cosine, batch 32)."""

    num_train_epochs: float = 3.0
    warmup_ratio: float = 0.03


SFT_PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # What trained the tiny 32 px model on Phantom in ~2 minutes on 2 CPU cores (PHANTOM-NOTES):
    # closed accuracy rises sharply only after ~3,000 steps at batch 32, lr 1e-3, cosine.
    "phantom": {
        "learning_rate": 1e-3,
        "max_steps": 3000,
        "per_device_train_batch_size": 32,
        "warmup_ratio": 0.0,
        "logging_steps": 100,
    },
}


@trainers.register("sft")
class SFTTrainerPlugin(TrainerPlugin):
    """Supervised fine-tuning on the labeled QA fraction (trl SFTTrainer, loss on the answer only)."""

    name = "sft"
    config_class = SFTTrainConfig
    presets = SFT_PRESETS

    def train(self, request: TrainRequest) -> Checkpoint:
        from medvqa.trainers.rows import qa_rows

        return self._train_supervised(
            request,
            self._config(request),
            lambda builder: qa_rows(request.train_samples, builder),
            loss="nll (completion only)",
            n_labeled=len(request.train_samples),
        )
