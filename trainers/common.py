"""What the trainers share: base config, model loading, training rows, trl configs, checkpoints.

- `TrainConfig`: the optimisation knobs every trainer has (trl style: one typed, defaulted,
  documented field each); each trainer's own config dataclass extends it, and the CLI flags and
  sweep TOML keys are derived from that one class (`harness.config`).
- `load_model_and_processor(spec)`: the base model as a trainable transformers model (+ processor).
- `qa_rows` / `render_prompt_text`: prompt/completion rows built with the prompt policy of
  `harness.prompts` and the model's own chat template, exactly what `hf:` evaluation shows the
  model, so the training format is the evaluation format.
- `trl_kwargs`: CPU-safe trl `SFTConfig`/`DPOConfig` arguments (bf16 and gradient checkpointing off
  on CPU, no reporting, no worker processes), from a `TrainConfig`.
- `write_checkpoint`: the `checkpoint.json` contract, written atomically.
- `TrainingProgress`: a trainer callback that appends each log record to `train_log.jsonl`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from medvqa.errors import BadInput
from medvqa.io import JsonlAppender, atomic_write_json, library_versions
from medvqa.types import Prompt, VQASample

log = logging.getLogger("medvqa.train")

CHECKPOINT_FILE = "checkpoint.json"
CLOSED_STARTS = frozenset(
    [
        "is",
        "are",
        "was",
        "were",
        "does",
        "do",
        "did",
        "can",
        "could",
        "has",
        "have",
        "had",
        "will",
        "would",
        "should",
        "shall",
        "may",
        "might",
    ]
)


@dataclass
class TrainConfig:
    """Optimisation knobs shared by every trainer (the trl/transformers names, where there is one)."""

    learning_rate: float = field(default=2e-5, metadata={"help": "peak learning rate"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps; -1 = use num_train_epochs"})
    num_train_epochs: float = field(
        default=1.0, metadata={"help": "epochs over the data (if max_steps = -1)"}
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
    use_lora: bool = field(
        default=False, metadata={"help": "train a LoRA adapter (peft) instead of all weights"}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_target_modules: str = field(
        default="all-linear", metadata={"help": "peft target_modules: 'all-linear' or comma-separated names"}
    )


def config_with_preset(cls: type, presets: Mapping[str, Mapping[str, Any]], preset: str | None) -> Any:
    """`cls()` with the named preset's overrides (None/'' = the dataclass defaults)."""
    if not preset:
        return cls()
    if preset not in presets:
        raise BadInput(f"unknown preset {preset!r} for {cls.__name__}; known: {', '.join(sorted(presets))}")
    return dataclasses.replace(cls(), **dict(presets[preset]))


# --- seeding, threads ------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch
    from transformers import set_seed

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    set_seed(seed)


# --- models ----------------------------------------------------------------------------------


def spec_path(spec: str) -> str:
    """The folder (or hub id) of an `hf:` model spec (`hf:DIR[,adapter=DIR,...]`; a bare path works too)."""
    return _parse_spec(spec)[0]


def _parse_spec(spec: str) -> tuple[str, str | None]:
    from medvqa.models import parse_model_spec

    adapter_name, target, options = parse_model_spec(spec)
    if adapter_name != "hf":
        raise BadInput(
            f"trainers need an hf: model spec (a transformers checkpoint), got {spec!r}", field="--model"
        )
    return target, options.get("adapter")


def _abs(path: str) -> str:
    """Local folders as absolute paths (a saved adapter's base path then works from anywhere)."""
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else path


def load_model_and_processor(spec: str, *, merge_adapter: bool = True) -> tuple[Any, Any]:
    """A trainable (float32 on CPU) image-text-to-text model and its processor.

    A PEFT adapter (an adapter folder, or `hf:BASE,adapter=DIR`) is loaded on its base and
    merged, so that training continues from the adapted weights (the reference for DPO is then
    exactly this model).
    """
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    target, adapter = _parse_spec(spec)
    path = _abs(target)
    dtype = torch.float32
    if adapter is None and Path(path, "adapter_config.json").is_file():
        adapter_cfg = json.loads(Path(path, "adapter_config.json").read_text(encoding="utf-8"))
        base = adapter_cfg.get("base_model_name_or_path")
        if not base:
            raise BadInput("adapter_config.json has no base_model_name_or_path", path=path)
        path, adapter = _abs(base), path
    if Path(path).exists() and not Path(path, "config.json").is_file():
        raise BadInput("not a transformers checkpoint folder (no config.json)", path=path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
    processor = AutoProcessor.from_pretrained(path)
    if adapter is not None:
        from peft import PeftModel

        adapter = _abs(adapter)
        model = PeftModel.from_pretrained(model, adapter)
        if merge_adapter:
            model = model.merge_and_unload()
        if Path(adapter, "processor_config.json").is_file():
            processor = AutoProcessor.from_pretrained(adapter)
    return model, processor


def lora_config(cfg: TrainConfig) -> Any:
    from peft import LoraConfig

    targets: Any = cfg.lora_target_modules
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )


