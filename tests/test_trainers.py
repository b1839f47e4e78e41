"""Trainers on the tiny LLaVA and a small Phantom (CPU): real learning, not plumbing.

- SFT raises test-split closed accuracy clearly above the untrained model's (scored by the eval path).
- STLLaVA-Med: the stage-1 model asks parseable questions, the phantom expert yields pairs, DPO
  raises the reward margin on them, and the DPO reference really is the stage-1 model.
- Stages killed mid-way resume without redoing finished items; checkpoint.json holds the contract.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from medvqa.errors import BadInput
from medvqa.fractions import manifest_hash, select_fraction
from medvqa.io import read_json, read_jsonl
from medvqa.types import TrainRequest

CHECKPOINT_KEYS = {
    "trainer",
    "fraction",
    "seed",
    "manifest_hash",
    "n_labeled",
    "n_pairs",
    "base_model",
    "config",
    "versions",
    "loss",
}


@pytest.fixture(scope="module")
def train_samples(phantom_root):
    from medvqa.benchmarks.phantom import Phantom

    return Phantom().load("train", Path(phantom_root))


def _closed_accuracy(model_spec: str, root: Path, out: Path) -> tuple[float, float]:
    """(strict closed accuracy, strict open exact match) on the test split, via `medvqa eval`'s path."""
    from medvqa.evaluate import EvalConfig, evaluate

    scores = evaluate(
        EvalConfig(
            model=model_spec,
            benchmark="phantom",
            root=str(root),
            out=str(out),
            batch_size=64,
            n_boot=0,
            max_new_tokens=8,
            progress=False,
        ),
        log=lambda msg: None,
    )
    strict = scores["scorers"]["strict"]
    return strict["closed_accuracy"]["value"], strict["open_exact_match"]["value"]


# --- SFT ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_checkpoint(tmp_path_factory, tiny_model_dir, train_samples):
    from medvqa.trainers.sft import SFTTrainerPlugin

    out = tmp_path_factory.mktemp("sft") / "checkpoint"
    cfg = dataclasses.replace(SFTTrainerPlugin.make_config("phantom"), max_steps=150, logging_steps=50)
    chosen = select_fraction(train_samples, 1.0, 0)
    request = TrainRequest(
        base_model=f"hf:{tiny_model_dir}",
        train_samples=chosen,
        out_dir=out,
        seed=0,
        fraction=1.0,
        manifest_hash=manifest_hash(chosen),
        config=cfg,
    )
    return SFTTrainerPlugin().train(request)


@pytest.mark.slow
def test_sft_raises_closed_accuracy_above_untrained(sft_checkpoint, tiny_model_dir, phantom_root, tmp_path):
    before_closed, before_open = _closed_accuracy(f"hf:{tiny_model_dir}", phantom_root, tmp_path / "base")
    after_closed, after_open = _closed_accuracy(sft_checkpoint.model_spec, phantom_root, tmp_path / "sft")
    # 150 steps teach the answer format and the open slots; closed accuracy only leaves chance
    # (50%) after ~3,000 steps (PHANTOM-NOTES), too slow for a unit test.
    assert after_closed >= before_closed + 25, (before_closed, after_closed)
    assert after_open > before_open + 10, (before_open, after_open)


@pytest.mark.slow
def test_sft_checkpoint_json_contract(sft_checkpoint, tiny_model_dir, train_samples):
    meta = read_json(sft_checkpoint.path / "checkpoint.json")
    assert set(meta) >= CHECKPOINT_KEYS
    assert meta["trainer"] == "sft"
    assert meta["fraction"] == 1.0 and meta["seed"] == 0
    assert meta["manifest_hash"] == manifest_hash(select_fraction(train_samples, 1.0, 0))
    assert meta["n_labeled"] == len(train_samples) and meta["n_pairs"] == 0
    assert meta["base_model"] == f"hf:{tiny_model_dir}"
    assert meta["config"]["max_steps"] == 150 and meta["config"]["learning_rate"] == 1e-3
    assert {"torch", "transformers", "trl"} <= set(meta["versions"])
    assert meta["prompt_policy"] == "short-answer"
    assert (sft_checkpoint.path / "config.json").is_file() and (
        sft_checkpoint.path / "train_log.jsonl"
    ).is_file()
    log_rows = read_jsonl(sft_checkpoint.path / "train_log.jsonl")
    assert log_rows[-1]["step"] == 150 and log_rows[0]["stage"] == "sft"


