"""`stllava-med`: STLLaVA-Med self-training (Sun et al., EMNLP 2024, arXiv 2406.19973).

Stage 1, reasoning and learning to ask: SFT on the labeled fraction, where each sample, with
probability `sq_ratio`, also yields a visual self-questioning example (image + ask-instruction →
the question itself).

Stage 2, preference revelation, on a pool of unlabeled images, one resumable JSONL artifact per
step in `<out>/stages/`:

    questions.jsonl  {id, image, question}                 k per image, T=1.2, top-p 0.95
    answers.jsonl    {id, image, question, answer_type, answers: [a1, a2]}   two samples, T=1.2
    judged.jsonl     ... + scores: [s1, s2]  or  skipped: reason          the expert (registry)
    pairs.jsonl      {id, image, prompt, answer_type, chosen, rejected, scores}
    dpo              trl DPOTrainer, reference = the stage-1 model, loaded explicitly

A stage killed mid-way resumes without redoing finished items (rows are appended and flushed per
batch; a torn last line is dropped). Each step also runs alone: `medvqa stllava questions|answers|
judge|pairs|dpo` on explicit files.

Two named settings (`presets`): "paper" — the paper's DPO (sigmoid loss, β = 0.1, 1 epoch, k = 5,
T = 1.2) — and "phantom" — what a CPU prototype found to help on Phantom (DPO plus an SFT term on
the chosen answer, trl `loss_type=["sigmoid", "sft"]`, lr 5e-4, 10 epochs, k = 8, T = 1.0).
`checkpoint.json` records which loss produced the checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from medvqa.errors import BadInput
from medvqa.registry import trainers
from medvqa.trainers.base import TrainerPlugin
from medvqa.trainers.config import TrainConfig
from medvqa.types import Checkpoint, TrainRequest, stable_hash

log = logging.getLogger("medvqa.train")

ASK_INSTRUCTION = "Ask a question about this image."
STAGE_FILES = {
    "questions": "questions.jsonl",
    "answers": "answers.jsonl",
    "judged": "judged.jsonl",
    "pairs": "pairs.jsonl",
}
DPO_LOSSES = {"sigmoid": ["sigmoid"], "sigmoid+sft": ["sigmoid", "sft"]}


@dataclass
class STLLaVAMedConfig(TrainConfig):
    """STLLaVA-Med knobs. The optimisation fields of `TrainConfig` are stage 1's; `dpo_*` are DPO's.

    Defaults are the paper's setting where the paper states it (sq_ratio 0.5, k = 5 questions,
    T = 1.2 / top-p 0.95, two answers, sigmoid DPO with β = 0.1 for 1 epoch, reference = stage 1);
    learning rates it does not state are trl's defaults.
    """

    # stage 1
    sq_ratio: float = field(
        default=0.5,
        metadata={"help": "probability that a labeled sample also yields a self-questioning example"},
    )
    ask_instruction: str = field(
        default=ASK_INSTRUCTION,
        metadata={"help": "instruction that asks the model for a question about the image"},
    )
    # stage 2: questions and answers
    k_questions: int = field(default=5, metadata={"help": "questions sampled per unlabeled image"})
    question_temperature: float = field(
        default=1.2, metadata={"help": "sampling temperature of the questions"}
    )
    question_top_p: float = field(default=0.95, metadata={"help": "nucleus top-p of the questions"})
    question_max_new_tokens: int = field(default=32, metadata={"help": "longest question in tokens"})
    answer_temperature: float = field(
        default=1.2, metadata={"help": "sampling temperature of the two answers"}
    )
    answer_top_p: float = field(default=0.95, metadata={"help": "nucleus top-p of the answers"})
    answer_max_new_tokens: int = field(default=16, metadata={"help": "longest answer in tokens"})
    generation_batch_size: int = field(default=64, metadata={"help": "images/questions per generate() call"})
    max_unlabeled_images: int = field(
        default=0, metadata={"help": "use at most this many unlabeled images (seeded sample); 0 = all"}
    )
    # judge and pairs
    expert: str = field(default="phantom", metadata={"help": "the judge: a name in `medvqa experts`"})
    expert_model: str = field(default="", metadata={"help": "the judge model (openai expert), e.g. gpt-4o"})
    expert_base_url: str = field(default="", metadata={"help": "OpenAI-compatible endpoint (openai expert)"})
    judge_cache: str = field(
        default="", metadata={"help": "judgment cache file (openai expert); empty = beside judged.jsonl"}
    )
    tie_policy: Literal["skip", "second"] = field(
        default="skip",
        metadata={
            "help": "equal scores: skip the pair, or 'second' = keep answer 2 as chosen (the reference code)"
        },
    )
    # DPO
    dpo_loss: Literal["sigmoid", "sigmoid+sft"] = field(
        default="sigmoid",
        metadata={"help": "'sigmoid' = the paper's DPO; 'sigmoid+sft' adds an SFT term on the chosen answer"},
    )
    beta: float = field(default=0.1, metadata={"help": "DPO beta"})
    dpo_learning_rate: float = field(default=1e-6, metadata={"help": "DPO learning rate (trl's default)"})
    dpo_num_train_epochs: float = field(default=1.0, metadata={"help": "DPO epochs over the pairs"})
    dpo_max_steps: int = field(default=-1, metadata={"help": "DPO steps; -1 = use dpo_num_train_epochs"})
    dpo_batch_size: int = field(default=32, metadata={"help": "DPO pairs per device batch"})
    dpo_lr_scheduler_type: str = field(default="linear", metadata={"help": "DPO scheduler (trl's default)"})


STLLAVA_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    # PHANTOM-NOTES: stage 1 ~1,500 steps at lr 1e-3 (batch 32); k = 8 questions (k = 4 gave too few
    # pairs); T = 1.0 (95% parseable questions, ~29% usable pairs); plain sigmoid DPO was neutral or
    # harmful, DPO + SFT term at lr 5e-4 over ~10 epochs helped closed accuracy.
    "phantom": {
        "learning_rate": 1e-3,
        "max_steps": 1500,
        "warmup_ratio": 0.0,
        "logging_steps": 100,
        "k_questions": 8,
        "question_temperature": 1.0,
        "answer_temperature": 1.0,
        "generation_batch_size": 128,
        "dpo_loss": "sigmoid+sft",
        "dpo_learning_rate": 5e-4,
        "dpo_num_train_epochs": 10.0,
        "dpo_lr_scheduler_type": "cosine",
    },
}


def _seed_for(*parts: Any) -> int:
    return int(stable_hash(list(parts), 8), 16) % (2**31 - 1)


def _progress(log_path: Path | None, stage: str, done: int, total: int) -> None:
    """A `train_log.jsonl` row for the sweep's heartbeat (stage, step, max_steps)."""
    if log_path is None:
        return
    from medvqa.io import JsonlAppender

    with JsonlAppender(log_path) as out:
        out.write([{"stage": stage, "step": done, "max_steps": total}])


