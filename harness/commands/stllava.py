"""`medvqa stllava questions|answers|judge|pairs|dpo`: STLLaVA-Med's stage 2, one step at a time.

Each step reads and writes explicit files, so that any step can be inspected, rerun or replaced
(e.g. judged with GPT-4o on another machine). Every step is resumable: rerun the same command
after a kill and only the missing items are done. `medvqa train --trainer stllava-med` runs stage 1
and all of these in one go (artifacts in OUT/stages/).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ORDER = 51

STEPS = {
    "questions": "sample k questions per unlabeled image from the stage-1 model → questions.jsonl",
    "answers": "sample n answers per (distinct) question → answers.jsonl",
    "judge": "score each question's n answers with an expert (phantom, openai, model, ...) → judged.jsonl",
    "pairs": "chosen = most common best answer, rejected = most common worst (margin, cap per question); "
    "ties skipped (or --tie-policy second); optional labeled replay rows → pairs.jsonl",
    "dpo": "trl DPOTrainer on the pairs; the reference is the --model (stage-1) folder → checkpoint",
}


def _config_cls() -> type:
    from medvqa.trainers.stllava_med import STLLaVAMedConfig

    return STLLaVAMedConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    from medvqa.commands.train import add_expert_flags, add_trainer_flags

    p = sub.add_parser(
        "stllava",
        help="STLLaVA-Med self-training steps one by one (questions, answers, judge, pairs, dpo)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ssub = p.add_subparsers(title="steps", metavar="STEP")
    for step, help_text in STEPS.items():
        s = ssub.add_parser(step, help=help_text, description=help_text)
        s.add_argument("--out", required=True, help="output file (a folder for dpo)")
        s.add_argument("--preset", default="", help="named settings: paper, phantom (default: the paper's)")
        s.add_argument("--seed", type=int, default=0, help="sampling / training seed (default: 0)")
        if step == "questions":
            s.add_argument(
                "--model",
                required=True,
                help="the stage-1 model that asks, e.g. hf:OUT/stages/stage1 (hf:OUT/stages/stage1-asker "
                "with sq_schedule 'separate')",
            )
        if step in ("answers", "dpo"):
            s.add_argument("--model", required=True, help="the stage-1 model spec, e.g. hf:OUT/stages/stage1")
        if step == "questions":
            s.add_argument(
                "--images", default="", help="file of image paths (one per line, or JSONL with 'image')"
            )
            s.add_argument("--benchmark", default="", help="…or the training images of a benchmark")
            s.add_argument("--root", default="", help="its data folder, or hf://datasets/OWNER/NAME[@REV]")
            s.add_argument("--split", default="train", help="its split (never test) (default: train)")
            s.add_argument(
                "--fraction",
                type=float,
                default=1.0,
                help="with --benchmark: use the images OUTSIDE this labeled fraction (1.0 = all images)",
            )
        if step == "answers":
            s.add_argument("--questions", required=True, help="questions.jsonl")
        if step == "judge":
            s.add_argument("--answers", required=True, help="answers.jsonl")
            s.add_argument(
                "--base-url", default=None, help="OpenAI-compatible endpoint (= --expert-base-url)"
            )
            s.add_argument(
                "--root",
                default="",
                help="the data folder the judged images lie in (phantom: its scenes, default from the "
                "paths; openai: the only folder images are uploaded from, required)",
            )
            s.add_argument(
                "--samples-file", default="", help="reference expert: held-out TRAINING samples JSONL"
            )
            s.add_argument(
                "--cache", default="", help="judgment cache (default: judge-cache.sqlite beside --out)"
            )
        if step == "pairs":
            s.add_argument("--judged", required=True, help="judged.jsonl")
            s.add_argument(
                "--replay-benchmark",
                default="",
                help="with --labeled-replay: the benchmark whose labeled fraction is replayed",
            )
            s.add_argument(
                "--replay-root", default="", help="its data folder, or hf://datasets/OWNER/NAME[@REV]"
            )
            s.add_argument(
                "--replay-fraction", type=float, default=1.0, help="its labeled fraction (seeded by --seed)"
            )
        if step == "dpo":
            s.add_argument("--pairs", required=True, help="pairs.jsonl")
        add_trainer_flags(s, [_config_cls()])
        add_expert_flags(s)
        s.set_defaults(func=run, step=step, trainer="stllava-med", config="")


def _images_from(args: argparse.Namespace) -> list[str]:
    from medvqa.errors import BadInput

    if args.images:
        path = Path(args.images)
        if not path.is_file():
            raise BadInput("file not found", path=path)
        out = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            line = line.strip()
            if not line:
                continue
            if line.startswith("{"):
                try:
                    line = json.loads(line)["image"]
                except (ValueError, KeyError, TypeError):
                    raise BadInput(
                        "expected a JSON object with 'image'", path=path, record=f"line {lineno}"
                    ) from None
            image = Path(line)
            out.append(str(image if image.is_absolute() else path.parent / image))
        return out
    if args.benchmark:
        from medvqa.benchmarks.hub import resolve_root
        from medvqa.fractions import select_fraction
        from medvqa.registry import benchmarks

        if args.split == "test":
            raise BadInput("--split test: self-training never uses test images")
        samples = benchmarks.get(args.benchmark)().load(args.split, resolve_root(args.root).path)
        labeled = (
            {s.image_id for s in select_fraction(samples, args.fraction, args.seed)}
            if args.fraction < 1
            else set()
        )
        return sorted(dict.fromkeys(str(s.image) for s in samples if s.image_id not in labeled))
    raise BadInput("questions: give --images FILE or --benchmark NAME --root DIR")


def _dist(cfg: Any) -> Any:
    """Ranks of an `accelerate launch` (the step's items are sharded across them), else one process."""
    from medvqa.distributed import Dist

    return Dist.current(cfg.dist_timeout_s)


def _replay_samples(args: argparse.Namespace) -> list[Any]:
    """The labeled fraction of --replay-benchmark (the same seeded, nested selection training uses)."""
    from medvqa.benchmarks.hub import resolve_root
    from medvqa.errors import BadInput
    from medvqa.fractions import select_fraction
    from medvqa.registry import benchmarks

    if not args.replay_benchmark:
        raise BadInput(
            "--labeled-replay needs --replay-benchmark NAME --replay-root DIR [--replay-fraction F]"
        )
    samples = benchmarks.get(args.replay_benchmark)().load("train", resolve_root(args.replay_root).path)
    return select_fraction(samples, args.replay_fraction, args.seed)


def run(args: argparse.Namespace) -> int:
    from medvqa.commands.train import resolve_config
    from medvqa.fractions import check_seed
    from medvqa.io import atomic_write_json
    from medvqa.trainers import stllava_med as st

    check_seed(args.seed, "--seed")
    if getattr(args, "base_url", None):
        args.cfg_expert_options = {**(args.cfg_expert_options or {}), "base_url": args.base_url}
    cfg = resolve_config(st.STLLaVAMedTrainer, args)
    out = Path(args.out)
    result: dict[str, Any]
    if args.step == "questions":
        images = st.unlabeled_pool(_images_from(args), cfg, args.seed)
        generator = st.load_generator(args.model)
        result = st.generate_questions(
            generator, images, out, cfg, seed=args.seed, policy=cfg.prompt_policy, dist=_dist(cfg)
        )
    elif args.step == "answers":
        generator = st.load_generator(args.model)
        result = st.generate_answers(
            generator,
            Path(args.questions),
            out,
            cfg,
            seed=args.seed,
            policy=cfg.prompt_policy,
            dist=_dist(cfg),
        )
    elif args.step == "judge":
        expert = st.build_expert(
            cfg.expert,
            cache_path=args.cache or cfg.judge_cache or out.parent / "judge-cache.sqlite",
            root=args.root,
            samples_file=args.samples_file,
            seed=args.seed,
            options=cfg.expert_options,
        )
        result = st.judge_answers(Path(args.answers), out, expert, dist=_dist(cfg))
        if hasattr(expert, "counts"):
            result["expert"] = expert.counts()
    elif args.step == "pairs":
        result = st.make_pairs(
            Path(args.judged),
            out,
            cfg.tie_policy,
            min_margin=cfg.pair_min_margin,
            per_question=cfg.pairs_per_question,
            replay=_replay_samples(args) if cfg.labeled_replay else (),
        )
    else:
        result = _run_dpo(args, cfg, out)
    if _dist(cfg).main:  # one summary per run, not one per rank
        print(json.dumps({"step": args.step, "out": str(out), **result}, default=str))
        if args.step != "dpo":
            atomic_write_json(out.with_name(out.name + ".counts.json"), result)
    return 0


def _run_dpo(args: argparse.Namespace, cfg: Any, out: Path) -> dict[str, Any]:
    """DPO on explicit pairs; the checkpoint records the stage-1 checkpoint's data provenance."""
    from medvqa.errors import BadInput
    from medvqa.io import read_json
    from medvqa.trainers import stllava_med as st
    from medvqa.trainers.checkpoints import checkpoint_meta, read_checkpoint, write_checkpoint
    from medvqa.trainers.models import spec_path
    from medvqa.types import TrainRequest

    stage1 = Path(spec_path(args.model))
    if not stage1.is_dir():
        raise BadInput("--model must be a local stage-1 model folder (the DPO reference)", path=stage1)
    if (out / "checkpoint.json").is_file():
        print(f"{out} already holds a finished checkpoint")
        return read_json(out / "checkpoint.json").get("dpo", {})
    s1 = read_checkpoint(stage1) or {}
    dpo = st.train_dpo(stage1, Path(args.pairs), out, cfg, seed=args.seed)
    provenance = TrainRequest(  # the stage-1 checkpoint's data provenance, not this command's
        base_model=s1.get("base_model", ""),
        train_samples=(),
        out_dir=out,
        seed=s1.get("seed", args.seed),
        fraction=s1.get("fraction"),
        manifest_hash=s1.get("manifest_hash", ""),
    )
    meta = checkpoint_meta(
        trainer="stllava-med",
        request=provenance,
        config=cfg,
        n_labeled=s1.get("n_labeled", 0),
        n_pairs=dpo["n_pairs"],
        loss=cfg.dpo_loss,
        dpo=dpo,
        stage1=str(stage1),
        reference=f"stage 1 ({stage1})",
        pairs_file=str(args.pairs),
    )
    write_checkpoint(out, meta)
    return dpo