def test_training_rows_are_the_eval_prompt_and_loss_covers_only_the_answer(tiny_model_dir, train_samples):
    from medvqa.models.hf import render_prompt_text
    from medvqa.prompts import get_policy
    from medvqa.trainers.rows import RowBuilder, load_pil
    from transformers import AutoProcessor
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    builder = RowBuilder(processor, "")
    samples = [s for s in train_samples[:6]]
    rows = [builder.qa_row(s.image, s.question, s.answer_type, s.answer) for s in samples]
    for s, row in zip(samples, rows):
        # exactly what evaluation renders for this sample
        assert row["prompt"] == render_prompt_text(
            processor, get_policy(None).render(s.question, s.answer_type)
        )
        assert row["completion"].strip().endswith(processor.tokenizer.eos_token)
    collator = DataCollatorForVisionLanguageModeling(processor=processor, completion_only_loss=True)
    batch = collator([{**r, "images": [load_pil(r["images"][0])]} for r in rows])
    for s, labels in zip(samples, batch["labels"]):
        target = processor.tokenizer.decode(labels[labels != -100])
        assert target.split() == [*processor.tokenizer.tokenize(s.answer), processor.tokenizer.eos_token]


# --- STLLaVA-Med ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stllava_run(tmp_path_factory, tiny_model_dir, train_samples):
    """A small but real STLLaVA-Med run; records the reference model DPOTrainer was given."""
    from medvqa.trainers.stllava_med import STLLaVAMedTrainer, dpo

    seen: dict[str, object] = {}
    build = dpo.dpo_trainer

    def spy_dpo_trainer(*args, **kwargs):
        trainer, dataset, processor = build(*args, **kwargs)
        seen["trainer"] = trainer
        return trainer, dataset, processor

    out = tmp_path_factory.mktemp("stllava") / "checkpoint"
    cfg = dataclasses.replace(
        STLLaVAMedTrainer.make_config("phantom"),
        max_steps=150,
        k_questions=4,
        question_temperature=0.7,  # a short stage 1 (150 steps): ~50% parseable at 0.7, ~25% at 1.0
        generation_batch_size=64,
        dpo_num_train_epochs=3.0,
        dpo_batch_size=16,
        logging_steps=50,
    )
    chosen = select_fraction(train_samples, 0.5, 0)
    labeled = {s.image_id for s in chosen}
    heldout = [s for s in train_samples if s.image_id not in labeled]
    request = TrainRequest(
        base_model=f"hf:{tiny_model_dir}",
        train_samples=chosen,
        out_dir=out,
        seed=0,
        fraction=0.5,
        manifest_hash=manifest_hash(chosen),
        unlabeled_images=sorted({str(s.image) for s in heldout}),
        heldout_samples=heldout,
        config=cfg,
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dpo, "dpo_trainer", spy_dpo_trainer)
        checkpoint = STLLaVAMedTrainer().train(request)
    return checkpoint, seen["trainer"], request


@pytest.mark.slow
def test_stllava_stage1_asks_parseable_questions(stllava_run):
    from medvqa.benchmarks.phantom import parse_question

    checkpoint, _, request = stllava_run
    questions = read_jsonl(checkpoint.path / "stages" / "questions.jsonl")
    n_images = len(request.unlabeled_images)
    assert len(questions) == 4 * n_images
    assert len({q["id"] for q in questions}) == len(questions)
    parseable = sum(parse_question(q["question"]) is not None for q in questions) / len(questions)
    assert parseable >= 0.25, parseable  # a non-trivial rate (random init: 0)
    assert checkpoint.meta["counts"]["parseable_questions"] == pytest.approx(parseable, abs=1e-3)
    stage1 = read_json(checkpoint.path / "stages" / "stage1" / "checkpoint.json")
    assert stage1["n_self_questioning"] > 0.3 * len(request.train_samples)