def _done_ids(path: Path) -> set[str]:
    from medvqa.io import iter_jsonl

    if not path.is_file():
        return set()
    return {str(row["id"]) for _, row in iter_jsonl(path, allow_truncated_tail=True) if "id" in row}


def _read_rows(path: Path) -> list[dict[str, Any]]:
    from medvqa.io import read_jsonl

    return read_jsonl(path, allow_truncated_tail=True)


def _require(row: Mapping[str, Any], keys: Sequence[str], path: Path, lineno: int) -> None:
    for key in keys:
        if key not in row:
            raise BadInput("missing field", path=path, record=f"line {lineno}", field=key)


def _iter_checked(path: Path, keys: Sequence[str]) -> list[dict[str, Any]]:
    from medvqa.io import iter_jsonl

    out = []
    for lineno, row in iter_jsonl(path, allow_truncated_tail=True):
        if not isinstance(row, dict):
            raise BadInput("expected a JSON object", path=path, record=f"line {lineno}")
        _require(row, keys, path, lineno)
        out.append(row)
    return out


# --- stage 1 ---------------------------------------------------------------------------------


def stage1_rows(samples: Sequence[Any], builder: Any, cfg: STLLaVAMedConfig, seed: int) -> list[dict]:
    """QA rows for every labeled sample, plus (with probability sq_ratio) its self-questioning row."""
    rng = random.Random(_seed_for("sq", seed))
    rows = []
    for s in samples:
        rows.append(builder.qa_row(s.image, s.question, s.prompt_answer_type, s.answer, kind="qa"))
        if rng.random() < cfg.sq_ratio:
            rows.append(builder.instruction_row(s.image, cfg.ask_instruction, s.question, kind="ask"))
    return rows


