"""Stage 1, reasoning and learning to ask: SFT on the labeled fraction, with self-questioning.

Two forms (`sq_format`):
- "rows": each labeled QA is a row; with probability `sq_ratio` it also yields an ask row (image +
  ask-instruction → the question itself).
- "conversation" (the original's `preprocess_v1_sq2`): see `conversation_rows`.

Three schedules (`sq_schedule`):
- "mixed" trains those rows together for all of stage 1 (the original);
- "separate" trains them into an asker (`stage1-asker/`, used only to sample stage 2's questions)
  and the QA rows alone into the answering model (`stage1/`: SFT on the labeled fraction, byte for
  byte), which answers, starts DPO and is its reference. On Phantom training the answering weights
  to ask cost 2-5 closed points in every seed (docs/trainers.md); apart, asking costs none;
- "after" first trains the QA rows alone, then `sq_steps` more on all rows with the vision tower and
  projector frozen (the asking learned by the language model only).
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medvqa.trainers.stllava_med.config import STLLaVAMedConfig
from medvqa.trainers.stllava_med.stagefiles import seed_for
from medvqa.types import TrainRequest

log = logging.getLogger("medvqa.train")


def stage1_rows(samples: Sequence[Any], builder: Any, cfg: STLLaVAMedConfig, seed: int) -> list[dict]:
    """Stage 1's training rows in the configured `sq_format`."""
    if cfg.sq_format == "conversation":
        return conversation_rows(samples, builder, cfg, seed)
    rng = random.Random(seed_for("sq", seed))
    rows = []
    for s in samples:
        rows.append(builder.qa_row(s.image, s.question, s.prompt_answer_type, s.answer, kind="qa"))
        if rng.random() < cfg.sq_ratio:
            rows.append(builder.instruction_row(s.image, cfg.ask_instruction, s.question, kind="ask"))
    return rows


def conversation_rows(samples: Sequence[Any], builder: Any, cfg: STLLaVAMedConfig, seed: int) -> list[dict]:
    """The original's in-conversation self-questioning, in prompt/completion form.

    Per labeled image (its QA in a seeded order): the first QA is the prompt (the evaluation
    prompt) and its answer starts the completion; each later QA, with probability `sq_ratio`,
    follows in the same completion as a self-questioning turn — the ask-instruction, the question
    as the model's target, then the question asked and its answer (also trained). So questions are
    learned inside answer sequences and no answer is diluted by extra rows. A later QA that is not
    a target is its own QA row (the loss covers completions only, so a user turn inside a
    completion would be trained; the original masks it). Every labeled answer is trained once per
    epoch. Raw-text prompt policies (no chat template) fall back to `rows`.
    """
    if builder.policy.style == "raw":
        return stage1_rows(samples, builder, dataclasses.replace(cfg, sq_format="rows"), seed)
    from medvqa.trainers.rows import image_ref

    rng = random.Random(seed_for("sq-conversation", seed))
    by_image: dict[str, list[Any]] = {}
    for s in samples:
        by_image.setdefault(str(s.image_id), []).append(s)
    tok = getattr(builder.processor, "tokenizer", builder.processor)
    rows: list[dict] = []
    for group in by_image.values():
        order = list(group)
        rng.shuffle(order)
        first, later = order[0], order[1:]
        targets = [s for s in later if rng.random() < cfg.sq_ratio]
        rows += [
            builder.qa_row(s.image, s.question, s.prompt_answer_type, s.answer, kind="qa")
            for s in later
            if s not in targets
        ]
        if not targets:
            rows.append(
                builder.qa_row(first.image, first.question, first.prompt_answer_type, first.answer, kind="qa")
            )
            continue
        prompt, text = builder.prompt(first.question, first.prompt_answer_type)
        messages = [*prompt.messages, _turn("assistant", first.answer)]
        for s in targets:
            asked = builder.policy.render(s.question, s.prompt_answer_type)
            messages += [
                _turn("user", cfg.ask_instruction),
                _turn("assistant", s.question),
                _turn("user", _text_of(asked.messages[-1])),
                _turn("assistant", s.answer),
            ]
        full = builder.processor.apply_chat_template(messages, tokenize=False)
        if not full.startswith(text):  # a template that renders turns differently: plain rows
            rows.append(
                builder.qa_row(first.image, first.question, first.prompt_answer_type, first.answer, kind="qa")
            )
            rows += [
                builder.qa_row(s.image, s.question, s.prompt_answer_type, s.answer, kind="qa")
                for s in targets
            ]
            continue
        completion = full[len(text) :]
        if tok.eos_token and not completion.endswith(tok.eos_token):
            completion += tok.eos_token  # the model must learn to stop after the last answer
        rows.append(
            {"images": [image_ref(first.image)], "prompt": text, "completion": completion, "kind": "conversation",
             "_asks": len(targets)}
        )  # fmt: skip
    return rows