@pytest.mark.slow
def test_stllava_pairs_counts_and_checkpoint(stllava_run):
    checkpoint, _, request = stllava_run
    meta = read_json(checkpoint.path / "checkpoint.json")
    assert set(meta) >= CHECKPOINT_KEYS
    counts = meta["counts"]
    rows = read_jsonl(checkpoint.path / "stages" / "pairs.jsonl")
    pairs = [r for r in rows if not r.get("replay")]  # replay rows are labeled QA, not pairs
    judged = read_jsonl(checkpoint.path / "stages" / "judged.jsonl")
    assert meta["n_pairs"] == counts["pairs"] == len(pairs) > 0
    # the phantom preset answers each distinct (image, question) once, n = 8 times
    assert counts["distinct_questions"] + counts["duplicate_questions"] == counts["questions"]
    assert counts["judged"] + counts["unjudgeable"] == len(judged) == counts["distinct_questions"]
    assert all(len(r["answers"]) == 8 for r in judged if "scores" in r)
    assert counts["pairs"] == counts["judged"] - counts["ties"]  # tie_policy skip, <= 1 pair per question
    assert counts["replay"] == len(request.train_samples) == meta["dpo"]["n_replay"]  # labeled replay
    assert sum(counts["pairs_per_category"].values()) == counts["pairs"]
    assert all(p["scores"][0] > p["scores"][1] for p in pairs)
    assert meta["loss"] == "sigmoid+sft" and meta["dpo"]["loss_type"] == ["sigmoid", "sft"]
    assert meta["n_labeled"] == len(request.train_samples) and meta["fraction"] == 0.5
    assert meta["manifest_hash"] == request.manifest_hash


@pytest.mark.slow
def test_dpo_raises_reward_margin_on_its_pairs(stllava_run):
    checkpoint, _, _ = stllava_run
    dpo = checkpoint.meta["dpo"]
    # The policy starts equal to the reference (margin exactly 0); after DPO the pairs' chosen
    # answers gained on the rejected ones.
    assert dpo["reward_margin"] > 0.05, dpo
    assert dpo["reward_accuracy"] > 0.6, dpo


@pytest.mark.slow
def test_dpo_reference_is_the_stage1_model(stllava_run):
    import torch
    from transformers import AutoModelForImageTextToText

    checkpoint, trainer, _ = stllava_run
    stage1 = AutoModelForImageTextToText.from_pretrained(checkpoint.path / "stages" / "stage1")
    final = AutoModelForImageTextToText.from_pretrained(checkpoint.path)
    ref = trainer.ref_model
    assert ref is not None and ref is not trainer.model
    ref_state, stage1_state = ref.state_dict(), stage1.state_dict()
    assert set(ref_state) == set(stage1_state)
    assert all(torch.equal(ref_state[k], stage1_state[k]) for k in stage1_state)
    changed = [k for k, v in final.state_dict().items() if not torch.equal(v, stage1_state[k])]
    assert changed, "DPO did not change the policy"


# --- resumability ---------------------------------------------------------------------------


class _Killed(RuntimeError):
    pass


class _CountingGenerator:
    """Wraps the real generator; counts generated items and 'dies' after `die_after` calls."""

    def __init__(self, inner, die_after: int | None = None):
        self.inner, self.processor, self.die_after = inner, inner.processor, die_after
        self.calls = self.items = 0

    def generate(self, requests, settings):
        if self.die_after is not None and self.calls >= self.die_after:
            raise _Killed("killed")
        self.calls += 1
        self.items += len(requests)
        return self.inner.generate(requests, settings)


@pytest.mark.slow
def test_killed_question_and_answer_stages_resume_without_redoing(stllava_run, tmp_path):
    from medvqa.trainers import stllava_med as st

    checkpoint, _, request = stllava_run
    cfg = dataclasses.replace(
        checkpoint_cfg(checkpoint),
        k_questions=2,
        generation_batch_size=10,
        n_answers=2,
        dedupe_questions=False,
    )
    images = list(request.unlabeled_images)[:20]  # 40 questions
    generator = st._load_generator(f"hf:{checkpoint.path / 'stages' / 'stage1'}")
    qpath = tmp_path / "questions.jsonl"

    killed = _CountingGenerator(generator, die_after=2)
    with pytest.raises(_Killed):
        st.generate_questions(killed, images, qpath, cfg, seed=0)
    first = read_jsonl(qpath)
    assert len(first) == 20
    with open(qpath, "a", encoding="utf-8") as fh:  # a torn last line, as a kill mid-write leaves
        fh.write('{"id": "torn", "ima')
    resumed = _CountingGenerator(generator)
    st.generate_questions(resumed, images, qpath, cfg, seed=0)
    rows = read_jsonl(qpath)
    assert resumed.items == 20  # only the missing ones
    assert rows[:20] == first and len(rows) == 40 and len({r["id"] for r in rows}) == 40

    apath = tmp_path / "answers.jsonl"
    killed = _CountingGenerator(generator, die_after=3)  # 2 calls per batch (two answers)
    with pytest.raises(_Killed):
        st.generate_answers(killed, qpath, apath, cfg, seed=0)
    n_first = len(read_jsonl(apath))
    resumed = _CountingGenerator(generator)
    st.generate_answers(resumed, qpath, apath, cfg, seed=0)
    answers = read_jsonl(apath)
    n_empty = sum(1 for r in answers if r.get("skipped"))
    assert len(answers) == 40 and len({r["id"] for r in answers}) == 40
    assert resumed.items == 2 * (40 - n_first - n_empty) + 0  # two answers per new question only
    # rerunning a finished stage generates nothing
    again = _CountingGenerator(generator)
    st.generate_answers(again, qpath, apath, cfg, seed=0)
    assert again.items == 0