def train_stage1(
    request: TrainRequest, cfg: STLLaVAMedConfig, stage_dir: Path, *, log_path: Path | None = None
) -> dict[str, Any]:
    """Stage 1 → a full model in `stage_dir` (skipped if already finished there)."""
    from medvqa.trainers.checkpoints import checkpoint_meta, read_checkpoint, save_model, write_checkpoint
    from medvqa.trainers.models import load_model_and_processor
    from medvqa.trainers.rows import RowBuilder
    from medvqa.trainers.trl_run import drop_trl_checkpoints, fit_sft, seed_everything

    done = read_checkpoint(stage_dir)
    if done is not None:
        log.info("stage 1 already done: %s", stage_dir)
        return done
    seed_everything(request.seed)
    model, processor = load_model_and_processor(request.base_model)
    builder = RowBuilder(processor, cfg.prompt_policy)
    rows = stage1_rows(request.train_samples, builder, cfg, request.seed)
    n_ask = sum(r["kind"] == "ask" for r in rows)
    model = fit_sft(
        model,
        processor,
        rows,
        cfg,
        work_dir=stage_dir.parent / "_trl" / "stage1",
        log_path=log_path or stage_dir / "train_log.jsonl",
        seed=request.seed,
        stage="stage1",
        merge_lora=True,
    )
    save_model(model, processor, stage_dir)
    drop_trl_checkpoints(stage_dir.parent / "_trl" / "stage1")
    meta = checkpoint_meta(
        trainer="stllava-med/stage1",
        request=request,
        config=cfg,
        n_labeled=len(request.train_samples),
        loss="nll (completion only)",
        n_self_questioning=n_ask,
        prompt_policy=builder.policy.name,
    )
    write_checkpoint(stage_dir, meta)
    return meta


# --- stage 2: generation ---------------------------------------------------------------------


def unlabeled_pool(images: Sequence[str], cfg: STLLaVAMedConfig, seed: int) -> list[str]:
    pool = sorted(dict.fromkeys(str(i) for i in images))
    if cfg.max_unlabeled_images and len(pool) > cfg.max_unlabeled_images:
        pool = sorted(random.Random(_seed_for("pool", seed)).sample(pool, cfg.max_unlabeled_images))
    return pool


def _image_key(image: str) -> str:
    return Path(image).stem


def _load_generator(model_spec: str) -> Any:
    from medvqa.models import load_model

    return load_model(model_spec)