# --- prompts and rows ------------------------------------------------------------------------


def guess_answer_type(question: str) -> str:
    """CLOSED for a yes/no-shaped question (starts with an auxiliary verb), else OPEN.

    Used only for self-generated questions, which have no dataset metadata.
    """
    words = question.strip().lower().split()
    return "CLOSED" if words and words[0] in CLOSED_STARTS else "OPEN"


def render_prompt_text(processor: Any, prompt: Prompt) -> str:
    """The exact model input text for a prompt, as `hf:` evaluation builds it.

    Chat messages go through the model's chat template (which writes its own BOS); raw text is
    used verbatim, and since evaluation lets the tokenizer add its BOS there while trl's collators
    never add special tokens, the BOS is written into the text here.
    """
    from medvqa.models.hf import render_prompt_text as eval_render

    text = eval_render(processor, prompt)
    if prompt.text is not None:
        tok = getattr(processor, "tokenizer", processor)
        bos = tok.bos_token
        ids = tok("x", add_special_tokens=True)["input_ids"]
        if bos and ids and ids[0] == tok.bos_token_id and not text.startswith(bos):
            text = bos + text
    return text


def completion_text(processor: Any, prompt: Prompt, prompt_text: str, answer: str) -> str:
    """What follows `prompt_text` when the model says `answer` and stops (ends with the EOS token)."""
    tok = getattr(processor, "tokenizer", processor)
    eos = tok.eos_token or ""
    if prompt.text is None:
        messages = [*prompt.messages, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        full = processor.apply_chat_template(messages, tokenize=False)
        if full.startswith(prompt_text):
            out = full[len(prompt_text) :]
            return out if not eos or eos in out else out + eos
    return f" {answer.strip()}{eos}"


def image_ref(image: str | bytes) -> Any:
    """A value for a `datasets.Image()` column: decoded lazily, per batch."""
    if isinstance(image, bytes):
        return {"bytes": image, "path": None}
    return str(image)


def load_pil(image: str | bytes) -> Any:
    from PIL import Image

    with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as im:
        return im.convert("RGB")


class RowBuilder:
    """Builds training rows in the evaluation format (prompt policy + the model's chat template)."""

    def __init__(self, processor: Any, policy_name: str):
        from medvqa.prompts import get_policy

        self.processor = processor
        self.policy = get_policy(policy_name or None)

    def prompt(self, question: str, answer_type: str) -> tuple[Prompt, str]:
        prompt = self.policy.render(question, answer_type)
        return prompt, render_prompt_text(self.processor, prompt)

    def raw_prompt(self, text: str) -> tuple[Prompt, str]:
        """A prompt that bypasses the policy's instruction (captions, the ask-instruction)."""
        prompt = Prompt(
            messages=({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]},),
            policy="raw-instruction",
        )
        if self.policy.style == "raw":
            prompt = Prompt(
                text=self.policy.template.replace("{suffix}", "").format(question=text, instruction="")
            )
        return prompt, render_prompt_text(self.processor, prompt)

    def qa_row(self, image: str | bytes, question: str, answer_type: str, answer: str, **extra: Any) -> dict:
        prompt, text = self.prompt(question, answer_type)
        return {
            "images": [image_ref(image)],
            "prompt": text,
            "completion": completion_text(self.processor, prompt, text, answer),
            **extra,
        }

    def instruction_row(self, image: str | bytes, instruction: str, target: str, **extra: Any) -> dict:
        prompt, text = self.raw_prompt(instruction)
        return {
            "images": [image_ref(image)],
            "prompt": text,
            "completion": completion_text(self.processor, prompt, text, target),
            **extra,
        }

    def pair_row(
        self, image: str | bytes, question: str, answer_type: str, chosen: str, rejected: str
    ) -> dict:
        prompt, text = self.prompt(question, answer_type)
        return {
            "images": [image_ref(image)],
            "prompt": text,
            "chosen": completion_text(self.processor, prompt, text, chosen),
            "rejected": completion_text(self.processor, prompt, text, rejected),
        }


def qa_rows(samples: Sequence[VQASample], builder: RowBuilder) -> list[dict]:
    return [builder.qa_row(s.image, s.question, s.prompt_answer_type, s.answer, kind="qa") for s in samples]


def to_dataset(rows: Sequence[Mapping[str, Any]]) -> Any:
    """A `datasets.Dataset` whose `images` column decodes lazily (paths or bytes, never all pixels)."""
    from datasets import Dataset, Image, List

    if not rows:
        raise BadInput("no training rows (empty training set)")
    keys = list(rows[0])
    ds = Dataset.from_dict({k: [r[k] for r in rows] for k in keys})
    return ds.cast_column("images", List(Image()))