def _turn(role: str, text: str) -> dict[str, Any]:
    return {"role": role, "content": [{"type": "text", "text": text}]}


def _text_of(message: Any) -> str:
    content = message["content"]
    if isinstance(content, str):
        return content
    return " ".join(part["text"] for part in content if part.get("type") == "text")


def asker_dir(stage_dir: Path) -> Path:
    """Where `sq_schedule="separate"` keeps the asking model: beside stage 1's answering model."""
    return stage_dir.parent / "stage1-asker"


def question_model(stage_dir: Path, cfg: STLLaVAMedConfig) -> Path:
    """The stage-1 model that samples stage 2's questions (the answering model unless separate)."""
    return asker_dir(stage_dir) if cfg.sq_schedule == "separate" else stage_dir


def train_stage1(
    request: TrainRequest, cfg: STLLaVAMedConfig, stage_dir: Path, *, log_path: Path | None = None
) -> dict[str, Any]:
    """Stage 1 → a full model in `stage_dir` (skipped if already finished there)."""
    from medvqa.trainers.checkpoints import read_checkpoint
    from medvqa.trainers.models import load_model_and_processor
    from medvqa.trainers.rows import RowBuilder
    from medvqa.trainers.trl_run import is_vision_param, seed_everything

    done = read_checkpoint(stage_dir)
    if done is not None:
        log.info("stage 1 already done: %s", stage_dir)
        return done
    if cfg.sq_schedule == "separate":
        _train_asker(request, cfg, asker_dir(stage_dir), log_path or stage_dir / "train_log.jsonl")
        if cfg.answering_model:
            return _adopt_answering_model(request, cfg, stage_dir)
    seed_everything(request.seed)
    qa_dir = stage_dir.parent / "stage1-qa"  # "after": phase 1 kept, so a kill in phase 2 resumes there
    phase1_done = cfg.sq_schedule == "after" and read_checkpoint(qa_dir) is not None
    # a finished phase 1 is the starting point: the base model is not loaded at all (minutes on a 7B)
    model, processor = load_model_and_processor(f"hf:{qa_dir}" if phase1_done else request.base_model)
    builder = RowBuilder(processor, cfg.prompt_policy)
    rows = stage1_rows(request.train_samples, builder, cfg, request.seed)
    n_ask = _count_asks(rows)
    log_path = log_path or stage_dir / "train_log.jsonl"
    trl_root = stage_dir.parent / "_trl"
    if cfg.sq_schedule == "separate":  # the answering model: the QA rows alone, SFT's own run
        rows = _qa_only(rows)  # n_self_questioning: the asker's rows
        model = _fit(model, processor, rows, cfg, trl_root / "stage1", log_path, request.seed, "stage1")
    elif cfg.sq_schedule == "after":
        if not phase1_done:
            qa_rows = _qa_only(rows)
            model = _fit(
                model, processor, qa_rows, cfg, trl_root / "stage1", log_path, request.seed, "stage1"
            )
            phase1 = {"trainer": "stllava-med/stage1-qa", "n_rows": len(qa_rows)}
            _keep_phase(model, processor, qa_dir, trl_root / "stage1", phase1)
            model, processor = load_model_and_processor(f"hf:{qa_dir}")  # as a resumed run starts
        for name, param in model.named_parameters():  # frozen: no gradient, no optimizer state
            if is_vision_param(name):
                param.requires_grad_(False)
        ask_cfg = dataclasses.replace(cfg, max_steps=cfg.sq_steps, max_epochs=0.0, vision_lr_scale=1.0)
        model = _fit(
            model, processor, rows, ask_cfg, trl_root / "stage1-ask", log_path, request.seed, "stage1-ask"
        )
    else:
        model = _fit(model, processor, rows, cfg, trl_root / "stage1", log_path, request.seed, "stage1")
    meta = _stage1_meta(
        request, cfg, stage_dir, n_ask=n_ask, n_rows=len(rows), prompt_policy=builder.policy.name
    )
    last_phase = trl_root / ("stage1-ask" if cfg.sq_schedule == "after" else "stage1")
    _keep_phase(model, processor, stage_dir, last_phase, meta)
    return meta