def generate_questions(
    generator: Any,
    images: Sequence[str],
    out_path: Path,
    cfg: STLLaVAMedConfig,
    *,
    seed: int,
    policy: str = "",
    progress_log: Path | None = None,
) -> dict[str, int]:
    """k sampled questions per image → `questions.jsonl` (resumes: finished images are skipped)."""
    from medvqa.io import JsonlAppender
    from medvqa.trainers.rows import RowBuilder
    from medvqa.types import GenerationRequest, GenerationSettings

    builder = RowBuilder(generator.processor, policy)
    prompt, _ = builder.raw_prompt(cfg.ask_instruction)
    done = _done_ids(out_path)
    todo = [
        (img, j) for img in images for j in range(cfg.k_questions) if f"{_image_key(img)}-q{j}" not in done
    ]
    log.info("questions: %d images, %d to generate (%d done)", len(images), len(todo), len(done))
    bs = max(1, cfg.generation_batch_size)
    with JsonlAppender(out_path) as out:
        for start in range(0, len(todo), bs):
            chunk = todo[start : start + bs]
            settings = GenerationSettings(
                max_new_tokens=cfg.question_max_new_tokens,
                do_sample=True,
                temperature=cfg.question_temperature,
                top_p=cfg.question_top_p,
                seed=_seed_for("questions", seed, _image_key(chunk[0][0]), chunk[0][1]),
            )
            texts = generator.generate(
                [GenerationRequest(image=img, prompt=prompt) for img, _ in chunk], settings
            )
            out.write(
                {"id": f"{_image_key(img)}-q{j}", "image": img, "question": q.strip()}
                for (img, j), q in zip(chunk, texts, strict=True)
            )
            _progress(progress_log, "questions", len(done) + start + len(chunk), len(done) + len(todo))
    return {"images": len(images), "questions": len(done) + len(todo)}


def generate_answers(
    generator: Any,
    questions_path: Path,
    out_path: Path,
    cfg: STLLaVAMedConfig,
    *,
    seed: int,
    policy: str = "",
    progress_log: Path | None = None,
) -> dict[str, int]:
    """Two sampled answers (different seeds) per question → `answers.jsonl` (resumable)."""
    from medvqa.io import JsonlAppender
    from medvqa.trainers.rows import RowBuilder, guess_answer_type
    from medvqa.types import GenerationRequest, GenerationSettings

    builder = RowBuilder(generator.processor, policy)
    questions = _iter_checked(questions_path, ("id", "image", "question"))
    done = _done_ids(out_path)
    todo = [q for q in questions if str(q["id"]) not in done]
    log.info("answers: %d questions, %d to answer", len(questions), len(todo))
    empty = [q for q in todo if not q["question"].strip()]
    todo = [q for q in todo if q["question"].strip()]
    bs = max(1, cfg.generation_batch_size)
    with JsonlAppender(out_path) as out:
        if empty:
            out.write({**q, "answers": [], "skipped": "empty question"} for q in empty)
        for start in range(0, len(todo), bs):
            chunk = todo[start : start + bs]
            types = [guess_answer_type(q["question"]) for q in chunk]
            requests = [
                GenerationRequest(image=q["image"], prompt=builder.prompt(q["question"], t)[0])
                for q, t in zip(chunk, types, strict=True)
            ]
            both = []
            for which in (1, 2):
                settings = GenerationSettings(
                    max_new_tokens=cfg.answer_max_new_tokens,
                    do_sample=True,
                    temperature=cfg.answer_temperature,
                    top_p=cfg.answer_top_p,
                    seed=_seed_for("answers", seed, chunk[0]["id"], which),
                )
                both.append(generator.generate(requests, settings))
            out.write(
                {
                    "id": q["id"],
                    "image": q["image"],
                    "question": q["question"],
                    "answer_type": t,
                    "answers": [a1.strip(), a2.strip()],
                }
                for q, t, a1, a2 in zip(chunk, types, both[0], both[1], strict=True)
            )
            _progress(progress_log, "answers", start + len(chunk), len(todo))
    return {"questions": len(questions), "answered": len(questions) - len(empty)}


# --- stage 2: judge and pairs ----------------------------------------------------------------


def build_expert(
    name: str,
    *,
    model: str = "",
    base_url: str = "",
    cache_path: str | Path | None = None,
    root: str = "",
    heldout_samples: Sequence[Any] = (),
    samples_file: str = "",
) -> Any:
    """An expert from the registry, configured from the options that its config class has."""
    from medvqa.registry import experts

    cls = experts.get(name)
    config_cls = getattr(cls, "config_class", None)
    options = {
        "model": model,
        "base_url": base_url,
        "cache_path": str(cache_path) if cache_path else "",
        "root": root,
        "samples_file": samples_file,
    }
    kwargs: dict[str, Any] = {}
    if name == "reference" and heldout_samples and not samples_file:
        kwargs["samples"] = list(heldout_samples)
    if config_cls is None:
        return cls(**kwargs)
    known = {f.name for f in dataclasses.fields(config_cls)}
    given = {k: v for k, v in options.items() if v and k in known}
    return cls(config_cls(**given), **kwargs)