def checkpoint_cfg(checkpoint):
    from medvqa.trainers.stllava_med import STLLaVAMedConfig

    return STLLaVAMedConfig(**checkpoint.meta["config"])


class _CountingExpert:
    def __init__(self, inner, die_after_items: int | None = None):
        self.inner, self.die_after_items, self.items = inner, die_after_items, 0

    def judge(self, image, question, answers):
        if self.die_after_items is not None and self.items >= self.die_after_items:
            raise _Killed("killed")
        self.items += 1
        return self.inner.judge(image, question, answers)


@pytest.mark.slow
def test_killed_judge_stage_resumes_without_rejudging(stllava_run, tmp_path):
    from medvqa.trainers import stllava_med as st
    from medvqa.trainers.experts.phantom import PhantomExpert

    checkpoint, _, _ = stllava_run
    answers = checkpoint.path / "stages" / "answers.jsonl"
    n = len(read_jsonl(answers))
    out = tmp_path / "judged.jsonl"
    killed = _CountingExpert(PhantomExpert(), die_after_items=50)
    with pytest.raises(_Killed):
        st.judge_answers(answers, out, killed, chunk_size=25)
    assert len(read_jsonl(out)) == 50
    resumed = _CountingExpert(PhantomExpert())
    counts = st.judge_answers(answers, out, resumed, chunk_size=25)
    rows = read_jsonl(out)
    assert resumed.items == n - 50 - sum(1 for r in rows if r.get("skipped") == "empty question")
    assert len(rows) == n and len({r["id"] for r in rows}) == n
    assert counts == {**st.judge_counts(checkpoint.path / "stages" / "judged.jsonl"), "failed": 0}


# --- pairs, experts ---------------------------------------------------------------------------


def _judged(tmp_path, rows):
    path = tmp_path / "judged.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_pairs_tie_policies(tmp_path):
    from medvqa.trainers.stllava_med import make_pairs

    base = {"image": "a.png", "question": "is this a ct?", "answer_type": "CLOSED"}
    judged = _judged(
        tmp_path,
        [
            {**base, "id": "1", "answers": ["yes", "no"], "scores": [10, 0]},
            {**base, "id": "2", "answers": ["yes", "no"], "scores": [0, 10]},
            {**base, "id": "3", "answers": ["maybe", "no"], "scores": [0, 0]},
            {**base, "id": "4", "answers": ["ct", "mri"], "skipped": "unjudgeable"},
        ],
    )
    counts = make_pairs(judged, tmp_path / "p.jsonl", "skip")
    pairs = read_jsonl(tmp_path / "p.jsonl")
    assert {k: counts[k] for k in ("judged", "unjudgeable", "ties", "pairs", "chosen_yes")} == {
        "judged": 3,
        "unjudgeable": 1,
        "ties": 1,
        "pairs": 2,
        "chosen_yes": 1,
    }
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("yes", "no"), ("no", "yes")]
    assert pairs[0]["prompt"] == "is this a ct?"
    counts = make_pairs(judged, tmp_path / "p2.jsonl", "second")
    pairs = read_jsonl(tmp_path / "p2.jsonl")
    assert counts["pairs"] == 3 and (pairs[2]["chosen"], pairs[2]["rejected"]) == ("no", "maybe")
    with pytest.raises(BadInput):
        make_pairs(judged, tmp_path / "p3.jsonl", "first")


