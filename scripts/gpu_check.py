#!/usr/bin/env python
"""GPU check (issue 14): bf16 SFT steps and batched eval of a random-init LLaVA through `medvqa`,
each beside a raw PyTorch loop on the same model, inputs and batch size, in the same run.

    python scripts/gpu_check.py --out /tmp/gpu-check              # ~1B LLaVA on CUDA, <= 5 min on an H200
    python scripts/gpu_check.py --size tiny --device cpu --out X  # the same code path in seconds (tests)

What runs (all offline): `medvqa data phantom` → `init_tiny` at the chosen size (CLIP tower + Llama
LM, random init) → `medvqa train --trainer sft` (trl's SFTTrainer, bf16 on CUDA, `--max-steps`)
vs a raw loop (forward + backward + AdamW under bf16 autocast, fp32 master weights, as trl does)
→ batched greedy generation through the `hf:` adapter (what `medvqa eval` calls per batch) vs raw
`model.generate` on the processor's batch, and one `medvqa eval` end to end. Prints one JSON
object: steps/s, generated tokens/s, the medvqa/raw ratios, parameter count, peak GPU memory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

# ~0.98B parameters: Llama LM 2048 x 22 layers (MLP 4096), CLIP tower 768 x 12 at 224 px / 16 px patches.
SIZES: dict[str, dict[str, Any]] = {
    "1b": {
        "image_size": 224,
        "patch": 16,
        "hidden": 2048,
        "layers": 22,
        "heads": 16,
        "vision_hidden": 768,
        "vision_layers": 12,
        "vision_heads": 12,
        "max_positions": 1024,
    },
    "tiny": {
        "image_size": 32,
        "patch": 8,
        "hidden": 64,
        "layers": 2,
        "heads": 2,
        "vision_hidden": 32,
        "vision_layers": 1,
        "vision_heads": 2,
    },
}


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _free(device: str) -> None:
    """Release the previous phase's model and optimizer before the next one loads its own."""
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _medvqa(argv: list[str]) -> None:
    from medvqa.cli import main

    code = main(argv)
    if code != 0:
        raise SystemExit(f"medvqa {' '.join(argv[:2])} failed with exit code {code}")


def _steps_per_s(train_log: Path, skip: int) -> float:
    """Optimizer steps per second from trl's per-step log rows, after `skip` warm-up steps."""
    rows = [json.loads(line) for line in train_log.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r and "elapsed_s" in r]
    first = next(r for r in rows if r["step"] > skip)
    last = rows[-1]
    return (last["step"] - first["step"]) / max(last["elapsed_s"] - first["elapsed_s"], 1e-9)


def _sft_rows(samples: list[Any], processor: Any, n: int) -> list[dict[str, Any]]:
    from medvqa.trainers.rows import RowBuilder

    builder = RowBuilder(processor, "")
    return [builder.qa_row(s.image, s.question, s.prompt_answer_type, s.answer) for s in samples[:n]]