def judge_answers(
    answers_path: Path,
    out_path: Path,
    expert: Any,
    *,
    chunk_size: int = 256,
    progress_log: Path | None = None,
) -> dict[str, int]:
    """Score each answer pair with the expert → `judged.jsonl` (resumable; judged rows are kept)."""
    from medvqa.io import JsonlAppender

    rows = _iter_checked(answers_path, ("id", "image", "question", "answers"))
    done = _done_ids(out_path)
    todo = [r for r in rows if str(r["id"]) not in done]
    log.info("judge: %d answer pairs, %d to judge", len(rows), len(todo))
    n_failed = 0
    with JsonlAppender(out_path) as out:
        skipped_before = [r for r in todo if r.get("skipped")]
        if skipped_before:
            out.write(skipped_before)
        todo = [r for r in todo if not r.get("skipped")]
        for start in range(0, len(todo), chunk_size):
            chunk = todo[start : start + chunk_size]
            items = [(r["image"], r["question"], list(r["answers"])) for r in chunk]
            if hasattr(expert, "judge_many_detailed"):
                results = expert.judge_many_detailed(items)
                outcomes = [(j.scores, j.skipped or "unjudgeable", j.status == "failed") for j in results]
            elif hasattr(expert, "judge_many"):
                outcomes = [(s, "unjudgeable", False) for s in expert.judge_many(items)]
            else:
                outcomes = [(expert.judge(*it), "unjudgeable", False) for it in items]
            judged = []
            for r, (scores, reason, failed) in zip(chunk, outcomes, strict=True):
                if failed:  # a request that failed after its retries is not an answer: a rerun asks again
                    n_failed += 1
                elif scores is None:
                    judged.append({**r, "skipped": reason})
                else:
                    judged.append({**r, "scores": [float(s) for s in scores]})
            out.write(judged)
            _progress(progress_log, "judge", start + len(chunk), len(todo))
    if n_failed:
        log.warning(
            "judge: %d requests failed after retries; rerun this step to ask for them again", n_failed
        )
    return {**judge_counts(out_path), "failed": n_failed}


def judge_counts(judged_path: Path) -> dict[str, int]:
    rows = _read_rows(judged_path)
    return {
        "judged": sum("scores" in r for r in rows),
        "unjudgeable": sum("scores" not in r for r in rows),
    }


def make_pairs(judged_path: Path, out_path: Path, tie_policy: str = "skip") -> dict[str, Any]:
    """Higher score chosen, lower rejected; ties skipped (or answer 2 chosen: `tie_policy="second"`)."""
    from medvqa.io import atomic_write_jsonl

    if tie_policy not in ("skip", "second"):
        raise BadInput(f"tie_policy must be 'skip' or 'second', got {tie_policy!r}")
    rows = _iter_checked(judged_path, ("id", "image", "question"))
    pairs, counts = [], {"judged": 0, "unjudgeable": 0, "ties": 0, "pairs": 0, "chosen_yes": 0}
    for r in rows:
        scores = r.get("scores")
        if scores is None or len(scores) != 2 or len(r.get("answers", [])) != 2:
            counts["unjudgeable"] += 1
            continue
        counts["judged"] += 1
        (s1, s2), (a1, a2) = scores, r["answers"]
        if s1 == s2:
            counts["ties"] += 1
            if tie_policy == "skip":
                continue
        chosen, rejected = (a1, a2) if s1 > s2 else (a2, a1)
        pairs.append(
            {
                "id": r["id"],
                "image": r["image"],
                "prompt": r["question"],
                "answer_type": r.get("answer_type") or "",
                "chosen": chosen,
                "rejected": rejected,
                "scores": [max(s1, s2), min(s1, s2)] if s1 != s2 else [s2, s1],
            }
        )
        counts["chosen_yes"] += chosen.strip().lower() == "yes"
    counts["pairs"] = len(pairs)
    atomic_write_jsonl(out_path, pairs)
    return counts


