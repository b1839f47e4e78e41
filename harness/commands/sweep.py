"""`medvqa sweep CONFIG.toml`: the data-efficiency grid (trainer × fraction × seed), then eval and report."""

from __future__ import annotations

import argparse

ORDER = 60

DESCRIPTION = """\
Run the grid trainer × fraction × seed from a TOML config, evaluate every checkpoint on every
[[eval]] benchmark, and write the report (results.csv, data_efficiency.md/.csv/.png).

Each job is an ordinary `medvqa train` / `medvqa eval` process, forked from one that imported
torch, transformers and trl once ([run] preload; set [run] launcher to e.g.
'accelerate launch --num_processes 8 -m medvqa' on a multi-GPU node). Finished jobs are
skipped on a rerun; a killed sweep (even kill -9) resumes where it stopped. Layout:
  <out>/<trainer>/f<fraction>/s<seed>/checkpoint/   <out>/.../eval/<benchmark>/   <out>/report/
Example configs: configs/phantom.toml, configs/phantom-smoke.toml, configs/real-gpu.toml.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="trainer × fraction × seed, then eval of every checkpoint, then the report",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", metavar="CONFIG.toml", help="sweep config")
    p.add_argument("--out", default=None, help="run folder (default: runs/<name>)")
    p.add_argument(
        "--jobs", type=int, default=None, help="jobs side by side (overrides [run] jobs; 0 = auto)"
    )
    p.add_argument(
        "--threads", type=int, default=None, help="CPU threads per local job (overrides [run] threads)"
    )
    p.add_argument("--dry-run", action="store_true", help="print the jobs that would run, run nothing")
    p.add_argument("--verbose", action="store_true", help="stream every job's output (default: to log files)")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.set_defaults(func=run)


def run_overrides(args: argparse.Namespace) -> dict[str, int]:
    """`[run]` settings given as flags (--jobs, --threads), checked; shared with `medvqa demo`."""
    from medvqa.errors import BadInput

    overrides = {}
    for name in ("jobs", "threads"):
        value = getattr(args, name)
        if value is not None:
            if value < 0:
                raise BadInput(f"--{name} must be >= 0 (0 = auto)")
            overrides[name] = value
    return overrides


def run(args: argparse.Namespace) -> int:
    from medvqa.sweeps import run_sweep

    overrides = run_overrides(args)
    failed, _run_dir, md = run_sweep(
        args.config,
        out=args.out,
        dry_run=args.dry_run,
        verbose=args.verbose,
        report=not args.no_report,
        overrides=overrides,
        log=lambda s: print(s, flush=True),
    )
    if md:
        print()
        print(md)
    if failed:
        print(f"medvqa sweep: {failed} job(s) failed; rerun the same command to retry them")
        return 1
    return 0
