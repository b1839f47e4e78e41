"""`medvqa demo`: the whole story on Phantom, on a CPU, in minutes (the README's main command)."""

from __future__ import annotations

import argparse
from pathlib import Path

ORDER = 1

PRESETS = {
    "default": "phantom.toml",  # three seeds of SFT at 9/25/100% and STLLaVA-Med at 9%
    "full": "phantom-full.toml",  # the default + a model judge and a compute control (README table)
    "smoke": "phantom-smoke.toml",  # ≤ 60 s: the same path on a toy grid, one seed
}
RUN_FOLDERS = {"default": "runs/demo", "full": "runs/demo-full", "smoke": "runs/demo-smoke"}

DESCRIPTION = """\
Build Phantom (a synthetic radiology-like VQA benchmark) and a tiny LLaVA-architecture model if
they are missing, align the model on captions, then sweep: SFT on 9%, 25% and 100% of the labeled
training QA and STLLaVA-Med on 9% (self-questioning on the unlabeled training images, judged by the
phantom expert, DPO), three seeds each, two jobs side by side at one thread each, evaluate every
checkpoint, and print the data-efficiency table (± = the spread over seeds) and where the time
went. Rerunning skips what is done; a killed demo resumes. The same sweep runs on real data and GPUs:
`medvqa sweep configs/real-gpu.toml`.

--preset full adds STLLaVA-Med@9% judged by a model (trained on its own Phantom build) and a
compute control (SFT@9% continued for as many steps as DPO takes): the README's table.
"""


def config_dir() -> Path:
    """The shipped configs: package data of `medvqa.configs` (the `configs/` folder of a source
    checkout, or the installed copy of a wheel)."""
    from importlib.resources import files

    return Path(str(files("medvqa.configs")))


def preset_config(preset: str) -> Path:
    from medvqa.errors import BadInput

    path = config_dir() / PRESETS[preset]
    if not path.is_file():
        raise BadInput(f"demo preset {preset!r}: config not found in the installed package data", path=path)
    return path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole pipeline on Phantom on a CPU: data, tiny model, sweep, report",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="default",
        help="default (3 seeds of SFT at 9/25/100%% and STLLaVA-Med at 9%%: about 10 min on 2 idle CPU "
        "cores), full (+ a model judge and a compute control: about 14 min) or smoke (about half a "
        "minute) (default: default)",
    )
    p.add_argument(
        "--out", default=None, help="run folder (default: runs/demo, runs/demo-full or runs/demo-smoke)"
    )
    p.add_argument("--jobs", type=int, default=None, help="jobs side by side (default: the preset's)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per job (default: the preset's)")
    p.add_argument("--verbose", action="store_true", help="stream every job's output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    from medvqa.commands.sweep import run_overrides
    from medvqa.sweeps import run_sweep

    config = preset_config(args.preset)
    out = args.out or RUN_FOLDERS[args.preset]
    overrides = run_overrides(args)
    print(f"medvqa demo ({args.preset}): config {config}, run folder {out}", flush=True)
    t0 = time.perf_counter()
    failed, run_dir, md = run_sweep(
        config, out=out, verbose=args.verbose, overrides=overrides, log=lambda s: print(s, flush=True)
    )
    print()
    if md:
        print(md)
    print(f"demo finished in {time.perf_counter() - t0:.0f} s; report files in {run_dir / 'report'}")
    if failed:
        print(f"medvqa demo: {failed} job(s) failed; rerun the same command to retry them")
        return 1
    return 0