def _stage1_meta(
    request: TrainRequest,
    cfg: STLLaVAMedConfig,
    stage_dir: Path,
    *,
    n_ask: int,
    n_rows: int,
    prompt_policy: str,
    loss: str = "nll (completion only)",
    **extra: Any,
) -> dict[str, Any]:
    """Stage 1's `checkpoint.json`, trained or (`answering_model`) copied in."""
    from medvqa.trainers.checkpoints import checkpoint_meta

    return checkpoint_meta(
        trainer="stllava-med/stage1",
        request=request,
        config=cfg,
        n_labeled=len(request.train_samples),
        loss=loss,
        n_self_questioning=n_ask,
        n_rows=n_rows,
        sq_format=cfg.sq_format,
        sq_schedule=cfg.sq_schedule,
        prompt_policy=prompt_policy,
        **({"asker": str(asker_dir(stage_dir))} if cfg.sq_schedule == "separate" else {}),
        **extra,
    )


def _count_asks(rows: list[dict]) -> int:
    """The self-questioning targets among stage-1 rows (ask rows, and those inside conversation
    rows), their `_asks` marks removed: no row field trl would see."""
    return sum(int(r.pop("_asks", r["kind"] == "ask")) for r in rows)


def _qa_only(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["kind"] == "qa"]


def _keep_phase(model: Any, processor: Any, out: Path, work_dir: Path, meta: dict[str, Any]) -> None:
    """A trained phase saved as a checkpoint folder, its `checkpoint.json` last (= finished), then
    its trl checkpoints dropped (until then a kill resumes from them)."""
    from medvqa.trainers.checkpoints import save_model, write_checkpoint
    from medvqa.trainers.trl_run import drop_trl_checkpoints

    save_model(model, processor, out)
    write_checkpoint(out, meta)
    drop_trl_checkpoints(work_dir)


def _train_asker(request: TrainRequest, cfg: STLLaVAMedConfig, out: Path, log_path: Path) -> None:
    """The asker of `sq_schedule="separate"`: stage 1's mixed rows from the base model into `out`
    (the same weights a "mixed" stage 1 ends with), skipped if already finished there. It is
    trained first: the answering model's `checkpoint.json` marks the whole of stage 1 done."""
    from medvqa.trainers.checkpoints import read_checkpoint
    from medvqa.trainers.models import load_model_and_processor
    from medvqa.trainers.rows import RowBuilder
    from medvqa.trainers.trl_run import seed_everything

    if read_checkpoint(out) is not None:
        return
    seed_everything(request.seed)
    model, processor = load_model_and_processor(request.base_model)
    rows = stage1_rows(request.train_samples, RowBuilder(processor, cfg.prompt_policy), cfg, request.seed)
    n_ask = _count_asks(rows)
    work_dir = out.parent / "_trl" / "stage1-asker"
    model = _fit(model, processor, rows, cfg, work_dir, log_path, request.seed, "stage1-asker")
    meta = {"trainer": "stllava-med/stage1-asker", "n_rows": len(rows), "n_self_questioning": n_ask}
    _keep_phase(model, processor, out, work_dir, meta)


# TrainConfig fields that decide no weight (logging, saving) or only the step count, which is compared
# as the budget each config gives on the labeled rows (and without LoRA, the LoRA settings)
_NOT_COMPARED = frozenset(
    {"max_steps", "max_epochs", "num_train_epochs", "logging_steps", "save_steps", "report_to"}
)