def test_phantom_expert_scores_against_the_scene(phantom_root):
    from medvqa.benchmarks.phantom import load_scenes
    from medvqa.registry import experts

    expert = experts.get("phantom")()
    scene = next(iter(load_scenes(phantom_root, "train").values()))
    image = str(Path(phantom_root) / "train" / "images" / f"{scene.image_id}.png")
    truth, other = scene.modality, next(m for m in ("ct", "mri", "x-ray") if m != scene.modality)
    assert expert.judge(image, "what modality is this?", [truth, other]) == [10.0, 0.0]
    assert expert.judge(image, f"Is this a {other}?", ["yes", "No."]) == [0.0, 10.0]
    assert expert.judge(image, "what is the meaning of life?", ["42", "ct"]) is None  # unparseable
    if scene.n_lesions != 1:  # location is undefined unless exactly one lesion: never guessed
        assert expert.judge(image, "where is the lesion?", ["upper left", "lower right"]) is None
    assert expert.counts()["unparseable"] == 1
    with pytest.raises(BadInput):
        experts.get("phantom")(split="test")


def test_reference_expert_uses_heldout_training_qa_only(train_samples):
    from medvqa.registry import experts

    Ref = experts.get("reference")
    s = train_samples[0]
    expert = Ref(samples=train_samples[:10])
    assert expert.judge(s.image, s.question.upper(), [s.answer, "zzz"]) == [10.0, 0.0]
    assert expert.judge(s.image, "an unseen question?", ["a", "b"]) is None
    with pytest.raises(BadInput, match="training data only"):
        Ref(samples=[dataclasses.replace(s, split="test")])
    from medvqa.trainers.stllava_med import (
        build_expert,  # how the trainer builds it: TrainRequest.heldout_samples
    )

    assert build_expert("reference", heldout_samples=train_samples[10:30]).n_samples == 20


def test_reference_expert_scores_with_the_strict_scorers_words(tmp_path):
    """The judge's F1 is the strict scorer's open_f1 (one normalization, one token F1 in the tree):
    articles, number words and punctuation count as the metric counts them."""
    from medvqa.registry import experts
    from medvqa.scoring import score_item
    from medvqa.types import VQASample

    image = str(tmp_path / "a.png")
    cases = [
        ("the left lung", "Left lung."),
        ("two", "2"),
        ("left upper lobe", "upper lobe"),
        ("heart", "liver"),
    ]
    samples = [
        VQASample(f"q{i}", image, f"Where is it {i}?", gold, "OPEN", "phantom", "train", {})
        for i, (gold, _) in enumerate(cases)
    ]
    expert = experts.get("reference")(samples=samples)
    for i, (gold, answer) in enumerate(cases):
        (score,) = expert.judge(image, f"where is it {i}", [answer])  # the question matched as normalized
        assert score == pytest.approx(score_item("strict", "OPEN", gold, answer)["open_f1"] / 10, abs=1e-4)
    assert expert.judge(image, "Where is it 0?", ["left lung", "lung"]) == [10.0, 6.6667]  # "the" dropped


def test_reference_expert_reads_a_samples_file_with_the_samples_reader(train_samples, tmp_path):
    """--samples-file is read by medvqa.answer_files.read_samples_jsonl (validated, one line per
    sample): a bad record is one BadInput naming file and field, not a KeyError."""
    from medvqa.registry import experts

    path = tmp_path / "heldout.jsonl"
    path.write_text("".join(json.dumps(s.to_json()) + "\n" for s in train_samples[:10]))
    expert = experts.get("reference")(samples_file=str(path))
    s = train_samples[0]
    assert expert.n_samples == 10 and expert.judge(s.image, s.question, [s.answer]) == [10.0]
    path.write_text(json.dumps({"id": "x", "image": "a.png", "question": "q?"}) + "\n")
    with pytest.raises(BadInput, match="missing field") as err:
        experts.get("reference")(samples_file=str(path))
    assert "heldout.jsonl" in str(err.value) and "answer" in str(err.value)


# --- CLI ---------------------------------------------------------------------------------------