# --- stage 2: DPO ----------------------------------------------------------------------------


def dpo_view(cfg: STLLaVAMedConfig) -> TrainConfig:
    """The stage-1 optimisation fields replaced by their `dpo_*` counterparts."""
    return dataclasses.replace(
        cfg,
        learning_rate=cfg.dpo_learning_rate,
        num_train_epochs=cfg.dpo_num_train_epochs,
        max_steps=cfg.dpo_max_steps,
        per_device_train_batch_size=cfg.dpo_batch_size,
        lr_scheduler_type=cfg.dpo_lr_scheduler_type,
        warmup_ratio=0.0,
    )


def train_dpo(
    stage1_dir: Path,
    pairs_path: Path,
    out_dir: Path,
    cfg: STLLaVAMedConfig,
    *,
    seed: int,
    work_dir: Path | None = None,
    log_path: Path | None = None,
) -> dict[str, Any]:
    """trl `DPOTrainer` on the pairs; the reference is the stage-1 model, loaded explicitly.

    (trl would otherwise reload an implicit reference from the policy's `name_or_path`, not from
    memory.) With LoRA the reference is the adapter-disabled policy, i.e. stage 1 as well.
    Returns DPO metrics: reward margin/accuracy on the pairs after training, steps, loss names.
    """
    from medvqa.trainers.checkpoints import save_model
    from medvqa.trainers.models import load_model_and_processor, lora_config
    from medvqa.trainers.rows import RowBuilder, guess_answer_type, to_dataset
    from medvqa.trainers.trl_run import (
        drop_trl_checkpoints,
        progress_callback,
        run_trainer,
        seed_everything,
        trl_kwargs,
    )
    from trl import DPOConfig, DPOTrainer

    pairs = _iter_checked(pairs_path, ("image", "prompt", "chosen", "rejected"))
    if not pairs:
        raise BadInput("no preference pairs to train on", path=pairs_path)
    work_dir = work_dir or out_dir / "_trl"
    log_path = log_path or out_dir / "train_log.jsonl"
    seed_everything(seed)
    policy, processor = load_model_and_processor(f"hf:{stage1_dir}")
    builder = RowBuilder(processor, cfg.prompt_policy)
    rows = [
        builder.pair_row(
            p["image"],
            p["prompt"],
            p.get("answer_type") or guess_answer_type(p["prompt"]),
            p["chosen"],
            p["rejected"],
        )
        for p in pairs
    ]
    dataset = to_dataset(rows)
    ref_model = None
    if not cfg.use_lora:
        ref_model, _ = load_model_and_processor(f"hf:{stage1_dir}")
        ref_model.eval()
    view = dpo_view(cfg)
    args = DPOConfig(
        **trl_kwargs(view, work_dir, seed),
        beta=cfg.beta,
        loss_type=list(DPO_LOSSES[cfg.dpo_loss]),
        precompute_ref_log_probs=False,
        per_device_eval_batch_size=cfg.dpo_batch_size,
    )
    trainer = DPOTrainer(
        model=policy,
        ref_model=ref_model,
        args=args,
        train_dataset=dataset,
        processing_class=processor,
        peft_config=lora_config(cfg) if cfg.use_lora else None,
        callbacks=[progress_callback(log_path, "dpo")],
    )
    run_trainer(trainer, work_dir)
    metrics = trainer.evaluate(eval_dataset=dataset, metric_key_prefix="pairs")
    model = trainer.model
    save_model(model, processor, out_dir)
    drop_trl_checkpoints(work_dir)
    return {
        "steps": trainer.state.global_step,
        "loss_type": list(DPO_LOSSES[cfg.dpo_loss]),
        "reference": str(stage1_dir),
        "reward_margin": _metric(metrics, "rewards/margins"),
        "reward_accuracy": _metric(metrics, "rewards/accuracies"),
        "n_pairs": len(pairs),
    }