def answering_model_mismatch(meta: dict[str, Any], request: TrainRequest, cfg: STLLaVAMedConfig) -> str:
    """Why a finished checkpoint is not the answering model this run would train ("" if it is): an
    `sft` run on the same labeled samples, seed and base model with the same training settings."""
    from medvqa.trainers.config import TrainConfig
    from medvqa.trainers.trl_run import step_budget

    if meta.get("trainer") != "sft":
        return f"it was trained by {meta.get('trainer')!r}, not 'sft'"
    for key, ours in (("seed", request.seed), ("manifest_hash", request.manifest_hash),
                      ("base_model", request.base_model)):  # fmt: skip
        if meta.get(key) != ours:
            return f"its {key} is {meta.get(key)!r}, this run's {ours!r}"
    theirs = meta.get("config") or {}
    ignored = _NOT_COMPARED | (
        set() if cfg.use_lora else {"lora_r", "lora_alpha", "lora_dropout", "lora_target_modules"}
    )
    for f in dataclasses.fields(TrainConfig):
        if f.name not in ignored and theirs.get(f.name) != getattr(cfg, f.name):
            return f"it was trained with {f.name} = {theirs.get(f.name)!r}, this run's is {getattr(cfg, f.name)!r}"
    n = len(request.train_samples)
    budget = {k: theirs.get(k) for k in ("max_steps", "max_epochs", "num_train_epochs")}
    if None in budget.values():
        return "its checkpoint.json records no step budget"
    steps = step_budget(dataclasses.replace(cfg, **budget), n), step_budget(cfg, n)
    if steps[0] != steps[1] or (steps[0] == -1 and budget["num_train_epochs"] != cfg.num_train_epochs):
        return f"its step budget on the {n} labeled rows is {steps[0]} steps, this run's {steps[1]}"
    return ""


def check_answering_model(request: TrainRequest, cfg: STLLaVAMedConfig) -> dict[str, Any]:
    """The `answering_model` checkpoint's `checkpoint.json`, once it is checked to be the model this
    run's stage 1 would train (BadInput naming what differs otherwise)."""
    from medvqa.errors import BadInput
    from medvqa.trainers.checkpoints import CHECKPOINT_FILE, read_checkpoint

    source = Path(cfg.answering_model).expanduser()
    theirs = read_checkpoint(source) if source.is_dir() else None
    if theirs is None:
        raise BadInput(f"not a finished checkpoint folder (no {CHECKPOINT_FILE})", path=source,
                       field="answering_model")  # fmt: skip
    why = answering_model_mismatch(theirs, request, cfg)
    if why:
        raise BadInput(f"not the model this run's stage 1 would train: {why}", path=source,
                       field="answering_model")  # fmt: skip
    return theirs


def _adopt_answering_model(request: TrainRequest, cfg: STLLaVAMedConfig, stage_dir: Path) -> dict[str, Any]:
    """`answering_model`: stage 1's answering model copied from a finished SFT checkpoint that is the
    model this run would train (checked), instead of training the same weights again."""
    import shutil

    from medvqa.trainers.checkpoints import (
        CHECKPOINT_FILE,
        read_checkpoint,
        write_checkpoint,
    )

    theirs = check_answering_model(request, cfg)
    source = Path(cfg.answering_model).expanduser()
    stage_dir.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):  # the model's files; its own marker and log stay behind
        if path.is_file() and path.name not in (CHECKPOINT_FILE, "train_log.jsonl"):
            shutil.copyfile(path, stage_dir / path.name)
    asker = read_checkpoint(asker_dir(stage_dir)) or {}
    meta = _stage1_meta(request, cfg, stage_dir, n_ask=asker.get("n_self_questioning", 0),
                        n_rows=len(request.train_samples), prompt_policy=theirs.get("prompt_policy", ""),
                        loss=theirs.get("loss", "nll (completion only)"), answering_model=str(source))  # fmt: skip
    write_checkpoint(stage_dir, meta)  # last: the copy is finished
    log.info("stage 1: answering model copied from %s", source)
    return meta


def _fit(
    model: Any,
    processor: Any,
    rows: Sequence[dict],
    cfg: STLLaVAMedConfig,
    work_dir: Path,
    log_path: Path,
    seed: int,
    stage: str,
) -> Any:
    """One SFT pass of stage 1 (LoRA merged: the next phase or stage 2 starts from a full model).
    Its trl checkpoints stay until the caller has saved the result (a kill before that resumes)."""
    from medvqa.trainers.trl_run import fit_sft

    return fit_sft(model, processor, rows, cfg, work_dir=work_dir, log_path=log_path, seed=seed, stage=stage,
                   merge_lora=True)  # fmt: skip
