"""`medvqa train`: one training job (a registered trainer) → one checkpoint folder."""

from __future__ import annotations

import argparse
import dataclasses
import functools
from pathlib import Path
from typing import Any

ORDER = 50

DESCRIPTION = """\
Train one checkpoint: a registered trainer (align, sft, stllava-med, or a plug-in) on the
training split of a benchmark at a labeled-data fraction (seeded, nested, image-level; its
manifest hash goes into checkpoint.json). The output folder is loadable as --model hf:OUT.

Trainer settings are the fields of the trainer's config dataclass: start from --preset (e.g.
phantom, paper), then a --config TOML table, then individual flags. Print the resolved settings
with --show-config. stllava-med uses the training images outside the fraction as its unlabeled
pool, and their QA (never test data) for the `reference` expert.

  medvqa train --trainer sft --model hf:tiny --benchmark phantom --root data/phantom \\
      --fraction 0.09 --seed 0 --out runs/x/sft/f0.09/s0/checkpoint --preset phantom
"""

# Built-in trainers' config classes (light modules: torch is imported inside their train()).
BUILTIN_CONFIGS = {
    "align": ("medvqa.trainers.align", "AlignConfig"),
    "sft": ("medvqa.trainers.sft", "SFTTrainConfig"),
    "stllava-med": ("medvqa.trainers.stllava_med", "STLLaVAMedConfig"),
}


def _builtin_config_classes() -> list[type]:
    import importlib

    return [getattr(importlib.import_module(m), c) for m, c in BUILTIN_CONFIGS.values()]


def add_trainer_flags(parser: argparse.ArgumentParser, classes: list[type]) -> list[str]:
    """One flag per field of the given config dataclasses (shared fields once); returns the names."""
    from medvqa.config import add_dataclass_arguments

    return add_dataclass_arguments(
        parser,
        *classes,
        dest_prefix="cfg_",
        title="trainer settings",
        description="fields of the trainer's config dataclass (defaults: the trainer's / the --preset's)",
        show_defaults=False,
    )


@functools.cache
def _expert_config_classes() -> tuple[type, ...]:
    """The config dataclass of every registered expert (looked up once per process)."""
    from medvqa.registry import experts

    classes: list[type] = []
    for name in experts.names():
        try:
            config_class = getattr(experts.get(name), "config_class", None)
        except ImportError:  # a broken plug-in: `medvqa experts` says why
            continue
        if config_class is not None and config_class not in classes:
            classes.append(config_class)
    return tuple(classes)


def add_expert_flags(parser: argparse.ArgumentParser) -> list[str]:
    """`--expert-FIELD` for every field of every registered expert's config dataclass, collected
    into `expert_options` (checked against the chosen expert's class when it is built)."""
    from medvqa.config import add_dataclass_arguments

    return add_dataclass_arguments(
        parser,
        *_expert_config_classes(),
        prefix="expert-",
        into="cfg_expert_options",
        title="expert settings",
        description="fields of the chosen expert's config dataclass (--expert NAME; medvqa experts)",
        show_defaults=False,
    )


