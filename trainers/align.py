"""`align`: image → caption training, the LLaVA stage-1 ("feature alignment") analog.

Gives a randomly initialised tiny model the general image-text grounding that a real LLaVA base
already has, before any VQA: the prompt is a describe-instruction about the image (no answer-style
instruction), the completion is the caption. Projector and language model (and the vision tower)
are all trained; trl `SFTTrainer`, loss on the caption only.

The training samples are caption records as `VQASample`s (question = the instruction, answer =
the caption); `medvqa train --trainer align` builds them from the benchmark's captions (Phantom
ships `captions.jsonl`) or from `--captions FILE.jsonl` (`{"image", "caption"}` per line).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.registry import trainers
from harness.types import Checkpoint, TrainRequest
from trainers.common import TrainConfig, TrainerPlugin

CAPTION_INSTRUCTION = "Describe this image."


@dataclass
class AlignConfig(TrainConfig):
    """Caption-alignment knobs. Defaults: LLaVA stage-1 style (lr 1e-3, 1 epoch, cosine)."""

    learning_rate: float = 1e-3
    warmup_ratio: float = 0.03
    instruction: str = field(
        default="", metadata={"help": "the describe-instruction; empty = the samples' own question text"}
    )


ALIGN_PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "phantom": {"learning_rate": 1e-3, "max_steps": 600, "warmup_ratio": 0.0, "logging_steps": 100},
}


@trainers.register("align")
class AlignTrainer(TrainerPlugin):
    """Image → caption alignment training (LLaVA stage-1 analog; captions from the benchmark)."""

    name = "align"
    config_class = AlignConfig
    presets = ALIGN_PRESETS

    def train(self, request: TrainRequest) -> Checkpoint:
        from trainers import common

        cfg = self._config(request)
        out = Path(request.out_dir)
        common.seed_everything(request.seed)
        model, processor = common.load_model_and_processor(request.base_model)
        builder = common.RowBuilder(processor, cfg.prompt_policy)
        rows = [
            builder.instruction_row(s.image, cfg.instruction or s.question, s.answer, kind="caption")
            for s in request.train_samples
        ]
        model = common.fit_sft(
            model,
            processor,
            rows,
            cfg,
            work_dir=out / "_trl",
            log_path=out / "train_log.jsonl",
            seed=request.seed,
            stage="align",
            merge_lora=False,
        )
        common.save_model(model, processor, out)
        common.drop_trl_checkpoints(out / "_trl")
        meta = common.checkpoint_meta(
            trainer=self.name,
            request=request,
            config=cfg,
            n_labeled=0,
            loss="nll (caption only)",
            n_captions=len(rows),
            prompt_policy=builder.policy.name,
            adapter=cfg.use_lora,
        )
        common.write_checkpoint(out, meta)
        return Checkpoint(path=out, meta=meta)
