"""`medvqa export`: our runs in the files other tools read (lm-eval / lmms-eval results, trl DPO data)."""

from __future__ import annotations

import argparse

ORDER = 62

DESCRIPTION = """\
Write stored results in another tool's format (reads files only; never runs a model).

  --format lm-eval    RUN (an eval folder or a tree of them) → <out>/<model>/results_<date>.json and
                      samples_<task>_<date>.jsonl, lm-eval's schema: results[task]["metric,none"] and
                      "metric_stderr,none" (fractions; stderr clustered by image), configs, versions,
                      n-samples, config, git_hash, date; per-sample doc_id, target, resps,
                      filtered_resps and one key per metric
  --format lmms-eval  the same content under lmms-eval's names (<date>_results.json,
                      <date>_samples_<task>.jsonl), which its --baseline loader pairs
  --format trl-dpo    RUN = a STLLaVA-Med pairs.jsonl (or a folder holding stages/pairs.jsonl) → a
                      Hugging Face preference dataset in trl's vision DPO format (images, prompt,
                      chosen, rejected): <out>/ (datasets.save_to_disk) and <out>/data/train-*.parquet

Tasks: <benchmark> (llava-med scorer) and <benchmark>_strict (strict scorer); a split other than
test is appended (<benchmark>_<split>).
"""

EPILOG = """\
examples:
  medvqa export runs/demo --format lm-eval --out exports/demo
  medvqa export runs/eval/models_tiny/phantom-test --format lmms-eval --out exports/tiny
  medvqa export runs/demo/stllava-med/f0.09/s0/checkpoint --format trl-dpo --out exports/pairs
"""

FORMATS = ("lm-eval", "lmms-eval", "trl-dpo")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="results in lm-eval/lmms-eval files, preference pairs as a trl DPO dataset",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", metavar="RUN", help="an eval folder, a run tree, or (trl-dpo) a pairs file")
    p.add_argument("--format", required=True, choices=FORMATS, help="the target format")
    p.add_argument("--out", required=True, help="the folder to write")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.format == "trl-dpo":
        from medvqa.trainers.preference_export import export_pairs

        written = export_pairs(args.run, args.out)
    else:
        from medvqa.reports.export import export_run

        written = export_run(args.run, args.out, fmt=args.format)
    for path in written:
        print(f"wrote {path}")
    return 0
