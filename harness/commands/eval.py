"""`medvqa eval`: generate answers with a model and score them (resumable, accelerate-aware)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medvqa.config import add_dataclass_arguments

ORDER = 40

DESCRIPTION = """\
Answer a benchmark split with a model and score the answers with both scorers.

Model specs:
  hf:PATH_OR_ID[,adapter=DIR][,dtype=float32|bfloat16|float16|auto][,device=cuda:0][,trust_remote_code=1]
      any transformers image-text-to-text checkpoint (+ a PEFT adapter, not merged); a folder
      holding only a PEFT adapter loads its base from adapter_config.json
  openai:MODEL[@BASE_URL][,api_key_env=VAR][,max_concurrency=N]
      any OpenAI-compatible chat endpoint (GPT-4o, vLLM, SGLang); key from $OPENAI_API_KEY

Writes <out>/predictions.jsonl (flushed per batch), scores.json and scored.jsonl. A killed run
resumes from the last flushed batch; a finished one returns at once; predictions are keyed by the
model's fingerprint, the benchmark version, the prompt policy and the decoding settings, so a new
checkpoint never reuses old answers.

Several benchmarks in one call: --benchmark vqa-rad,slake,pathvqa --root A,B,C (one root per
benchmark, in order); each gets its own run folder (under --out when given) and one summary table
ends the run. --rescore scores a run folder's predictions again (other --scorers, --n-boot, a
+think policy) without loading the model. A second process on the same run folder stops at once.

Multi-process / multi-GPU: accelerate launch [--cpu] --num_processes N -m medvqa eval ...
"""

EPILOG = """\
examples:
  medvqa model init-tiny --out models/tiny --preset phantom
  medvqa eval --model hf:models/tiny --benchmark phantom --root data/phantom --limit 200
  medvqa eval --model hf:runs/demo/sft/f0.09/s0/checkpoint --benchmark phantom --root data/phantom \\
      --batch-size 32 --out runs/demo/sft/f0.09/s0/eval/phantom
  medvqa eval --model openai:gpt-4o --benchmark vqa-rad --root data/vqa-rad --prompt-policy short-answer
  medvqa eval --model hf:models/tiny --benchmark vqa-rad,slake,pathvqa --root data/vqa-rad,data/slake,data/pvqa
  medvqa eval --model hf:models/tiny --benchmark phantom --root data/phantom --n-boot 5000 --rescore
  medvqa eval --model hf:models/reasoning-vlm --benchmark slake --root data/slake --prompt-policy short-answer+think
  accelerate launch --num_processes 8 -m medvqa eval --model hf:llava-hf/llava-1.5-7b-hf,dtype=bfloat16 \\
      --benchmark slake --root data/slake --batch-size 16
"""


def _eval_config_cls() -> type:
    from medvqa.evaluate import EvalConfig

    return EvalConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="generate answers with a model and score them (resumable, accelerate-aware)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_dataclass_arguments(p, _eval_config_cls())
    from medvqa.prompts import DEFAULT_POLICY, policy_names

    for action in p._actions:
        if action.dest in ("model", "benchmark", "root"):
            action.required = True
            action.help = (action.help or "").replace(" (default: None)", "")
        elif action.dest == "prompt_policy":
            action.help = (
                f"prompt policy: {', '.join(policy_names())}; NAME+options / NAME-options switch the "
                f"closed-question [yes, no] options (default: the benchmark's, else {DEFAULT_POLICY})"
            )
    p.add_argument("--fresh", action="store_true", help="discard this run folder's earlier predictions first")
    p.add_argument("--json", action="store_true", help="print scores.json to stdout at the end")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from medvqa.errors import BadInput
    from medvqa.evaluate import EvalConfig, default_out_dir, evaluate, per_benchmark, remove_run
    from medvqa.io import output_lock

    for name in ("model", "benchmark", "root"):
        if not getattr(args, name, None):
            raise BadInput(f"--{name} must not be empty")
    values = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(EvalConfig)
        if getattr(args, f.name) is not None
    }
    jobs = per_benchmark(EvalConfig(**values))
    _quiet_libraries(jobs[0].progress)
    results = []
    for cfg in jobs:
        out = Path(cfg.out or default_out_dir(cfg.model, cfg.benchmark, cfg.split))
        if args.fresh and out.is_dir():
            with output_lock(out):  # never delete what another process is writing
                remove_run(out)
        results.append(evaluate(cfg))
    if len(results) > 1:
        print(summary_table(results))
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else results, indent=2))
    return 0


def summary_table(results: list[dict]) -> str:
    """One markdown row per benchmark: n, closed accuracy and open recall of each scorer."""
    scorers = [s for s in ("llava-med", "strict") if any(s in r["scorers"] for r in results)]
    head = ["benchmark", "split", "n", "skipped"]
    for scorer in scorers:
        head += [f"{scorer} closed", f"{scorer} open recall"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r["benchmark"], r["split"], str(r["n"]), str(r.get("n_skipped", 0))]
        for scorer in scorers:
            metrics = r["scorers"].get(scorer, {})
            for metric in ("closed_accuracy", "open_recall"):
                value = metrics.get(metric, {}).get("value")
                cells.append("" if value is None else f"{value:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _quiet_libraries(progress: bool | None) -> None:
    """No weight-loading progress bars or warnings in an eval's output unless on a terminal."""
    import sys

    if progress or (progress is None and sys.stderr.isatty()):
        return
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass
