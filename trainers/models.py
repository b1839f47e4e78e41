"""The base model as a trainable transformers model (+ processor), and the LoRA config.

A trainer's `--model` is an `hf:` model spec (the one evaluation loads); a PEFT adapter is
loaded on its base and merged, so that training continues from the adapted weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medvqa.errors import BadInput
from medvqa.trainers.config import TrainConfig


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


def load_model_and_processor(
    spec: str, *, merge_adapter: bool = True, attn_implementation: str = ""
) -> tuple[Any, Any]:
    """A trainable (float32 on CPU) image-text-to-text model and its processor.

    A PEFT adapter (an adapter folder, or `hf:BASE,adapter=DIR`) is loaded on its base and
    merged, so that training continues from the adapted weights (the reference for DPO is then
    exactly this model). `attn_implementation` ("" = the model's own) picks transformers' kernel.
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
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, **kwargs)
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
