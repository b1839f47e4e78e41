"""STLLaVA-Med stage 2 on the tiny LLaVA: pair construction, replay, per-item seeds, locks, judges.

- Pairs: most common correct vs most common wrong answer of n, a margin, a cap per question; the
  counts that explain a result (identical ties, mixed, closed chosen-yes rate, per category).
- Sampling: each question/answer has its own seed and generator, so a stage killed mid-way and
  resumed at another batch size writes the same bytes as one uninterrupted run.
- A second process on a stage's output fails at once; repeated ids are read back once.
- Judges: the noisy oracle flips a seeded share of verdicts; the model judge answers itself.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from medvqa.errors import BadInput
from medvqa.io import output_lock, read_jsonl


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --- pairs ------------------------------------------------------------------------------------


def test_pair_is_most_common_correct_vs_most_common_wrong():
    from medvqa.trainers.stllava_med import select_pairs

    answers = ["ct", "mri", "mri", "x-ray", "ct", "mri", "ct", "ct"]
    scores = [10, 0, 0, 0, 10, 0, 10, 10]
    assert select_pairs(answers, scores) == [("ct", "mri", 10, 0)]
    # the cap: best vs each worse distinct answer, most frequent first
    assert select_pairs(answers, scores, per_question=3) == [("ct", "mri", 10, 0), ("ct", "x-ray", 10, 0)]
    # graded scores: the best vs the worst, and only above the margin
    assert select_pairs(["a", "b", "c"], [7, 2, 5]) == [("a", "b", 7, 2)]
    assert select_pairs(["a", "b"], [7, 6.5], min_margin=1.0) == []
    # all equal: a tie (skipped, or the original code's rule: answer 2 over answer 1)
    assert select_pairs(["no", "no"], [0, 0]) == []
    assert select_pairs(["maybe", "no"], [0, 0], tie_policy="second") == [("no", "maybe", 0, 0)]


def test_make_pairs_counts_explain_the_result_and_replay_is_not_a_pair(tmp_path, train_samples):
    from medvqa.trainers.stllava_med import make_pairs

    base = {"image": "a.png", "answer_type": "CLOSED", "category": "normal"}
    judged = _write(
        tmp_path / "judged.jsonl",
        [
            {**base, "id": "1", "question": "is it normal?", "answers": ["yes"] * 3 + ["no"], "scores": [10] * 3 + [0]},
            {**base, "id": "2", "question": "is it normal?", "answers": ["no", "no", "no", "no"], "scores": [0] * 4},
            {**base, "id": "3", "question": "is it normal?", "answers": ["no", "yes", "no", "no"], "scores": [10, 0, 10, 10]},
            {**base, "id": "4", "question": "what?", "answers": ["x", "y"], "skipped": "unjudgeable"},
            {**base, "id": "5", "question": "what?", "answer_type": "OPEN", "category": "modality",
             "answers": ["ct", "ct", "ct", "mri"], "scores": [10, 10, 10, 10]},
            {**base, "id": "1", "question": "is it normal?", "answers": ["yes", "no"], "scores": [10, 0]},  # a repeat
        ],
    )  # fmt: skip
    replay = train_samples[:5]
    counts = make_pairs(judged, tmp_path / "pairs.jsonl", min_margin=1.0, replay=replay)
    rows = read_jsonl(tmp_path / "pairs.jsonl")
    assert counts["judged"] == 4 and counts["unjudgeable"] == 1  # the repeated id "1" counts once
    assert (counts["ties"], counts["ties_identical"], counts["mixed"]) == (2, 1, 2)
    assert counts["pairs"] == 2 and counts["replay"] == 5 and len(rows) == 7
    assert counts["closed_pairs"] == 2 and counts["closed_chosen_yes_rate"] == 0.5
    assert counts["pairs_per_category"] == {"normal": 2}
    pairs = [r for r in rows if not r.get("replay")]
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("yes", "no"), ("no", "yes")]
    replayed = [r for r in rows if r.get("replay")]
    assert all(r["chosen"] == r["rejected"] for r in replayed)
    assert [r["chosen"] for r in replayed] == [s.answer for s in replay]


# --- per-item seeds: resume-exact, batch-independent -----------------------------------------


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    from medvqa.models import load_model

    return load_model(f"hf:{tiny_model_dir}")


@pytest.fixture(scope="module")
def train_samples(phantom_root):
    from medvqa.benchmarks.phantom import Phantom

    return Phantom().load("train", Path(phantom_root))


def test_hf_sampling_with_per_request_seeds_does_not_depend_on_the_batch(generator, train_samples):
    from medvqa.prompts import get_policy
    from medvqa.types import GenerationRequest, GenerationSettings

    policy = get_policy(None)
    requests = [
        GenerationRequest(image=s.image, prompt=policy.render(s.question, s.answer_type), seed=100 + k)
        for k, s in enumerate(train_samples[:12])
    ]
    settings = GenerationSettings(max_new_tokens=6, do_sample=True, temperature=1.5, top_p=1.0)
    whole = generator.generate(requests, settings)
    in_fives = [t for k in range(0, 12, 5) for t in generator.generate(requests[k : k + 5], settings)]
    reversed_ = generator.generate(requests[::-1], settings)[::-1]
    assert whole == in_fives == reversed_
    assert len(set(whole)) > 6  # really sampled (a random-init model at T 1.5)
    reseeded = [dataclasses.replace(r, seed=r.seed + 1) for r in requests]
    assert generator.generate(reseeded, settings) != whole


class _Killed(RuntimeError):
    pass


class _Dying:
    """The real generator, 'killed' (an exception) after `calls` generate() calls."""

    def __init__(self, inner, calls: int):
        self.inner, self.processor, self.calls = inner, inner.processor, calls

    def generate(self, requests, settings):
        if self.calls <= 0:
            raise _Killed
        self.calls -= 1
        return self.inner.generate(requests, settings)


def _cfg(**over):
    from medvqa.trainers.stllava_med import STLLaVAMedTrainer

    base = STLLaVAMedTrainer.make_config("phantom")
    return dataclasses.replace(
        base, **{"k_questions": 3, "question_max_new_tokens": 8, "answer_max_new_tokens": 4, **over}
    )


def test_killed_questions_and_answers_resume_to_identical_bytes(generator, train_samples, tmp_path):
    from medvqa.trainers import stllava_med as st

    images = sorted({str(s.image) for s in train_samples})[:10]
    ref_q, ref_a = tmp_path / "ref-q.jsonl", tmp_path / "ref-a.jsonl"
    st.generate_questions(generator, images, ref_q, _cfg(generation_batch_size=30), seed=3)
    st.generate_answers(generator, ref_q, ref_a, _cfg(generation_batch_size=64), seed=3)

    q, a = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    with pytest.raises(_Killed):
        st.generate_questions(_Dying(generator, 2), images, q, _cfg(generation_batch_size=7), seed=3)
    assert 0 < len(read_jsonl(q)) < 30
    with open(q, "a", encoding="utf-8") as fh:  # the torn line a kill mid-write leaves
        fh.write('{"id": "torn", "ima')
    st.generate_questions(generator, images, q, _cfg(generation_batch_size=4), seed=3)
    assert q.read_bytes() == ref_q.read_bytes()

    with pytest.raises(_Killed):
        st.generate_answers(_Dying(generator, 1), q, a, _cfg(generation_batch_size=16), seed=3)
    assert len(read_jsonl(a)) > 0
    counts = st.generate_answers(generator, q, a, _cfg(generation_batch_size=40), seed=3)
    assert a.read_bytes() == ref_a.read_bytes()
    rows = read_jsonl(a)
    assert counts["distinct_questions"] == len(rows) and all(len(r["answers"]) == 8 for r in rows)


def test_a_second_process_on_a_stage_output_fails_at_once(generator, train_samples, tmp_path):
    from medvqa.trainers import stllava_med as st

    images = sorted({str(s.image) for s in train_samples})[:2]
    out = tmp_path / "questions.jsonl"
    with output_lock(out), pytest.raises(BadInput, match="another process"):  # as another process holds it
        st.generate_questions(generator, images, out, _cfg(), seed=0)
    assert not out.exists()
    with output_lock(tmp_path / "judged.jsonl"), pytest.raises(BadInput, match="another process"):
        answers = _write(
            tmp_path / "answers.jsonl",
            [{"id": "x", "image": images[0], "question": "q?", "answers": ["a", "b"]}],
        )
        st.judge_answers(answers, tmp_path / "judged.jsonl", _Oracle())  # fmt: skip


class _Oracle:
    def judge(self, image, question, answers):
        return [10.0 if a == "a" else 0.0 for a in answers]


def test_distinct_questions_are_answered_once(tmp_path):
    from medvqa.trainers.stllava_med import distinct_questions

    rows = [
        {"id": "i-q0", "image": "i.png", "question": "Is the image normal?"},
        {"id": "i-q1", "image": "i.png", "question": "is the image  normal ?"},
        {"id": "j-q0", "image": "j.png", "question": "Is the image normal?"},
    ]
    assert [r["id"] for r in distinct_questions(rows)] == ["i-q0", "j-q0"]


# --- judges -----------------------------------------------------------------------------------


def test_noisy_oracle_flips_a_seeded_share_of_verdicts(train_samples):
    from medvqa.registry import experts

    exact = experts.get("phantom")()
    clean = experts.get("noisy-phantom")(error_rate=0.0)
    noisy = experts.get("noisy-phantom")(error_rate=0.3, seed=1)
    items = [(s.image, s.question, [s.answer, "zzz"]) for s in train_samples]
    truth = exact.judge_many(items)
    assert clean.judge_many(items) == truth
    flipped = noisy.judge_many(items)
    assert noisy.judge_many(items[::-1]) == flipped[::-1]  # the same verdicts in any order
    n = sum(len(t) for t in truth if t is not None)
    wrong = sum(
        a != b
        for t, f in zip(truth, flipped, strict=True)
        if t is not None
        for a, b in zip(t, f, strict=True)
    )
    assert 0.2 < wrong / n < 0.4, wrong / n
    accuracy = noisy.agreement(train_samples)["accuracy"]
    assert 60 < accuracy < 80 and exact.agreement(train_samples)["accuracy"] == 100.0
    with pytest.raises(BadInput):
        experts.get("noisy-phantom")(error_rate=1.5)


def test_model_judge_scores_agreement_with_its_own_answer(tiny_model_dir, generator, train_samples):
    from medvqa.prompts import get_policy
    from medvqa.registry import experts
    from medvqa.scoring import normalize_strict
    from medvqa.trainers.rows import guess_answer_type
    from medvqa.types import GenerationRequest, GenerationSettings

    judge = experts.get("model")(model=f"hf:{tiny_model_dir}")
    policy = get_policy(None)
    samples = train_samples[:10]
    own = generator.generate(
        [
            GenerationRequest(image=s.image, prompt=policy.render(s.question, guess_answer_type(s.question)))
            for s in samples
        ],
        GenerationSettings(max_new_tokens=8),
    )
    for s, answer in zip(samples, own, strict=True):
        expected = [10.0, 0.0] if normalize_strict(answer) else None  # an empty judge answer: unjudgeable
        assert judge.judge(s.image, s.question, [answer, answer + " zzz"]) == expected
    assert judge.counts()["generated"] == len({(s.image, s.question) for s in samples})
    report = judge.agreement(train_samples[:20])
    assert report["n"] == 20 and report["judge_model"] == f"hf:{tiny_model_dir}"
    with pytest.raises(BadInput):
        experts.get("model")()


class _FewQuestions:
    """A generator with three possible questions, drawn by each request's own seed."""

    def __init__(self, fail_after: int | None = None):
        self.calls, self.fail_after = 0, fail_after

    def generate(self, requests, settings):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise _Killed
        self.calls += 1
        return [f"is this question {r.seed % 3}?" for r in requests]


