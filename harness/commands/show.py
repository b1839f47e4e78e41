"""`medvqa show RUN_OR_EVAL_DIR [--compare B]`: one static HTML page to look at samples (no model, no torch)."""

from __future__ import annotations

import argparse

ORDER = 63

DESCRIPTION = """\
Write one self-contained HTML page (images inlined as thumbnails; open it from disk, no server) with
every sample of an eval: thumbnail, question, gold, prediction, and both scorers' verdicts. Filters:
wrong only, benchmark, answer type, and the benchmark's own categories (modality, organ, slot, ...).
With --compare, two runs side by side on the same questions, disagreements first.

RUN_OR_EVAL_DIR is an eval folder (it holds scored.jsonl) or any folder above eval folders (a job,
a sweep): every eval under it is shown. Filters are kept in the URL hash, e.g. page.html#show=wrong.
"""

EPILOG = """\
examples:
  medvqa show runs/demo/sft/f0.09/s0 --out sft9.html
  medvqa show runs/demo/stllava-med/f0.09/s0 --compare runs/demo/sft/f0.09/s0 --out st-vs-sft.html
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "show",
        help="one static HTML page of an eval's samples (or two runs side by side)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", metavar="RUN_OR_EVAL_DIR", help="an eval folder, or a folder above eval folders")
    p.add_argument("--compare", metavar="B", default=None, help="a second run, shown beside the first")
    p.add_argument("--out", default="samples.html", help="the page to write (default: samples.html)")
    p.add_argument("--thumb", type=int, default=96, help="thumbnail size in pixels, 16-512 (default: 96)")
    p.add_argument("--no-images", action="store_true", help="leave the thumbnails out (a smaller page)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medvqa.errors import BadInput
    from medvqa.reports.viewer import write_page

    if not 16 <= args.thumb <= 512:
        raise BadInput(f"--thumb must be from 16 to 512 pixels, got {args.thumb}")
    out, n = write_page(
        args.path, args.out, compare=args.compare, thumb=args.thumb, images=not args.no_images
    )
    print(f"wrote {out} ({n} samples)")
    return 0