def raw_sft_steps_per_s(
    model_dir: Path, samples: list[Any], *, device: str, batch: int, steps: int, warmup: int
) -> float:
    """A plain training loop: the same rows, batch size and precision policy as the trl run."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).to(device)
    model.train()
    rows = _sft_rows(samples, processor, batch)
    images = [
        Image.open(r["images"][0] if isinstance(r["images"][0], str) else r["images"][0]["path"]).convert(
            "RGB"
        )
        for r in rows
    ]
    inputs = processor(
        images=images, text=[r["prompt"] + r["completion"] for r in rows], return_tensors="pt", padding=True
    ).to(device)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    t0 = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            t0 = time.perf_counter()
        with autocast:
            loss = model(**inputs, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    _sync(device)
    rate = steps / (time.perf_counter() - t0)
    del model, opt
    return rate


def _count_tokens(tokenizer: Any, texts: list[str]) -> int:
    return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)


def generation_tokens_per_s(
    model_spec: str, samples: list[Any], *, device: str, batch: int, new_tokens: int
) -> dict[str, float]:
    """Batched greedy generation: through the `hf:` adapter vs raw `model.generate` on the same batch."""
    import torch
    from medvqa.models import load_model
    from medvqa.prompts import get_policy
    from medvqa.types import GenerationRequest, GenerationSettings
    from PIL import Image

    policy = get_policy(None)
    adapter = load_model(model_spec, device=device)
    settings = GenerationSettings(max_new_tokens=new_tokens)
    requests = [
        GenerationRequest(s.image, policy.render(s.question, s.prompt_answer_type), s.id)
        for s in samples[:batch]
    ]
    adapter.generate(requests[:2], settings)  # warm-up (kernels, allocator)
    _sync(device)
    t0 = time.perf_counter()
    texts = adapter.generate(requests, settings)
    _sync(device)
    t_medvqa = time.perf_counter() - t0
    tokenizer = getattr(adapter.processor, "tokenizer", adapter.processor)
    tok_medvqa = _count_tokens(tokenizer, texts)  # re-tokenized answers (replaced below when exact)

    model, processor = adapter.model, adapter.processor
    prompts = [
        processor.apply_chat_template(list(r.prompt.messages), add_generation_prompt=True) for r in requests
    ]
    images = [Image.open(s.image).convert("RGB") for s in samples[:batch]]
    processor.tokenizer.padding_side = "left"
    inputs = processor(
        images=images, text=prompts, return_tensors="pt", padding=True, add_special_tokens=False
    )
    inputs = inputs.to(device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(next(model.parameters()).dtype)
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        _sync(device)
        t0 = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
        _sync(device)
    t_raw = time.perf_counter() - t0
    new = out[:, inputs["input_ids"].shape[1] :]
    pad = processor.tokenizer.pad_token_id
    eos = processor.tokenizer.eos_token_id
    tok_raw = int(((new != pad) & (new != eos)).sum())
    same = texts == [t.strip() for t in processor.batch_decode(new, skip_special_tokens=True)]
    if same:  # the same answers are the same generated tokens: count them once, exactly
        tok_medvqa = tok_raw
    return {
        "medvqa_tokens_per_s": tok_medvqa / t_medvqa,
        "raw_tokens_per_s": tok_raw / t_raw,
        "medvqa_tokens": tok_medvqa,
        "raw_tokens": tok_raw,
        "same_answers_as_raw": texts
        == [t.strip() for t in processor.batch_decode(new, skip_special_tokens=True)],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--out", required=True, help="scratch folder (data, model, runs)")
    parser.add_argument("--sft-steps", type=int, default=30)
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    import torch
    from medvqa.benchmarks.phantom import Phantom
    from medvqa.models.tiny import TinyConfig, init_tiny

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device"}, indent=2))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    n_images = max(args.batch_size * (args.sft_steps + args.warmup_steps), args.eval_batch_size) // 5 + 8
    data = out / "phantom"
    if not (data / "phantom.json").exists():
        _medvqa(
            [
                "data",
                "phantom",
                "--out",
                str(data),
                "--train-images",
                str(n_images),
                "--test-images",
                str(args.eval_batch_size // 5 + 4),
            ]
        )
    model_dir = out / f"llava-{args.size}"
    if not (model_dir / "config.json").exists():
        init_tiny(model_dir, TinyConfig(**SIZES[args.size]), force=True)
    n_params = json.loads((model_dir / "tiny_config.json").read_text())["n_parameters"]
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    report: dict[str, Any] = {"size": args.size, "device": args.device, "n_parameters": n_params}
    if args.device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name(0)

    # SFT through medvqa (trl SFTTrainer), bf16 on CUDA
    run = out / "sft"
    t0 = time.perf_counter()
    train = [
        "train",
        "--trainer",
        "sft",
        "--model",
        f"hf:{model_dir}",
        "--benchmark",
        "phantom",
        "--root",
        str(data),
    ]
    train += [
        "--out",
        str(run),
        "--force",
        "--max-steps",
        str(args.sft_steps + args.warmup_steps),
        "--logging-steps",
        "1",
    ]
    train += [
        "--per-device-train-batch-size",
        str(args.batch_size),
        "--save-steps",
        "0",
        "--learning-rate",
        "1e-5",
    ]
    train += ["--precision", "bf16" if args.device.startswith("cuda") else "fp32"]
    _medvqa(train)
    report["sft_wall_s"] = round(time.perf_counter() - t0, 1)
    report["medvqa_sft_steps_per_s"] = _steps_per_s(run / "train_log.jsonl", args.warmup_steps)
    _free(args.device)

    train_samples = Phantom().load("train", data)
    report["raw_sft_steps_per_s"] = raw_sft_steps_per_s(
        model_dir,
        train_samples,
        device=args.device,
        batch=args.batch_size,
        steps=args.sft_steps,
        warmup=args.warmup_steps,
    )
    report["sft_ratio_medvqa_over_raw"] = report["medvqa_sft_steps_per_s"] / report["raw_sft_steps_per_s"]
    _free(args.device)

    test_samples = Phantom().load("test", data)
    dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    gen = generation_tokens_per_s(
        f"hf:{model_dir},dtype={dtype}",
        test_samples,
        device=args.device,
        batch=args.eval_batch_size,
        new_tokens=args.new_tokens,
    )
    report.update(gen)
    report["generate_ratio_medvqa_over_raw"] = gen["medvqa_tokens_per_s"] / gen["raw_tokens_per_s"]

    t0 = time.perf_counter()
    ev = ["eval", "--model", f"hf:{model_dir},dtype={dtype}", "--benchmark", "phantom", "--root", str(data)]
    ev += [
        "--limit",
        str(args.eval_batch_size),
        "--batch-size",
        str(args.eval_batch_size),
        "--device",
        args.device,
    ]
    ev += [
        "--max-new-tokens",
        str(args.new_tokens),
        "--out",
        str(out / "eval"),
        "--fresh",
        "--no-progress",
        "--n-boot",
        "0",
    ]
    _medvqa(ev)
    report["eval_wall_s"] = round(time.perf_counter() - t0, 1)
    if args.device.startswith("cuda"):
        report["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    report["total_s"] = round(time.perf_counter() - started, 1)
    report = {k: round(v, 3) if isinstance(v, float) else v for k, v in report.items()}
    print(json.dumps(report, indent=2))
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