# --- trl configs -----------------------------------------------------------------------------


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
    """Arguments for trl's `SFTConfig`/`DPOConfig`: CPU-safe, no reporting, resumable if asked."""
    import warnings

    import torch

    # trl defaults gradient_checkpointing=True; turning it off by its (deprecated) name warns.
    warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.*deprecated", category=FutureWarning)

    return {
        "output_dir": str(output_dir),
        "use_cpu": not torch.cuda.is_available(),
        **_precision(cfg),
        "gradient_checkpointing": False,
        "report_to": [],
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
    result = trainer.train(resume_from_checkpoint=resume)
    log.info("trained %d steps in %.1f s", trainer.state.global_step, time.perf_counter() - t0)
    return result


# --- logging callback ------------------------------------------------------------------------


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


# --- checkpoints -----------------------------------------------------------------------------


def policy_name(name: str) -> str:
    from medvqa.prompts import get_policy

    return get_policy(name or None).name


def save_model(model: Any, processor: Any, out_dir: Path) -> None:
    """`save_pretrained` of the model (or PEFT adapter) and its processor (main process only)."""
    if not is_main_process():
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def checkpoint_meta(
    *,
    trainer: str,
    request: Any,
    config: Any,
    n_labeled: int,
    n_pairs: int = 0,
    loss: str,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "trainer": trainer,
        "fraction": request.fraction,
        "seed": request.seed,
        "manifest_hash": request.manifest_hash,
        "n_labeled": n_labeled,
        "n_pairs": n_pairs,
        "base_model": request.base_model,
        "config": dataclasses.asdict(config),
        "versions": library_versions(),
        "loss": loss,
        **extra,
    }


def write_checkpoint(out_dir: Path, meta: Mapping[str, Any]) -> Path:
    """Write `checkpoint.json` atomically (its presence marks a finished checkpoint; main process only)."""
    path = Path(out_dir) / CHECKPOINT_FILE
    if not is_main_process():
        return path
    atomic_write_json(path, dict(meta))
    return path


def read_checkpoint(out_dir: Path) -> dict[str, Any] | None:
    path = Path(out_dir) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    from medvqa.io import read_json

    return read_json(path)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def wait_for_everyone() -> None:
    try:
        from accelerate import PartialState

        PartialState().wait_for_everyone()
    except Exception:
        pass


def counts_line(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in counts.items())


def dedupe(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


# --- one trl SFT run -------------------------------------------------------------------------


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
    from trl import SFTConfig, SFTTrainer

    seed_everything(seed)
    args = SFTConfig(**trl_kwargs(cfg, work_dir, seed), completion_only_loss=True)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=to_dataset(rows),
        processing_class=processor,
        peft_config=lora_config(cfg) if cfg.use_lora else None,
        callbacks=[progress_callback(log_path, stage)],
    )
    run_trainer(trainer, work_dir)
    model = trainer.model
    if cfg.use_lora and merge_lora:
        model = model.merge_and_unload()
    return model


# --- the trainer plug-in base ----------------------------------------------------------------


class TrainerPlugin:
    """Base of the registered trainers: `train(TrainRequest) -> Checkpoint`.

    Subclasses set `name`, `config_class` (one dataclass; flags and TOML keys derive from it) and
    `presets` (named overrides of that dataclass, e.g. "phantom").
    """

    name: str = ""
    config_class: type = TrainConfig
    presets: Mapping[str, Mapping[str, Any]] = {}

    @classmethod
    def make_config(cls, preset: str | None = None) -> Any:
        return config_with_preset(cls.config_class, cls.presets, preset)

    def _config(self, request: Any) -> Any:
        cfg = request.config if request.config is not None else self.config_class()
        if not isinstance(cfg, self.config_class):
            raise BadInput(
                f"trainer {self.name!r} needs a {self.config_class.__name__}, got {type(cfg).__name__}"
            )
        return cfg

    def train(self, request: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _train_supervised(
        self,
        request: Any,
        cfg: Any,
        make_rows: Callable[[RowBuilder], list[dict[str, Any]]],
        *,
        loss: str,
        n_labeled: int,
        **meta: Any,
    ) -> Any:
        """One SFT stage from the request's base model to a finished checkpoint folder.

        `make_rows(builder)` turns the request's samples into prompt/completion rows; `loss`,
        `n_labeled` and `meta` go into `checkpoint.json` (written last: its presence = finished).
        """
        from medvqa.types import Checkpoint

        out = Path(request.out_dir)
        seed_everything(request.seed)
        model, processor = load_model_and_processor(request.base_model)
        builder = RowBuilder(processor, cfg.prompt_policy)
        rows = make_rows(builder)
        model = fit_sft(
            model,
            processor,
            rows,
            cfg,
            work_dir=out / "_trl",
            log_path=out / "train_log.jsonl",
            seed=request.seed,
            stage=self.name,
            merge_lora=False,
        )
        save_model(model, processor, out)
        drop_trl_checkpoints(out / "_trl")
        checkpoint = checkpoint_meta(
            trainer=self.name,
            request=request,
            config=cfg,
            n_labeled=n_labeled,
            loss=loss,
            prompt_policy=builder.policy.name,
            adapter=cfg.use_lora,
            **meta,
        )
        write_checkpoint(out, checkpoint)
        return Checkpoint(path=out, meta=checkpoint)