def _metric(metrics: Mapping[str, Any], name: str) -> float | None:
    for key, value in metrics.items():
        if key.endswith(name):
            return float(value)
    return None


# --- the trainer -----------------------------------------------------------------------------


@trainers.register("stllava-med")
class STLLaVAMedTrainer(TrainerPlugin):
    """STLLaVA-Med: SFT + self-questioning, then expert-judged preference pairs and DPO."""

    name = "stllava-med"
    config_class = STLLaVAMedConfig
    presets = STLLAVA_PRESETS

    def train(self, request: TrainRequest) -> Checkpoint:
        from medvqa.distributed import is_main_process, wait_for_everyone
        from medvqa.io import atomic_write_json
        from medvqa.trainers.checkpoints import checkpoint_meta, policy_name, write_checkpoint

        cfg = self._config(request)
        out = Path(request.out_dir)
        stages = out / "stages"
        stages.mkdir(parents=True, exist_ok=True)
        files = {k: stages / v for k, v in STAGE_FILES.items()}

        if not request.unlabeled_images:
            raise BadInput(
                "stllava-med needs unlabeled images for stage 2 (none were given; with --fraction 1.0 every "
                "training image is labeled)"
            )
        stage1 = stages / "stage1"
        # every process: trl trains data-parallel under accelerate
        train_stage1(request, cfg, stage1, log_path=out / "train_log.jsonl")
        wait_for_everyone()

        counts: dict[str, Any] = {}
        if is_main_process():
            images = unlabeled_pool(request.unlabeled_images, cfg, request.seed)
            if not images:
                raise BadInput("stllava-med needs unlabeled images (none were given)")
            generator = _load_generator(f"hf:{stage1}")
            plog = out / "train_log.jsonl"
            counts.update(
                generate_questions(
                    generator, images, files["questions"], cfg, seed=request.seed, progress_log=plog
                )
            )
            counts["parseable_questions"] = (
                _parseable(files["questions"]) if cfg.expert == "phantom" else None
            )
            counts.update(
                generate_answers(
                    generator, files["questions"], files["answers"], cfg, seed=request.seed, progress_log=plog
                )
            )
            del generator
            expert = build_expert(
                cfg.expert,
                model=cfg.expert_model,
                base_url=cfg.expert_base_url,
                cache_path=cfg.judge_cache or stages / "judge-cache.sqlite",
                heldout_samples=request.heldout_samples,
            )
            judge_answers(files["answers"], files["judged"], expert, progress_log=plog)
            counts.update(make_pairs(files["judged"], files["pairs"], cfg.tie_policy))
            log.info("stllava-med: %s", _counts_line({k: v for k, v in counts.items() if v is not None}))
            atomic_write_json(stages / "counts.json", counts)
        wait_for_everyone()

        dpo = train_dpo(
            stage1,
            files["pairs"],
            out,
            cfg,
            seed=request.seed,
            work_dir=stages / "_trl" / "dpo",
            log_path=out / "train_log.jsonl",
        )
        if not counts:
            from medvqa.io import read_json

            counts = read_json(stages / "counts.json")
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
            reference="stage 1 (explicit ref_model loaded from stages/stage1)"
            if not cfg.use_lora
            else "stage 1 (adapter-disabled policy)",
            prompt_policy=policy_name(cfg.prompt_policy),
            adapter=cfg.use_lora,
        )
        if is_main_process():
            write_checkpoint(out, meta)
        return Checkpoint(path=out, meta=meta)


def _counts_line(counts: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in counts.items())


def _parseable(questions_path: Path) -> float | None:
    """Share of generated questions that parse in the Phantom grammar (for the phantom expert)."""
    try:
        from medvqa.benchmarks.phantom import parse_question
    except ImportError:  # pragma: no cover
        return None
    rows = _read_rows(questions_path)
    if not rows:
        return None
    return round(sum(parse_question(r["question"]) is not None for r in rows) / len(rows), 4)
