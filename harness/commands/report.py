"""`medvqa report RUN_DIR`: results.csv and the data-efficiency table and plot, from stored scores only."""

from __future__ import annotations

import argparse

ORDER = 61

DESCRIPTION = """\
Read the stored scores of a sweep folder (never reruns a model) and write, under RUN_DIR/report/:
  results.csv              the tidy long table (one row per run × benchmark × scorer × metric)
  data_efficiency.md/.csv  one line per trainer@fraction (+ reference checkpoints): medical data
                           used, closed accuracy and open recall per benchmark (mean ± 95% CI over
                           seeds), the strict scorer beside, and a paired test against SFT@100%
                           (Holm-corrected; * = still significant), a minimum-detectable-effect line
  data_efficiency.png      score vs data used (log x), one line per trainer, error bars
  by_category.csv          accuracy by question category (the benchmark's slot / content type /
                           question type / modality), also a section of data_efficiency.md
  samples.html             the sample viewer (medvqa show): a trainer line beside the baseline
                           trainer on the same labeled data, disagreements first; linked from the .md
Then print the markdown table.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="tables and plots from a sweep's stored scores",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a sweep folder (runs/<name>)")
    p.add_argument(
        "--format",
        default="md,csv,png,html",
        help="comma list of md, csv, png, html (default: md,csv,png,html)",
    )
    p.add_argument("--out", default=None, help="where to write the files (default: RUN_DIR/report)")
    p.add_argument("--scorer", default="llava-med", help="main scorer of the table (default: llava-med)")
    p.add_argument(
        "--side-scorer",
        default="strict",
        help="scorer shown beside the main one; 'none' hides it (default: strict)",
    )
    p.add_argument(
        "--baseline", default="sft@1.0", help="the line every other line is tested against (default: sft@1.0)"
    )
    p.add_argument("--quiet", action="store_true", help="do not print the table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medvqa.reports.report import make_report, parse_formats

    formats = parse_formats(args.format)
    side = None if str(args.side_scorer).lower() in ("none", "") else args.side_scorer
    md, written = make_report(
        args.run_dir,
        out_dir=args.out,
        formats=formats,
        scorer=args.scorer,
        side_scorer=side,
        baseline=args.baseline,
    )
    if not args.quiet:  # stored text may hold a lone surrogate: shown as "\ud800", not a crash
        print(md.encode("utf-8", "backslashreplace").decode("utf-8"))
    for path in written:
        print(f"wrote {path}")
    return 0
