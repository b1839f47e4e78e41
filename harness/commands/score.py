"""`medvqa score`: score an answer file against ground truth, with no model (and no torch import)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

ORDER = 30

DESCRIPTION = """\
Score a prediction file against ground truth with the medical-VQA scorers. No model is loaded.

GT    a LLaVA-Med test.json (a JSON list of items with id, answer_type OPEN/CLOSED and
      conversations [question, gold]) or the harness's samples JSONL (one sample per line).
PRED  a LLaVA-Med answer file (JSONL: question_id, text, ...), joined to GT by id.

Scorers (both by default):
  llava-med  the published LLaVA-Med convention, quirks included: closed accuracy is "normalized
             gold is a substring of the normalized prediction" (so "no" matches "normal"); open
             recall counts gold words found in the prediction. Use it to compare with papers.
  strict     what those numbers should mean: a yes/no answer must say exactly one of yes/no;
             other closed answers must match; open metrics use word sets. Use it to judge models.

All values are percentages; CI = 95% bootstrap interval, images resampled (clustered by image).
Exit codes: 0 ok, 2 bad input (one message naming file, record and field).
"""

EPILOG = """\
examples:
  medvqa score --gt tests/data/test.json --pred tests/data/answers.jsonl
  medvqa score --gt test.json --pred answers.jsonl --scorer llava-med --json
  medvqa score --gt samples.jsonl --pred answers.jsonl --out-scored scored.jsonl
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score",
        help="score a prediction file against ground truth (no model needed)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--gt", required=True, metavar="GT", help="ground truth: LLaVA-Med test.json or samples JSONL"
    )
    p.add_argument("--pred", required=True, metavar="PRED", help="predictions: LLaVA-Med answer-file JSONL")
    p.add_argument(
        "--scorer",
        default="all",
        choices=("llava-med", "strict", "all"),
        help="which scorer to report (default: all)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument(
        "--out-scored",
        metavar="FILE",
        help="also write one JSON line per item (id, image_id, answer_type, gold, prediction, per-scorer values)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default: 0)")
    p.add_argument(
        "--n-boot",
        default="1000",
        help="bootstrap replicates for the CIs, 0 to 100,000; 0 = no CI (default: 1000)",
    )
    p.set_defaults(func=run)


def _count(text: str) -> int:
    """`--n-boot` as a count: `1e9` and `1_000` are read as numbers, so the range check names them
    (checked here, not by argparse, so that the error is one line)."""
    from medvqa.errors import BadInput
    from medvqa.scoring import check_n_boot

    try:
        value = float(text.replace("_", "")) if any(c in text for c in "eE._") else int(text)
    except ValueError:
        raise BadInput(f"--n-boot: not a number: {text!r}") from None
    if isinstance(value, float):
        if not value.is_integer():
            raise BadInput(f"--n-boot: not a whole number: {text!r}")
        value = int(value)
    return check_n_boot(value)


def run(args: argparse.Namespace) -> int:
    from medvqa.answer_files import read_gt_and_predictions
    from medvqa.scoring import resolve_scorers, score_samples

    n_boot = _count(str(args.n_boot))
    samples, predictions = read_gt_and_predictions(args.gt, args.pred)
    result = score_samples(
        samples, predictions, scorers=resolve_scorers(args.scorer), seed=args.seed, n_boot=n_boot
    )
    if args.out_scored:
        from medvqa.io import atomic_write_jsonl

        atomic_write_jsonl(args.out_scored, result.rows)
    if args.json:
        out: dict[str, Any] = {"gt": str(args.gt), "pred": str(args.pred), **result.to_json()}
        for metrics in out["scorers"].values():
            metrics["n_open"], metrics["n_closed"] = result.n_open, result.n_closed
        print(json.dumps(_finite(out), indent=2))
    else:
        print(render_table(result, gt=str(args.gt), pred=str(args.pred)))
        if args.out_scored:
            print(f"\nper-item scores: {args.out_scored}")
    sys.stdout.flush()
    return 0


def _finite(obj: Any) -> Any:
    """NaN (a metric with no item) → null, so that the output is strict JSON."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def render_table(result: Any, *, gt: str = "", pred: str = "") -> str:
    """A readable table: one block per scorer (value, 95% CI, n per metric), then what each metric is."""
    from medvqa.scoring import METRIC_HELP

    lines = []
    if gt:
        lines.append(f"GT    {gt}  ({result.n} items: {result.n_closed} closed, {result.n_open} open)")
    if pred:
        lines.append(f"PRED  {pred}")
    lines.append("")
    header = f"{'scorer':<10} {'metric':<17} {'value':>7}  {'95% CI':<17} {'n':>6}"
    lines += [header, "-" * len(header)]
    shown: list[str] = []
    for scorer, metrics in result.summary.items():
        for metric, mv in metrics.items():
            value = "    n/a" if mv.n == 0 else f"{mv.value:7.2f}"
            ci = f"[{mv.ci_low:6.2f}, {mv.ci_high:6.2f}]" if mv.ci_low is not None else ""
            lines.append(f"{scorer:<10} {metric:<17} {value}  {ci:<17} {mv.n:>6}")
            if metric not in shown:
                shown.append(metric)
        lines.append("")
    lines.append("Values in percent; CI: 95% bootstrap interval, resampling images.")
    lines += [f"  {metric:<17} {METRIC_HELP[metric]}" for metric in shown if metric in METRIC_HELP]
    return "\n".join(lines)