def test_questions_are_sampled_until_m_distinct_and_resume_exactly(tmp_path):
    from medvqa.trainers import stllava_med as st
    from medvqa.trainers.stllava_med.answers import question_key

    images = [str(tmp_path / f"img-{i}.png") for i in range(6)]
    cfg = _cfg(k_questions=2, min_distinct_questions=3, max_question_rounds=4, generation_batch_size=3)
    ref = tmp_path / "ref.jsonl"
    st.generate_questions(_FewQuestions(), images, ref, cfg, seed=1)
    rows = read_jsonl(ref)
    for img in images:
        mine = [r for r in rows if r["image"] == img]
        distinct = {question_key(img, r["question"]) for r in mine}
        # another round of k only while fewer than m distinct, at most max_question_rounds rounds
        assert len(mine) in (2, 4, 6, 8) and (len(distinct) >= 3 or len(mine) == 8)
        assert (
            len(distinct) < 3
            or len(mine) == 2
            or len({question_key(img, r["question"]) for r in mine[:-2]}) < 3
        )
    assert len(rows) > 2 * len(images)  # some images needed more rounds
    killed = tmp_path / "killed.jsonl"
    with pytest.raises(_Killed):
        st.generate_questions(_FewQuestions(fail_after=5), images, killed, cfg, seed=1)
    st.generate_questions(
        _FewQuestions(), images, killed, dataclasses.replace(cfg, generation_batch_size=5), seed=1
    )
    assert killed.read_bytes() == ref.read_bytes()