def test_cli_train_sft_writes_a_loadable_checkpoint(tiny_model_dir, phantom_root, tmp_path, capsys):
    from medvqa.cli import main

    out = tmp_path / "ckpt"
    common = ["--model", f"hf:{tiny_model_dir}", "--benchmark", "phantom", "--root", str(phantom_root)]
    assert main(["train", "--trainer", "sft", *common, "--fraction", "0.25", "--seed", "1", "--out", str(out),
                 "--preset", "phantom", "--max-steps", "4", "--logging-steps", "2"]) == 0  # fmt: skip
    meta = read_json(out / "checkpoint.json")
    assert meta["fraction"] == 0.25 and meta["seed"] == 1 and meta["config"]["max_steps"] == 4
    assert meta["config"]["learning_rate"] == 1e-3  # from the preset
    assert (
        main(["train", "--trainer", "sft", *common, "--out", str(tmp_path / "x"), "--k-questions", "3"]) == 2
    )
    assert "not a setting of trainer 'sft'" in capsys.readouterr().err
    assert main(["train", "--trainer", "stllava-med", *common, "--out", str(tmp_path / "y"),
                 "--preset", "phantom", "--show-config"]) == 0  # fmt: skip
    shown = json.loads(capsys.readouterr().out)
    assert shown["dpo_loss"] == "sigmoid+sft" and shown["k_questions"] == 8
    assert (
        main(["train", "--trainer", "stllava-med", *common, "--out", str(tmp_path / "y"), "--show-config"])
        == 0
    )
    paper = json.loads(capsys.readouterr().out)
    assert (paper["dpo_loss"], paper["beta"], paper["k_questions"], paper["dpo_num_train_epochs"]) == (
        "sigmoid",
        0.1,
        5,
        1.0,
    )
    assert (paper["question_temperature"], paper["question_top_p"], paper["tie_policy"]) == (
        1.2,
        0.95,
        "skip",
    )


