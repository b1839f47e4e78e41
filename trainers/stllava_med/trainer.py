"""The registered `stllava-med` trainer: stage 1, then the stage-2 files, then DPO, in one run."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from medvqa.distributed import Dist
from medvqa.errors import BadInput
from medvqa.registry import trainers
from medvqa.trainers.base import TrainerPlugin
from medvqa.trainers.stllava_med.answers import generate_answers
from medvqa.trainers.stllava_med.config import STAGE_FILES, STLLAVA_PRESETS, STLLaVAMedConfig
from medvqa.trainers.stllava_med.dpo import train_dpo
from medvqa.trainers.stllava_med.judging import build_expert, judge_answers
from medvqa.trainers.stllava_med.pairs import make_pairs
from medvqa.trainers.stllava_med.questions import generate_questions, unlabeled_pool
from medvqa.trainers.stllava_med.stage1 import check_answering_model, question_model, train_stage1
from medvqa.trainers.stllava_med.stagecache import open_entry
from medvqa.trainers.stllava_med.stagefiles import read_rows
from medvqa.types import Checkpoint, TrainRequest

log = logging.getLogger("medvqa.train")


def load_generator(model_spec: str) -> Any:
    from medvqa.models import load_model

    return load_model(model_spec)


def parseable_share(questions_path: Path, expert: Any) -> float | None:
    """Share of generated questions the expert can place in a category (None if it has no categories)."""
    category = getattr(expert, "category", None)
    rows = read_rows(questions_path)
    if category is None or not rows:
        return None
    return round(sum(category(r["question"]) is not None for r in rows) / len(rows), 4)


def sample_stages(
    request: TrainRequest,
    cfg: STLLaVAMedConfig,
    images: list[str],
    stage1: Path,
    files: dict[str, Path],
    plog: Path,
    dist: Dist,
) -> dict[str, Any]:
    """Stage 1, then the sampled questions (from its asker) and answers (from its answering model):
    the part two runs can share (`stagecache`)."""
    train_stage1(request, cfg, stage1, log_path=plog)  # every rank: trl trains data-parallel
    dist.barrier()
    asker = question_model(stage1, cfg)
    generator = load_generator(f"hf:{asker}")
    counts: dict[str, Any] = {}
    counts.update(
        generate_questions(generator, images, files["questions"], cfg, seed=request.seed,
                           progress_log=plog, dist=dist)
    )  # fmt: skip
    if asker != stage1:  # one model in memory at a time
        del generator
        generator = load_generator(f"hf:{stage1}")
    counts.update(
        generate_answers(generator, files["questions"], files["answers"], cfg, seed=request.seed,
                         progress_log=plog, dist=dist)
    )  # fmt: skip
    return counts


@trainers.register("stllava-med")
class STLLaVAMedTrainer(TrainerPlugin):
    """STLLaVA-Med: SFT + self-questioning, then expert-judged preference pairs and DPO."""

    name = "stllava-med"
    config_class = STLLaVAMedConfig
    presets = STLLAVA_PRESETS

    def train(self, request: TrainRequest) -> Checkpoint:
        from medvqa.io import atomic_write_json, read_json
        from medvqa.trainers.checkpoints import checkpoint_meta, policy_name, write_checkpoint

        cfg = self._config(request)
        if not request.unlabeled_images:
            raise BadInput(
                "stllava-med needs unlabeled images for stage 2 (none were given; with --fraction 1.0 every "
                "training image is labeled)"
            )
        if cfg.answering_model:  # before the stage cache reads its files: a wrong one is named first
            check_answering_model(request, cfg)
        dist = Dist.current(cfg.dist_timeout_s)
        out = Path(request.out_dir)
        stages = out / "stages"
        stages.mkdir(parents=True, exist_ok=True)
        files = {k: stages / v for k, v in STAGE_FILES.items()}
        plog = out / "train_log.jsonl"

        images = unlabeled_pool(request.unlabeled_images, cfg, request.seed)
        cache: dict[str, Any] | None = None
        if cfg.stage_cache:
            with open_entry(Path(cfg.stage_cache), request, cfg, images, dist) as entry:
                if not entry.reused:
                    entry.finish(
                        sample_stages(request, cfg, images, entry.stage1, entry.files, plog, dist), dist
                    )
            stage1, counts, cache = entry.stage1, dict(entry.counts), entry.record()
            files.update(entry.files)  # questions and answers from the entry; judged and pairs stay here
        else:
            stage1 = stages / "stage1"
            counts = sample_stages(request, cfg, images, stage1, files, plog, dist)
        expert = build_expert(
            cfg.expert,
            cache_path=cfg.judge_cache or stages / "judge-cache.sqlite",
            heldout_samples=request.heldout_samples,
            image_root=request.data_root,  # the openai judge uploads only images inside it
            seed=request.seed,
            options=cfg.expert_options,
        )
        judge_answers(files["answers"], files["judged"], expert, progress_log=plog, dist=dist)
        if dist.main:
            counts["parseable_questions"] = parseable_share(files["questions"], expert)
            counts.update(
                make_pairs(
                    files["judged"],
                    files["pairs"],
                    cfg.tie_policy,
                    min_margin=cfg.pair_min_margin,
                    per_question=cfg.pairs_per_question,
                    replay=request.train_samples if cfg.labeled_replay else (),
                )
            )
            if hasattr(expert, "agreement") and request.heldout_samples:
                counts["judge"] = expert.agreement(request.heldout_samples)
            log.info("stllava-med: %s", ", ".join(f"{k}={v}" for k, v in counts.items() if v is not None))
            atomic_write_json(stages / "counts.json", counts)
        dist.barrier()
        counts = read_json(stages / "counts.json")

        dpo = train_dpo(
            stage1,
            files["pairs"],
            out,
            cfg,
            seed=request.seed,
            work_dir=stages / "_trl" / "dpo",
            log_path=plog,
        )
        meta = checkpoint_meta(
            trainer=self.name,
            request=request,
            config=cfg,
            n_labeled=len(request.train_samples),
            n_pairs=counts["pairs"],
            loss=cfg.dpo_loss,
            counts=counts,
            dpo=dpo,
            stage1=str(stage1),
            reference=f"stage 1 (explicit ref_model loaded from {'stages/stage1' if cache is None else stage1})"
            if not cfg.use_lora
            else "stage 1 (adapter-disabled policy)",
            prompt_policy=policy_name(cfg.prompt_policy),
            adapter=cfg.use_lora,
            **({} if cache is None else {"stage_cache": cache}),
        )
        write_checkpoint(out, meta)  # main process only
        return Checkpoint(path=out, meta=meta)