def test_config_refuses_out_of_range_values():
    from medvqa.trainers.stllava_med import STLLaVAMedConfig

    for bad in ({"n_answers": 0}, {"answer_top_p": 0.0}, {"pairs_per_question": 0}, {"sq_ratio": 1.5}):
        with pytest.raises(BadInput, match=next(iter(bad))):
            STLLaVAMedConfig(**bad)


def test_cli_pairs_replays_the_labeled_fraction(phantom_root, train_samples, tmp_path, capsys):
    from medvqa.cli import main
    from medvqa.fractions import select_fraction

    judged = _write(
        tmp_path / "judged.jsonl",
        [{"id": "1", "image": "a.png", "question": "is it normal?", "answer_type": "CLOSED",
          "answers": ["yes", "no", "yes"], "scores": [10, 0, 10]}],
    )  # fmt: skip
    out = tmp_path / "pairs.jsonl"
    argv = ["stllava", "pairs", "--judged", str(judged), "--out", str(out), "--labeled-replay"]
    assert main([*argv, "--replay-benchmark", "phantom", "--replay-root", str(phantom_root),
                 "--replay-fraction", "0.25", "--seed", "2"]) == 0  # fmt: skip
    rows = read_jsonl(out)
    labeled = select_fraction(train_samples, 0.25, 2)
    assert [r["chosen"] for r in rows if r.get("replay")] == [s.answer for s in labeled]
    counts = json.loads((tmp_path / "pairs.jsonl.counts.json").read_text())
    assert counts["pairs"] == 1 and counts["replay"] == len(labeled)
    assert main(argv) == 2 and "--replay-benchmark" in capsys.readouterr().err