@pytest.mark.slow
def test_cli_stllava_dpo_with_lora_on_explicit_pairs(stllava_run, tmp_path, capsys):
    """`medvqa stllava dpo` on the run's pairs with a LoRA adapter: the reference is the
    adapter-disabled stage-1 model; the adapter folder loads for evaluation on its stage-1 base."""
    from medvqa.cli import main
    from medvqa.models import load_model

    checkpoint, _, request = stllava_run
    stage1 = checkpoint.path / "stages" / "stage1"
    out = tmp_path / "dpo-lora"
    argv = [
        "stllava",
        "dpo",
        "--model",
        f"hf:{stage1}",
        "--pairs",
        str(checkpoint.path / "stages" / "pairs.jsonl"),
    ]
    argv += [
        "--out",
        str(out),
        "--use-lora",
        "--lora-target-modules",
        "q_proj,v_proj",
        "--dpo-max-steps",
        "2",
    ]
    argv += ["--dpo-batch-size", "8", "--dpo-learning-rate", "1e-3"]
    assert main(argv) == 0
    meta = read_json(out / "checkpoint.json")
    assert (
        meta["loss"] == "sigmoid" and meta["dpo"]["steps"] == 2
    )  # the paper's loss unless a preset says otherwise
    assert (
        meta["n_labeled"] == checkpoint.meta["n_labeled"]
        and meta["manifest_hash"] == checkpoint.meta["manifest_hash"]
    )
    adapter_cfg = read_json(out / "adapter_config.json")
    assert Path(adapter_cfg["base_model_name_or_path"]) == stage1.resolve()
    from medvqa.prompts import get_policy
    from medvqa.types import GenerationRequest, GenerationSettings
    from peft import PeftModel

    model = load_model(f"hf:{out}")
    assert isinstance(model.model, PeftModel)  # the adapter on its stage-1 base, not merged
    lora_b = [p for n, p in model.model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained: LoRA's B starts at zero
    image = request.unlabeled_images[0]
    prompt = get_policy("plain").render("is this a ct?", "CLOSED")
    answers = model.generate([GenerationRequest(image, prompt, "q")], GenerationSettings(max_new_tokens=2))
    assert len(answers) == 1 and isinstance(answers[0], str)


def test_cli_train_align_on_phantom_captions(tiny_model_dir, phantom_root, tmp_path):
    from medvqa.cli import main

    out = tmp_path / "align"
    argv = ["train", "--trainer", "align", "--model", f"hf:{tiny_model_dir}", "--benchmark", "phantom"]
    argv += ["--root", str(phantom_root), "--out", str(out), "--preset", "phantom", "--max-steps", "3"]
    assert main(argv) == 0
    meta = read_json(out / "checkpoint.json")
    assert meta["trainer"] == "align" and meta["n_labeled"] == 0 and meta["n_captions"] == 120
    assert meta["loss"] == "nll (caption only)" and (out / "model.safetensors").is_file()


@pytest.mark.slow
def test_cli_stllava_steps_on_explicit_files(stllava_run, tmp_path, capsys):
    from medvqa.cli import main

    checkpoint, _, request = stllava_run
    stage1 = f"hf:{checkpoint.path / 'stages' / 'stage1'}"
    images = tmp_path / "images.txt"
    images.write_text("\n".join(list(request.unlabeled_images)[:6]) + "\n", encoding="utf-8")
    q, a, j, p = (tmp_path / f"{n}.jsonl" for n in ("questions", "answers", "judged", "pairs"))
    assert main(["stllava", "questions", "--model", stage1, "--images", str(images), "--out", str(q),
                 "--preset", "phantom", "--k-questions", "3", "--question-temperature", "0.7"]) == 0  # fmt: skip
    assert len(read_jsonl(q)) == 18 and read_json(tmp_path / "questions.jsonl.counts.json")["images"] == 6
    assert main(["stllava", "answers", "--model", stage1, "--questions", str(q), "--out", str(a)]) == 0
    assert all(len(r["answers"]) == 2 for r in read_jsonl(a) if not r.get("skipped"))
    assert main(["stllava", "judge", "--answers", str(a), "--out", str(j), "--expert", "phantom"]) == 0
    assert main(["stllava", "pairs", "--judged", str(j), "--out", str(p), "--tie-policy", "second"]) == 0
    counts = read_json(tmp_path / "pairs.jsonl.counts.json")
    assert counts["judged"] + counts["unjudgeable"] == 18 and counts["pairs"] == counts["judged"]
    assert main(["stllava", "judge", "--answers", str(a), "--out", str(j), "--expert", "nobody"]) == 2
    assert "unknown expert 'nobody'" in capsys.readouterr().err


@pytest.mark.slow
def test_sigkilled_questions_step_resumes(stllava_run, tmp_path):
    """A real `kill -9` of `medvqa stllava questions`; the rerun keeps every finished row."""
    import os
    import signal
    import subprocess
    import sys
    import time

    checkpoint, _, request = stllava_run
    images = tmp_path / "images.txt"
    images.write_text("\n".join(request.unlabeled_images) + "\n", encoding="utf-8")
    out = tmp_path / "questions.jsonl"
    argv = [
        sys.executable,
        "-m",
        "medvqa.cli",
        "stllava",
        "questions",
        "--images",
        str(images),
        "--out",
        str(out),
    ]
    argv += ["--model", f"hf:{checkpoint.path / 'stages' / 'stage1'}", "--k-questions", "20"]
    argv += ["--generation-batch-size", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.is_file() and out.stat().st_size > 0:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = read_jsonl(out, allow_truncated_tail=True)
    total = 20 * len(request.unlabeled_images)
    assert 0 < len(before) < total  # killed mid-way
    # Mark a flushed row: sampling is seeded per question, so a rerun that regenerated the file
    # would write the same rows again; only a rerun that kept the finished rows keeps the mark.
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    before[0] = {**before[0], "question": "kept, not redone?"}
    lines[0] = json.dumps(before[0]) + "\n"
    out.write_text("".join(lines), encoding="utf-8")
    assert subprocess.run(argv, env=env, capture_output=True).returncode == 0
    after = read_jsonl(out)
    assert after[: len(before)] == before and len(after) == total == len({r["id"] for r in after})


def test_question_sampling_seeds_do_not_depend_on_where_the_data_lives(tiny_model_dir, tmp_path):
    """Same config + same seed = same questions, whether the run's images sit in one folder or another."""
    from medvqa.trainers import stllava_med as st
    from transformers import AutoProcessor

    class Recorder:
        processor = AutoProcessor.from_pretrained(tiny_model_dir)

        def __init__(self):
            self.seeds = []

        def generate(self, requests, settings):
            self.seeds += [r.seed for r in requests]  # one seed (and generator) per question
            return ["is the image normal?"] * len(requests)

    cfg = dataclasses.replace(st.STLLaVAMedConfig(), k_questions=2, generation_batch_size=2)
    runs = []
    for folder in ("here", "there/deeper"):
        recorder = Recorder()
        images = [str(tmp_path / folder / f"train-{i:05d}.png") for i in range(3)]
        st.generate_questions(recorder, images, tmp_path / folder / "questions.jsonl", cfg, seed=7)
        runs.append(recorder.seeds)
    assert runs[0] == runs[1] and len(set(runs[0])) == 6
