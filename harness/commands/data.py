"""`medvqa data phantom|inspect|overlap|convert`: build Phantom; look into and export benchmark data."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medvqa.errors import BadInput

if TYPE_CHECKING:
    from medvqa.types import Benchmark

ORDER = 10

DESCRIPTION = """\
Build the embedded Phantom benchmark, and look into the benchmark files you already have.

Real benchmarks are read from the layouts they are distributed in (the layout is detected):
  vqa-rad         'VQA_RAD Dataset Public.json' + 'VQA_RAD Image Folder/', or HF data/*.parquet
  slake           Slake1.0/{train,validate,test}.json + Slake1.0/imgs/   (English; --lang zh|all)
  pathvqa         pvqa/qas/{split}/{split}_qa.pkl + pvqa/images/{split}/, or HF data/*.parquet
  llava-med-json  any LLaVA-Med {split}.json + images/
  phantom         a folder written by `medvqa data phantom`
--root may be the folder that holds the files or its parent.

examples:
  medvqa data phantom --out data/phantom --seed 0 --size 32
  medvqa data inspect vqa-rad --root ~/data/VQA_RAD
  medvqa data inspect slake --root ~/data --lang zh --json
  medvqa data overlap vqa-rad --root ~/data/vqa-rad-hf
  medvqa data convert pathvqa --root ~/data/pvqa --split test --out pvqa_test/test.json --copy-images
"""


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def _add_benchmark_args(p: argparse.ArgumentParser, *, split: bool = True) -> None:
    from medvqa.benchmarks.hub import cli_root
    from medvqa.safety import DEFAULT_MAX_PIXELS

    p.add_argument("benchmark", metavar="BENCHMARK", help="a registered benchmark (see `medvqa benchmarks`)")
    p.add_argument(
        "--root",
        required=True,
        type=cli_root,
        help="the data folder (or its parent), or hf://datasets/OWNER/NAME[@REV] from the local HF cache",
    )
    if split:
        p.add_argument("--split", default="test", help="which split (default: test)")
    p.add_argument(
        "--lang",
        choices=("en", "zh", "all"),
        default=None,
        help="slake only: question language (default: en)",
    )
    p.add_argument(
        "-O",
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a benchmark option, repeatable (e.g. -O image_folder=imgs for llava-med-json)",
    )
    p.add_argument(
        "--check-images",
        choices=("exists", "verify", "decode"),
        default=None,
        help="how hard to check each image: exists, verify (parse the file; the default for downloaded "
        "data) or decode (every pixel: also catches truncated JPEGs, slower)",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        metavar="N",
        help="refuse an image of more than N pixels before decoding it (a decompression bomb; "
        f"default: {DEFAULT_MAX_PIXELS:,}; 0: no cap)",
    )
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip records with a missing/corrupt image, missing field or duplicate id, and count them "
        "(default: stop at the first one with an error that names file, record and field)",
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser(
        "data",
        help="build Phantom; inspect, check overlap of, and convert benchmark data",
        description=DESCRIPTION,
        formatter_class=_formatter,
    )
    data.set_defaults(func=lambda args: (data.print_help(), 2)[1])
    dsub = data.add_subparsers(title="data commands", metavar="DATA_COMMAND")

    p = dsub.add_parser(
        "phantom",
        help="generate the Phantom benchmark (synthetic radiology-like VQA) into a folder",
        description="Generate Phantom: grayscale scenes (modality, region, plane, organs, lesions), "
        "questions from a small grammar, captions. Same flags, same bytes.\n\nexamples:\n"
        "  medvqa data phantom --out data/phantom\n"
        "  medvqa data phantom --out data/phantom32 --size 32 --train-images 500 --test-images 100 --seed 1",
        formatter_class=_formatter,
    )
    p.add_argument(
        "--out", required=True, type=Path, help="the folder to write (new, empty, or a Phantom folder)"
    )
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    _add_phantom_flags(p)
    p.set_defaults(func=run_phantom)

    p = dsub.add_parser(
        "inspect",
        help="detect the layout of a benchmark folder and count questions, OPEN/CLOSED and images",
        description="Detect the layout of BENCHMARK's files under --root, load one split (checking every "
        "image), and print: layout, n, n_open, n_closed, n_images, the closed rule and the benchmark "
        "version.\n\nexamples:\n"
        "  medvqa data inspect vqa-rad --root ~/data/VQA_RAD\n"
        "  medvqa data inspect slake --root ~/data/Slake1.0 --split validate --lang all\n"
        "  medvqa data inspect pathvqa --root ~/data/pvqa --skip-bad --json",
        formatter_class=_formatter,
    )
    _add_benchmark_args(p)
    p.add_argument(
        "--json", action="store_true", help="print one JSON object (n, n_open, n_closed, n_images, ...)"
    )
    p.set_defaults(func=run_inspect)

    p = dsub.add_parser(
        "overlap",
        help="images shared between two splits, by content hash (sha256 of the bytes)",
        description="Hash every image of two splits (sha256 of the bytes) and report the images that "
        "appear in both, and how many test questions ask about them. A redistributed VQA-RAD split "
        "was found to hold every test image in train.\n\nexamples:\n"
        "  medvqa data overlap vqa-rad --root ~/data/vqa-rad-hf\n"
        "  medvqa data overlap slake --root ~/data --train-split validate --json",
        formatter_class=_formatter,
    )
    _add_benchmark_args(p, split=False)
    p.add_argument("--train-split", default="train", help="the first split (default: train)")
    p.add_argument("--test-split", default="test", help="the second split (default: test)")
    p.add_argument("--examples", type=int, default=5, help="how many shared images to show (default: 5)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_overlap)

    p = dsub.add_parser(
        "convert",
        help="export a split to LLaVA-Med test.json (id, image, conversations, answer_type)",
        description="Export one split to a LLaVA-Med JSON list, so other tools can consume our splits. "
        "Image paths are written relative to --root; images held as bytes (parquet layouts) are "
        "written to the images folder beside --out. With --copy-images every image is copied there, "
        "so the output folder is self-contained (`medvqa data inspect llava-med-json --root OUTDIR`).\n\n"
        "examples:\n"
        "  medvqa data convert vqa-rad --root ~/data/VQA_RAD --split test --out rad/test.json\n"
        "  medvqa data convert pathvqa --root ~/data/pvqa-hf --split test --out pvqa/test.json",
        formatter_class=_formatter,
    )
    _add_benchmark_args(p)
    p.add_argument("--out", required=True, type=Path, help="the JSON file to write")
    p.add_argument(
        "--images",
        type=Path,
        default=None,
        help="where exported images go (default: images/ beside --out)",
    )
    p.add_argument("--copy-images", action="store_true", help="copy file images too (self-contained output)")
    p.set_defaults(func=run_convert)


# ------------------------------------------------------------------------------------------ phantom


def _add_phantom_flags(p: argparse.ArgumentParser) -> None:
    """Flags from `benchmarks.phantom.PhantomConfig` (written once there, derived here)."""
    try:
        from medvqa.benchmarks.phantom import PhantomConfig
    except ImportError as exc:  # a broken install: keep the rest of the CLI usable
        p.set_defaults(_phantom_import_error=str(exc))
        return
    from medvqa.config import add_dataclass_arguments

    add_dataclass_arguments(p, PhantomConfig)


def run_phantom(args: argparse.Namespace) -> int:
    if getattr(args, "_phantom_import_error", None):
        raise BadInput(f"the Phantom generator cannot be imported: {args._phantom_import_error}")
    from medvqa.benchmarks.phantom import PhantomConfig, write_phantom
    from medvqa.config import dataclass_from_args

    try:
        config = dataclass_from_args(PhantomConfig, args)
    except (TypeError, ValueError) as exc:
        raise BadInput(f"bad Phantom setting: {exc}") from None
    summary = write_phantom(args.out, config)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(
        f"wrote Phantom v{summary.get('version')} to {summary.get('out')} (seed {summary.get('seed')}, "
        f"{summary.get('size')} px) in {summary.get('seconds')} s"
    )
    for split, c in summary.get("splits", {}).items():
        print(
            f"  {split:<6} {c.get('images')} images, {c.get('samples')} questions "
            f"({c.get('open')} OPEN, {c.get('closed')} CLOSED), {c.get('captions', 0)} captions"
        )
    return 0


# ------------------------------------------------------------------------------------------ helpers


def _options(args: argparse.Namespace) -> dict[str, Any]:
    from medvqa.benchmarks import parse_options

    options: dict[str, Any] = parse_options(args.option)
    if args.lang is not None:
        import dataclasses

        from medvqa.registry import benchmarks

        if "lang" not in {f.name for f in dataclasses.fields(benchmarks.get(args.benchmark).Options)}:
            raise BadInput(f"--lang applies to slake; benchmark {args.benchmark!r} has no language option")
        options["lang"] = args.lang
    return options


def _benchmark(args: argparse.Namespace) -> Benchmark:
    from medvqa.benchmarks import make_benchmark

    return make_benchmark(args.benchmark, _options(args))


def _load(bench: Benchmark, split: str, args: argparse.Namespace) -> tuple[list[Any], list[str], int]:
    """(samples, skipped messages, number skipped) through the `Benchmark.load` contract."""
    samples = bench.load(
        split,
        args.root,
        skip_bad=args.skip_bad,
        check_images=args.check_images,
        max_pixels=args.max_pixels,
    )
    messages = [str(s) for s in bench.skipped]
    return samples, messages, len(messages)


# ------------------------------------------------------------------------------------------ inspect


def run_inspect(args: argparse.Namespace) -> int:
    from medvqa.benchmarks._files import is_yes_no

    bench = _benchmark(args)
    layout = bench.detect_layout(args.root, args.split)
    samples, skipped, n_skipped = _load(bench, args.split, args)
    split = samples[0].split if samples else args.split
    n_open = sum(s.answer_type == "OPEN" for s in samples)
    n_closed = len(samples) - n_open
    closed_other = sum(s.answer_type == "CLOSED" and not is_yes_no(s.answer) for s in samples)
    open_yes_no = sum(s.answer_type == "OPEN" and is_yes_no(s.answer) for s in samples)
    out = {
        "benchmark": bench.name,
        "benchmark_version": bench.version,
        "layout": layout,
        "root": str(args.root),
        "split": split,
        "closed_rule": bench.closed_rule(args.root, args.split),
        "n": len(samples),
        "n_open": n_open,
        "n_closed": n_closed,
        "n_images": len({s.image_id for s in samples}),
        "n_closed_not_yes_no": closed_other,
        "n_open_yes_no": open_yes_no,
        "n_skipped": n_skipped,
        "skipped": skipped[:20],
    }
    if args.json:
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return 0
    print(f"benchmark    {out['benchmark']} (version {out['benchmark_version']})")
    print(f"layout       {layout}")
    print(f"split        {split}")
    print(f"questions    {out['n']}  (OPEN {n_open}, CLOSED {n_closed})")
    print(f"images       {out['n_images']}")
    print(f"closed rule  {out['closed_rule']}")
    if closed_other or open_yes_no:
        print(
            f"note         {closed_other} CLOSED questions have a non-yes/no answer; "
            f"{open_yes_no} OPEN questions have a yes/no answer"
        )
    if args.skip_bad:
        print(f"skipped      {n_skipped} bad record(s)")
        for msg in skipped[:10]:
            print(f"  - {msg}")
        if n_skipped > 10:
            print(f"  ... and {n_skipped - 10} more (--json lists 20)")
    return 0


# ------------------------------------------------------------------------------------------ overlap


def run_overlap(args: argparse.Namespace) -> int:
    from medvqa.overlap import image_overlap

    bench = _benchmark(args)
    tr, te = args.train_split, args.test_split
    train, _, skipped_train = _load(bench, tr, args)
    test, _, skipped_test = _load(bench, te, args)
    found = image_overlap(train, test, examples=args.examples)
    n_skipped = skipped_train + skipped_test
    out = {
        "benchmark": bench.name,
        "benchmark_version": bench.version,
        "layout": bench.detect_layout(args.root, te),
        "splits": [tr, te],
        "n_images": {tr: found["n_images"]["train"], te: found["n_images"]["test"]},
        "n_shared_images": found["n_shared_images"],
        "share_of_test_images": found["share_of_test_images"],
        "n_test_questions_on_shared_images": found["n_test_questions_on_shared_images"],
        "n_test_questions": found["n_test_questions"],
        "n_skipped": n_skipped,
        "examples": [{"sha256": ex["sha256"], tr: ex["train"], te: ex["test"]} for ex in found["examples"]],
    }
    if args.json:
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return 0
    print(f"{bench.name}: {out['layout']}")
    print(f"images       {tr} {out['n_images'][tr]}, {te} {out['n_images'][te]} (distinct by content)")
    print(
        f"shared       {out['n_shared_images']} images ({out['share_of_test_images']}% of {te} images), "
        f"asked about by {out['n_test_questions_on_shared_images']} of {out['n_test_questions']} {te} questions"
    )
    for ex in out["examples"]:
        print(f"  {ex['sha256'][:16]}  {tr}: {ex[tr]}  {te}: {ex[te]}")
    if n_skipped:
        print(f"skipped      {n_skipped} bad record(s)")
    return 0


# ------------------------------------------------------------------------------------------ convert


def _image_suffix(data: bytes) -> str:
    for magic, suffix in ((b"\x89PNG", ".png"), (b"\xff\xd8", ".jpg"), (b"GIF8", ".gif"), (b"BM", ".bmp")):
        if data.startswith(magic):
            return suffix
    return ".img"


def run_convert(args: argparse.Namespace) -> int:
    import dataclasses
    import shutil

    from medvqa.answer_files import write_llava_med_test_json
    from medvqa.safety import image_sha256

    bench = _benchmark(args)
    samples, _, n_skipped = _load(bench, args.split, args)
    out = Path(args.out)
    images_dir = Path(args.images) if args.images else out.parent / "images"
    real_root = Path(args.root).resolve()
    exported = args.copy_images or any(isinstance(s.image, bytes) for s in samples)
    n_written = 0
    rows = []
    for s in samples:
        if isinstance(s.image, bytes):  # parquet layouts: write the image bytes out, once per image
            target = images_dir / (image_sha256(s.image)[:20] + _image_suffix(s.image))
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(s.image)
                n_written += 1
            s = dataclasses.replace(s, image=str(target))
        elif args.copy_images:
            try:
                rel = Path(s.image).resolve().relative_to(real_root)
            except ValueError:
                raise BadInput("image is outside --root", path=s.image, record=s.id) from None
            target = images_dir / rel
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(s.image, target)
                n_written += 1
            s = dataclasses.replace(s, image=str(target))
        rows.append(s)
    folder = images_dir.resolve() if exported else real_root
    n = write_llava_med_test_json(rows, out, root=folder)
    skipped = f" (skipped {n_skipped} bad record(s))" if n_skipped else ""
    print(f"wrote {n} items of {bench.name}/{args.split} to {out}{skipped}")
    print(
        f"images: {folder} ({n_written} written); LLaVA-Med eval: --question-file {out} --image-folder {folder}"
    )
    return 0
