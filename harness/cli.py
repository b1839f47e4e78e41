"""`medvqa`: one command-line tool, one module per command under `harness/commands/`.

Each command module defines `add_parser(subparsers)`, which adds its sub-parser and sets
`func=run`. Command modules import only the standard library and light project modules at top
level: `medvqa --help`, `medvqa score` and `medvqa data` never import torch or transformers.
Exit codes: 0 ok, 2 bad input or usage (one clear message), 1 anything unexpected.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import logging
import os
import pkgutil
import sys
from collections.abc import Iterator, Sequence
from typing import NoReturn

from medvqa import __version__
from medvqa.errors import BadInput, EndpointError

DESCRIPTION = """\
Benchmark and train medical VQA models (VQA-RAD, SLAKE, PathVQA, Phantom), and measure how
much labeled medical data they need.

Start here:
  medvqa demo                       the whole story on Phantom, on a CPU, in minutes
  medvqa benchmarks                 what can be scored
  medvqa eval --model hf:DIR --benchmark phantom --root data/phantom
  medvqa score --gt test.json --pred answers.jsonl
"""


def build_parser() -> argparse.ArgumentParser:
    import medvqa.commands as commands
    from medvqa.config import ArgumentParser

    parser = ArgumentParser(
        prog="medvqa", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"medvqa-harness {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    modules = [
        importlib.import_module(f"medvqa.commands.{m.name}") for m in pkgutil.iter_modules(commands.__path__)
    ]
    for module in sorted(modules, key=lambda m: getattr(m, "ORDER", 100)):
        module.add_parser(sub)
    return parser


def _quiet_library_progress_bars() -> None:
    """Our own bars are off when stderr is not a terminal; make the libraries' bars follow suit
    (huggingface_hub/transformers and datasets read these before their first bar)."""
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def _configure_logging() -> None:
    """The one place logging is configured (library code never touches process-wide state):
    medvqa's own INFO lines (training progress, retries) on stderr, other libraries' warnings."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("medvqa").setLevel(logging.INFO)


# Collections of the middle generation before a full one is considered (CPython's default: 10).
OLD_GENERATION_THRESHOLD = 100


@contextlib.contextmanager
def one_job_collector() -> Iterator[None]:
    """Full garbage collections ten times rarer for the duration of one command, then CPython's own.

    A command that runs a model imports torch, transformers and trl: ~450,000 objects that live as
    long as the process. CPython considers a full collection after every 10 middle-generation ones
    and runs it when the old generation has grown by a quarter, so the imports alone pay ~8 walks
    of an ever larger heap, ~0.9 s of CPU in a 10-step `medvqa train` (measured; about a tenth of
    the job); at 100 it is one walk. Young collections keep their thresholds (the cycles a training
    step or a generation batch leaves die young and are found there), and the quarter-growth rule
    still starts a full collection in a long loop whose garbage reaches the old generation.
    """
    before = gc.get_threshold()
    gc.set_threshold(before[0], before[1], max(before[2], OLD_GENERATION_THRESHOLD))
    try:
        yield
    finally:
        gc.set_threshold(*before)


def exit_process(code: int) -> NoReturn:
    """End the `medvqa` process with `code`, without the interpreter's last walk of the whole heap.

    Objects alive now are frozen (`gc.freeze`), so the collection at interpreter exit skips them
    instead of walking and freeing ~450,000 of them one by one: 0.5-1 s of a job's CPU (measured),
    given back to the operating system at once instead. Nothing of ours waits for that teardown:
    every file is written and closed (or fsynced) before `main` returns, which is what lets any job
    survive `kill -9` (docs/guarantees.md), and `atexit` handlers (logging's flush among them) still run.
    """
    gc.freeze()
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    with one_job_collector():
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    _quiet_library_progress_bars()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    _configure_logging()
    try:
        return int(args.func(args) or 0)
    except BadInput as exc:
        print(f"medvqa: error: {exc}", file=sys.stderr)
        return 2
    except EndpointError as exc:  # an endpoint that kept failing: not the user's input, one line
        print(f"medvqa: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("medvqa: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    exit_process(main())
