"""STLLaVA-Med stage 1: the original's in-conversation self-questioning, and a slower vision tower.

- `sq_format="conversation"`: per labeled image one multi-turn row whose later questions are
  targets (p = sq_ratio) with their answers trained in the same sequence; every labeled answer is
  trained exactly once per epoch, and there are no separate ask rows.
- `vision_lr_scale`: the vision tower and projector learn at a multiple of the learning rate (0 =
  frozen), the LLM at the full rate — a real trl run on the tiny LLaVA.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections import Counter
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def train_samples(phantom_root):
    from medvqa.benchmarks.phantom import Phantom

    return Phantom().load("train", Path(phantom_root))


@pytest.fixture(scope="module")
def builder(tiny_model_dir):
    from medvqa.trainers.rows import RowBuilder
    from transformers import AutoProcessor

    return RowBuilder(AutoProcessor.from_pretrained(tiny_model_dir), "")


def test_conversation_rows_put_self_questions_inside_answer_sequences(builder, train_samples):
    from medvqa.trainers.stllava_med import STLLaVAMedConfig, stage1_rows

    samples = train_samples[:40]  # 10 images x 4 QA
    cfg = dataclasses.replace(STLLaVAMedConfig(), sq_format="conversation", sq_ratio=0.5)
    rows = stage1_rows(samples, builder, cfg, seed=0)
    kinds = Counter(r["kind"] for r in rows)
    assert "ask" not in kinds and kinds["conversation"] > 0
    n_images = len({s.image_id for s in samples})
    assert len(rows) < len(samples)  # no extra rows: fewer than one per QA
    asks = sum(r.pop("_asks", 0) for r in rows)
    assert 0.25 * (len(samples) - n_images) < asks < 0.75 * (len(samples) - n_images)
    trained = "".join(r["prompt"] + r["completion"] for r in rows)
    for s in samples:  # each answer trained once: the first QA's in its prompt row, the others in completions
        assert s.question in trained
    conv = next(r for r in rows if r["kind"] == "conversation")
    assert cfg.ask_instruction in conv["completion"] and "<image>" not in conv["completion"]
    assert conv["completion"].endswith(builder.processor.tokenizer.eos_token)
    n_answers = sum(r["completion"].count(builder.processor.tokenizer.eos_token) for r in rows)
    assert n_answers == len(samples) + asks  # every answer once, plus one end per asked question
    assert stage1_rows(samples, builder, cfg, seed=0) != stage1_rows(samples, builder, cfg, seed=1)


def test_rows_format_adds_ask_rows(builder, train_samples):
    from medvqa.trainers.stllava_med import STLLaVAMedConfig, stage1_rows

    rows = stage1_rows(
        train_samples[:40], builder, dataclasses.replace(STLLaVAMedConfig(), sq_format="rows"), 0
    )
    kinds = Counter(r["kind"] for r in rows)
    assert kinds["qa"] == 40 and 10 < kinds["ask"] < 30


@pytest.mark.slow
def test_vision_lr_scale_slows_the_vision_tower_only(tiny_model_dir, builder, train_samples, tmp_path):
    import torch
    from medvqa.trainers.config import TrainConfig
    from medvqa.trainers.models import load_model_and_processor
    from medvqa.trainers.rows import qa_rows
    from medvqa.trainers.trl_run import fit_sft, is_vision_param

    model, processor = load_model_and_processor(f"hf:{tiny_model_dir}")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(learning_rate=1e-3, max_steps=3, per_device_train_batch_size=8, vision_lr_scale=0.0)
    rows = qa_rows(train_samples[:16], builder)
    model = fit_sft(model, processor, rows, cfg, work_dir=tmp_path / "trl", log_path=tmp_path / "log.jsonl",
                    seed=0, stage="test")  # fmt: skip
    after = dict(model.named_parameters())
    vision = [n for n in before if is_vision_param(n)]
    language = [n for n in before if n not in vision]
    assert vision and language
    assert all(torch.equal(before[n], after[n].detach()) for n in vision)
    assert sum(not torch.equal(before[n], after[n].detach()) for n in language) > len(language) // 2


@pytest.mark.slow
def test_sq_schedule_after_learns_to_ask_with_the_vision_tower_frozen(
    tiny_model_dir, train_samples, tmp_path
):
    """`sq_schedule="after"`: phase 1 trains the QA rows alone (max_steps), phase 2 (sq_steps) adds
    the ask rows and leaves the vision tower and projector exactly as phase 1 left them, while the
    language model moves; the stage-1 checkpoint says which schedule made it."""
    import torch
    from medvqa.fractions import fraction_request
    from medvqa.io import read_jsonl
    from medvqa.trainers.checkpoints import read_checkpoint
    from medvqa.trainers.models import load_model_and_processor
    from medvqa.trainers.stllava_med import STLLaVAMedConfig
    from medvqa.trainers.stllava_med.stage1 import train_stage1
    from medvqa.trainers.trl_run import is_vision_param

    cfg = dataclasses.replace(
        STLLaVAMedConfig(), use_lora=False, learning_rate=1e-3, warmup_ratio=0.0, max_steps=3,
        per_device_train_batch_size=8, sq_schedule="after", sq_steps=3, sq_ratio=0.5,
    )  # fmt: skip
    request = fraction_request(
        train_samples[:40], 0.5, 0, base_model=f"hf:{tiny_model_dir}", out_dir=tmp_path, config=cfg
    )
    stage_dir = tmp_path / "stages" / "stage1"
    meta = train_stage1(request, cfg, stage_dir, log_path=tmp_path / "log.jsonl")
    assert meta["sq_schedule"] == "after" and meta["n_self_questioning"] > 0
    assert read_checkpoint(tmp_path / "stages" / "stage1-qa")["n_rows"] == len(request.train_samples)
    base = dict(load_model_and_processor(f"hf:{tiny_model_dir}")[0].named_parameters())
    qa = dict(load_model_and_processor(f"hf:{tmp_path / 'stages' / 'stage1-qa'}")[0].named_parameters())
    final = dict(load_model_and_processor(f"hf:{stage_dir}")[0].named_parameters())
    vision = [n for n in qa if is_vision_param(n)]
    language = [n for n in qa if n not in vision]
    assert vision and language
    assert any(not torch.equal(base[n], qa[n]) for n in vision)  # phase 1 trains the vision tower
    assert all(torch.equal(qa[n], final[n]) for n in vision)  # phase 2 does not
    assert sum(not torch.equal(qa[n], final[n]) for n in language) > len(language) // 2
    stages = {r.get("stage") for r in read_jsonl(tmp_path / "log.jsonl")}
    assert {"stage1", "stage1-ask"} <= stages

    # killed after phase 1: phase 2 starts from the saved phase 1 without loading the base model
    # (a base that is gone now), and gives the same bytes as the uninterrupted run
    first = (stage_dir / "model.safetensors").read_bytes()
    shutil.rmtree(stage_dir)
    gone = dataclasses.replace(request, base_model=f"hf:{tmp_path / 'no-such-base'}")
    train_stage1(gone, cfg, stage_dir, log_path=tmp_path / "log2.jsonl")
    assert (stage_dir / "model.safetensors").read_bytes() == first


@pytest.mark.slow
def test_sq_schedule_separate_answers_with_sft_weights_and_asks_with_the_mixed_ones(
    tiny_model_dir, train_samples, tmp_path
):
    """`sq_schedule="separate"`: stage 1's answering model is SFT on the labeled fraction byte for
    byte (`--trainer sft`, same TrainConfig fields, same seed), its asker is the model a "mixed"
    stage 1 trains, and a run killed after the asker resumes to the same bytes."""
    from medvqa.fractions import fraction_request
    from medvqa.registry import trainers
    from medvqa.trainers.checkpoints import read_checkpoint
    from medvqa.trainers.config import TrainConfig
    from medvqa.trainers.stllava_med import STLLaVAMedConfig
    from medvqa.trainers.stllava_med.stage1 import asker_dir, question_model, train_stage1

    cfg = dataclasses.replace(
        STLLaVAMedConfig(), use_lora=False, learning_rate=1e-3, warmup_ratio=0.0, max_steps=3,
        per_device_train_batch_size=8, sq_schedule="separate", sq_ratio=0.5,
    )  # fmt: skip

    def request(config, out):
        return fraction_request(
            train_samples[:40], 0.5, 0, base_model=f"hf:{tiny_model_dir}", out_dir=out, config=config
        )

    stage_dir = tmp_path / "separate" / "stages" / "stage1"
    meta = train_stage1(request(cfg, tmp_path / "separate"), cfg, stage_dir)
    asker = asker_dir(stage_dir)
    assert question_model(stage_dir, cfg) == asker and meta["asker"] == str(asker)
    assert meta["sq_schedule"] == "separate" and meta["n_self_questioning"] > 0
    assert read_checkpoint(asker)["n_self_questioning"] == meta["n_self_questioning"]
    assert meta["n_rows"] == len(request(cfg, tmp_path).train_samples)  # the answering model's: QA only

    mixed_cfg = dataclasses.replace(cfg, sq_schedule="mixed")
    mixed_dir = tmp_path / "mixed" / "stages" / "stage1"
    train_stage1(request(mixed_cfg, tmp_path / "mixed"), mixed_cfg, mixed_dir)
    assert question_model(mixed_dir, mixed_cfg) == mixed_dir
    sft = trainers.get("sft")
    sft_cfg = sft.config_class(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainConfig)})
    sft().train(request(sft_cfg, tmp_path / "sft"))

    weights = "model.safetensors"
    assert (stage_dir / weights).read_bytes() == (tmp_path / "sft" / weights).read_bytes()
    assert (asker / weights).read_bytes() == (mixed_dir / weights).read_bytes()
    assert (asker / weights).read_bytes() != (stage_dir / weights).read_bytes()

    first = (stage_dir / weights).read_bytes()  # killed after the asker: the answerer is retrained
    shutil.rmtree(stage_dir)
    train_stage1(request(cfg, tmp_path / "separate"), cfg, stage_dir)
    assert (stage_dir / weights).read_bytes() == first

    # `answering_model`: that SFT checkpoint is copied in (checked to be this run's), not retrained
    adopt = dataclasses.replace(cfg, answering_model=str(tmp_path / "sft"))
    adopt_dir = tmp_path / "adopt" / "stages" / "stage1"
    meta = train_stage1(request(adopt, tmp_path / "adopt"), adopt, adopt_dir)
    assert (adopt_dir / weights).read_bytes() == first
    assert (asker_dir(adopt_dir) / weights).read_bytes() == (asker / weights).read_bytes()
    assert meta["answering_model"] == str(tmp_path / "sft") and meta["n_self_questioning"] > 0
    assert not (adopt_dir / "_trl").exists() and read_checkpoint(adopt_dir) == meta


@pytest.mark.parametrize(
    "change, why",
    [
        ({"learning_rate": 2e-3}, "learning_rate = 0.001, this run's is 0.002"),
        ({"vision_lr_scale": 0.5}, "vision_lr_scale"),
        ({"max_steps": 4}, "step budget on the 20 labeled rows is 3 steps, this run's 4"),
        ({"seed": 1}, "its seed is 0, this run's 1"),
        ({"fraction": 0.9}, "its manifest_hash"),
        ({"answering_model": "missing"}, "not a finished checkpoint folder"),
    ],
)
def test_answering_model_is_refused_unless_it_is_what_stage1_would_train(
    tiny_model_dir, train_samples, tmp_path, change, why
):
    """A checkpoint that is not this run's answering model (other settings, seed, labeled samples, or no
    finished checkpoint) is refused with what differs; the same step budget written another way is not."""
    from medvqa.errors import BadInput
    from medvqa.fractions import fraction_request
    from medvqa.trainers.checkpoints import checkpoint_meta, write_checkpoint
    from medvqa.trainers.sft import SFTTrainConfig
    from medvqa.trainers.stllava_med import STLLaVAMedConfig
    from medvqa.trainers.stllava_med.stage1 import check_answering_model

    def request(config, fraction=0.5, seed=0):
        return fraction_request(train_samples[:40], fraction, seed, base_model=f"hf:{tiny_model_dir}",
                                out_dir=tmp_path / "out", config=config)  # fmt: skip

    sft_cfg = SFTTrainConfig(learning_rate=1e-3, warmup_ratio=0.0, max_steps=100, max_epochs=1.2,
                             per_device_train_batch_size=8, vision_lr_scale=0.25)  # fmt: skip
    sft_dir = tmp_path / "sft"  # 1.2 epochs of 20 rows at batch 8 = 3 steps
    sft_dir.mkdir()
    write_checkpoint(sft_dir, checkpoint_meta(trainer="sft", request=request(sft_cfg), config=sft_cfg,
                                              n_labeled=20, loss="nll (completion only)"))  # fmt: skip
    cfg = STLLaVAMedConfig(use_lora=False, learning_rate=1e-3, warmup_ratio=0.0, max_steps=3,
                           per_device_train_batch_size=8, vision_lr_scale=0.25, sq_schedule="separate",
                           answering_model=str(sft_dir))  # fmt: skip
    assert check_answering_model(request(cfg), cfg)["trainer"] == "sft"
    fields = {k: v for k, v in change.items() if k not in ("seed", "fraction")}
    if "answering_model" in fields:
        fields["answering_model"] = str(tmp_path / fields["answering_model"])
    bad = dataclasses.replace(cfg, **fields)
    req = request(bad, change.get("fraction", 0.5), change.get("seed", 0))
    with pytest.raises(BadInput, match="answering_model") as err:
        check_answering_model(req, bad)
    assert why in str(err.value) and err.value.field == "answering_model"