def resolve_config(trainer_cls: type, args: argparse.Namespace) -> Any:
    """The trainer's config from --preset, --config and the trainer flags (`cfg_*` dests)."""
    from medvqa.trainers.config import resolve_trainer_config

    flags = {d[4:]: v for d, v in vars(args).items() if d.startswith("cfg_") and v is not None}
    return resolve_trainer_config(
        trainer_cls, preset=args.preset or "", config_file=args.config or "", settings=flags
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    from medvqa.benchmarks.hub import cli_root

    p = sub.add_parser(
        "train",
        help="train one checkpoint (align | sft | stllava-med | plug-ins)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--trainer", required=True, help="registered trainer (medvqa trainers)")
    p.add_argument(
        "--model", "--base-model", dest="model", required=True, help="base model spec, e.g. hf:DIR"
    )
    p.add_argument("--benchmark", required=True, help="benchmark whose training split is used")
    p.add_argument(
        "--root",
        required=True,
        type=cli_root,
        help="the benchmark's data folder, or hf://datasets/OWNER/NAME[@REV] from the local HF cache",
    )
    p.add_argument("--split", default="train", help="training split (never test) (default: train)")
    p.add_argument(
        "--fraction", type=float, default=1.0, help="labeled-data fraction in (0, 1] (default: 1.0)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the fraction and of training (default: 0)")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--preset", default="", help="named trainer settings, e.g. phantom, paper (default: none)")
    p.add_argument(
        "--config", default="", help="TOML file with the trainer's settings (a [trainer] table or top level)"
    )
    p.add_argument(
        "--captions", default="", help="align: JSONL of {image, caption} (default: the benchmark's)"
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--show-config", action="store_true", help="print the resolved trainer settings and exit")
    p.add_argument("--force", action="store_true", help="retrain even if OUT holds a finished checkpoint")
    add_trainer_flags(p, _builtin_config_classes())
    add_expert_flags(p)
    p.set_defaults(func=run)


def _caption_samples(args: argparse.Namespace, bench: Any) -> list[Any]:
    """Caption records as VQASamples (question = the describe-instruction, answer = the caption)."""
    from medvqa.errors import BadInput
    from medvqa.io import iter_jsonl
    from medvqa.trainers.align import caption_samples

    records = []
    if args.captions:
        path = Path(args.captions)
        for lineno, rec in iter_jsonl(path):
            for key in ("image", "caption"):
                if not isinstance(rec, dict) or key not in rec:
                    raise BadInput("missing field", path=path, record=f"line {lineno}", field=key)
            image = Path(rec["image"])
            image = image if image.is_absolute() else (path.parent / image)
            records.append(
                {
                    "image_id": rec.get("image_id") or str(image),
                    "image": str(image),
                    "caption": rec["caption"],
                }
            )
    elif bench.has_captions:
        records = bench.load_captions(args.root, args.split)
    else:
        raise BadInput(
            f"the align trainer needs captions: benchmark {args.benchmark!r} has none; pass --captions FILE"
        )
    return caption_samples(records, benchmark=args.benchmark, split=args.split)


def _refuse_other_settings(out: Path, changed: list[str]) -> None:
    from medvqa.errors import BadInput

    if changed:
        raise BadInput(
            "holds a finished checkpoint trained with other settings or data (" + "; ".join(changed) + "); "
            "pass --force to retrain it, or another --out",
            path=out,
        )


def _changed_since(meta: dict[str, Any], trainer: str, cfg: Any, args: argparse.Namespace) -> list[str]:
    """What differs between a finished checkpoint's `checkpoint.json` and this command (trainer,
    seed, fraction, base model, config fields), as "name: was → now"; fields one side does not
    record are not compared."""
    import json

    now = {"trainer": trainer, "seed": args.seed, "fraction": args.fraction, "base_model": args.model}
    changed = [f"{k}: {meta[k]!r} → {v!r}" for k, v in now.items() if k in meta and meta[k] != v]
    was = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    asked = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    changed += [f"{k}: {was[k]!r} → {v!r}" for k, v in asked.items() if k in was and was[k] != v]
    return changed


def run(args: argparse.Namespace) -> int:
    import json

    from medvqa.errors import BadInput
    from medvqa.fractions import check_fraction, check_seed, fraction_request
    from medvqa.io import read_json
    from medvqa.registry import benchmarks, trainers

    check_seed(args.seed, "--seed")
    check_fraction(args.fraction, "--fraction")
    trainer_cls = trainers.get(args.trainer)
    if not hasattr(trainer_cls, "config_class"):
        raise BadInput(f"trainer {args.trainer!r} declares no config_class")
    cfg = resolve_config(trainer_cls, args)
    bench = benchmarks.get(args.benchmark)()
    if not cfg.prompt_policy:
        cfg = dataclasses.replace(cfg, prompt_policy=bench.prompt_policy)
    if args.show_config:
        print(json.dumps(dataclasses.asdict(cfg), indent=2))
        return 0
    if args.split == "test":
        raise BadInput("--split test: trainers never train on test data")
    out = Path(args.out)
    finished = (
        read_json(out / "checkpoint.json") if (out / "checkpoint.json").is_file() and not args.force else None
    )
    if finished is not None:
        _refuse_other_settings(out, _changed_since(finished, trainer_cls.name, cfg, args))

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    if trainer_cls.trains_on == "captions":
        samples = _caption_samples(args, bench)
    else:
        samples = bench.load(args.split, Path(args.root))
    if not samples:
        raise BadInput(f"no training samples in {args.benchmark} split {args.split!r}", path=args.root)
    root = Path(args.root)
    request = fraction_request(
        samples,
        args.fraction,
        args.seed,
        base_model=args.model,
        out_dir=out,
        config=cfg,
        data_root=str(root.resolve()) if root.is_dir() else "",
    )
    if finished is not None:  # the same settings: the same data too? (the labeled fraction's manifest)
        recorded = finished.get("manifest_hash")
        if recorded not in (None, request.manifest_hash):
            _refuse_other_settings(out, [f"manifest_hash: {recorded!r} → {request.manifest_hash!r}"])
        print(f"{out} already holds a finished checkpoint of these settings (pass --force to retrain)")
        return 0
    chosen, unlabeled = request.train_samples, request.unlabeled_images
    print(
        f"train {args.trainer}: {len(chosen)} of {len(samples)} {args.benchmark}/{args.split} samples "
        f"(fraction {args.fraction:g}, seed {args.seed}, manifest {request.manifest_hash}), "
        f"{len(unlabeled)} unlabeled images → {out}",
        flush=True,
    )
    checkpoint = trainer_cls().train(request)
    meta = checkpoint.meta
    summary = {k: meta.get(k) for k in ("trainer", "n_labeled", "n_pairs", "loss") if k in meta}
    print(f"wrote {checkpoint.path} {json.dumps(summary)}; evaluate with --model {checkpoint.model_spec}")
    return 0
