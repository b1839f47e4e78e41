"""Golden tests for the scorers: each LLaVA-Med quirk, each strict-vs-llava-med disagreement,
equality with a per-item port of the reference loop, and the clustered bootstrap."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from medvqa.errors import BadInput
from medvqa.scoring import (
    CONTRACTIONS,
    PERIOD_STRIP_COUNT,
    PUNCT,
    cluster_bootstrap_ci,
    llava_med_exact_match,
    llava_med_f1,
    normalize_llava_med,
    normalize_strict,
    score_item,
    score_samples,
    sentence_bleu4,
)
from medvqa.types import VQASample
from nltk.translate.bleu_score import sentence_bleu

from tests.perf import reference_llava_med as ref
from tests.perf.synthetic_items import make_items

# nltk warns on every zero n-gram overlap (the reference silences it too)
pytestmark = pytest.mark.filterwarnings("ignore:\\s*The hypothesis contains 0 counts:UserWarning")


def llava(kind: str, gold: str, pred: str) -> dict[str, float]:
    return score_item("llava-med", kind, gold, pred)


def strict(kind: str, gold: str, pred: str) -> dict[str, float]:
    return score_item("strict", kind, gold, pred)


# ------------------------------------------------------------------ normalization: the quirks


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("x-ray", "x ray"),  # a mark with no space beside it becomes a space
        ("X-Ray", "x ray"),  # lowercase (after the punctuation step)
        ("x-ray - left", "xray left"),  # ...but is deleted everywhere once the text has " -" or "- "
        ("(left)", "left"),
        ("left (upper)", "left upper"),  # " (" → "(" deleted; ")" not beside a space → space
        ("yes, it is", "yes it is"),  # ", " → comma deleted
        ("yes,no", "yes no"),  # comma with no space beside it → space
        ("1,000 x-ray", "1000 xray"),  # digit,digit anywhere → every mark deleted (and 1,000 → 1000)
        ("3.5 cm.", "3.5 cm"),  # a period before a digit stays, others go
        ("e.g. t2", "eg t2"),  # periods are deleted, not replaced by a space
        ("two", "2"),
        ("none", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),
        ("the liver", "liver"),
        ("a mass and an effusion", "mass and effusion"),
        ("dont", "don't"),
        ("Im", "im"),  # capitalised contraction keys never match lowercased text
        ("somebody'd", "somebodyd"),  # the VQA map's own oddity
        ("  many   spaces\there ", "many spaces here"),
        ("", ""),
        ("?!", ""),
        ("a/b\\c_d=e+f>g<h@i`j;k", "b c d e f g h i j k"),
    ],
)
def test_llava_med_normalization_golden(text, expected):
    assert normalize_llava_med(text) == expected
    assert ref.normalize_word(text) == expected  # the port of the reference agrees


def test_only_the_first_32_periods_are_stripped():
    assert PERIOD_STRIP_COUNT == 32
    assert normalize_llava_med("." * 40) == "." * 8
    assert normalize_llava_med("a" + ". " * 40 + "lung") == " ".join(["."] * 8 + ["lung"])
    assert normalize_llava_med("." * 32) == ""


def test_recall_sees_a_second_normalization_pass_and_closed_does_not():
    # The reference normalizes again inside its F1 helper: leftover periods go there, not in the
    # substring test or BLEU.
    pred = "lung" + " ." * 40
    assert llava("OPEN", "lung", pred)["open_recall"] == 100.0
    assert llava("OPEN", "lung", pred)["open_precision"] == 100.0
    hyp = normalize_llava_med(pred).split()
    assert len(hyp) == 9
    assert llava("OPEN", "lung", pred)["open_bleu"] == 100.0 * sentence_bleu([["lung"]], hyp)
    r = ref.evaluate([("OPEN", "lung", pred)])["items"][0]
    assert r["open_recall"] == 1.0


def test_the_tables_are_the_vqa_ones():
    assert len(PUNCT) == 21 and set(PUNCT) == set(';/[]"{}()=+\\_-><@`,?!')
    assert len(CONTRACTIONS) == 120 and CONTRACTIONS["wont"] == "won't"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("X-ray", "x ray"),
        ("x-ray - left", "x ray left"),  # no context-dependent gluing
        ("1,000 x-ray", "1000 x ray"),
        ("3.5 cm.", "3.5 cm"),
        ("e.g. t2", "e g t2"),
        ("." * 40 + "lung", "lung"),  # no 32-period cap
        ("Answer: two", "answer 2"),
        ("Ｙｅｓ", "yes"),  # NFKC
        ("The liver.", "liver"),
    ],
)
def test_strict_normalization(text, expected):
    assert normalize_strict(text) == expected


# ------------------------------------------------------------------ closed questions


@pytest.mark.parametrize(
    ("gold", "pred", "llava_hit", "strict_hit"),
    [
        ("no", "normal", 100, 0),  # substring quirk: "no" is in "normal"
        ("no", "The heart size is normal.", 100, 0),
        ("yes", "eyes", 100, 0),
        ("yes", "yes and no", 100, 0),  # a hedge scores under llava-med, never under strict
        ("no", "yes and no", 100, 0),
        ("yes", "Yes, there is an infarct.", 100, 100),  # verbose but decided: both agree
        ("no", "There is no fracture.", 100, 100),
        ("no", "yes", 0, 0),
        ("Yes", "YES.", 100, 100),
        ("left", "The lesion is on the left side.", 100, 0),  # verbose non-yes/no: strict needs the answer
        ("left", "Left.", 100, 100),
        ("ct", "It is a CT scan", 100, 0),
        ("2", "two", 100, 100),
        ("yes", "", 0, 0),
        ("no", "not sure", 100, 0),
        ("the", "anything", 100, 0),  # a gold that normalizes to "" is a substring of everything
    ],
)
def test_closed_golden(gold, pred, llava_hit, strict_hit):
    assert llava("CLOSED", gold, pred) == {"closed_accuracy": llava_hit}
    assert strict("CLOSED", gold, pred) == {"closed_accuracy": strict_hit}


# ------------------------------------------------------------------ open questions


def test_open_recall_counts_prediction_side_words():
    m = llava("OPEN", "right upper lobe", "upper upper upper")
    assert m["open_recall"] == pytest.approx(60.0)  # tp = 3 (prediction count), fn = 2
    assert m["open_precision"] == pytest.approx(100.0)
    assert m["open_f1"] == pytest.approx(75.0)
    assert m["open_exact_match"] == pytest.approx(100 / 3)  # 1 distinct gold word / 3 tokens
    s = strict("OPEN", "right upper lobe", "upper upper upper")
    assert s["open_recall"] == pytest.approx(100 / 3)  # sets: 1 of 3 gold words
    assert s["open_precision"] == pytest.approx(100.0)
    assert s["open_f1"] == pytest.approx(50.0)
    assert s["open_exact_match"] == 0.0


@pytest.mark.parametrize(
    ("gold", "pred", "recall", "strict_recall", "strict_exact"),
    [
        ("x-ray", "X ray", 100, 100, 100),
        ("2", "two", 100, 100, 100),
        ("the liver", "Liver.", 100, 100, 100),
        ("hemorrhage in the left frontal lobe", "hemorrhage", 20, 20, 0),
        ("liver", "The image shows the liver, which is enlarged", 100, 100, 0),  # verbose
        ("liver", "", 0, 0, 0),
        ("liver", "kidney", 0, 0, 0),
    ],
)
def test_open_golden(gold, pred, recall, strict_recall, strict_exact):
    assert llava("OPEN", gold, pred)["open_recall"] == pytest.approx(recall)
    s = strict("OPEN", gold, pred)
    assert s["open_recall"] == pytest.approx(strict_recall)
    assert s["open_exact_match"] == strict_exact


def test_verbose_answer_llava_exact_match_is_diluted_by_length():
    m = llava("OPEN", "liver", "The image shows the liver, which is enlarged")
    assert m["open_exact_match"] == pytest.approx(100 / 6)  # image shows liver which is enlarged
    assert m["open_precision"] == pytest.approx(100 / 6)


# ------------------------------------------------------------------ BLEU


def test_bleu_equals_nltk_bit_for_bit():
    rng = random.Random(3)
    vocab = ["a", "b", "c", "d", "e"]
    for _ in range(3000):
        r = [rng.choice(vocab) for _ in range(rng.randint(0, 7))]
        h = [rng.choice(vocab) for _ in range(rng.randint(0, 9))]
        assert sentence_bleu4(r, h) == sentence_bleu([r], h), (r, h)


# ------------------------------------------------------------------ against the reference loop


def test_fast_scorer_equals_the_reference_port_item_by_item():
    items = make_items(3000, seed=7)
    expected = ref.evaluate(items)
    samples = [
        VQASample(
            id=str(i),
            image=f"img{i // 4}",
            question="q",
            answer=g,
            answer_type=k,
            benchmark="t",
            split="test",
        )
        for i, (k, g, _) in enumerate(items)
    ]
    result = score_samples(samples, [p for _, _, p in items], scorers="llava-med", n_boot=0)
    for row, exp, (_, gold, pred) in zip(result.rows, expected["items"], items):
        assert normalize_llava_med(gold.lower()) == ref.normalize_word(gold.lower())
        assert normalize_llava_med(pred.lower()) == ref.normalize_word(pred.lower())
        for metric, value in row["llava-med"].items():
            assert value == pytest.approx(100 * exp[metric], rel=1e-12, abs=1e-300), (metric, gold, pred)
    for metric, value in expected["means"].items():
        assert result.summary["llava-med"][metric].value == pytest.approx(100 * value, rel=1e-9)
    # the readable one-metric helpers give the same numbers as the fused scoring path
    for (kind, gold, pred), row in zip(items[:500], result.rows):
        if kind == "OPEN":
            g2 = normalize_llava_med(normalize_llava_med(gold.lower()))
            p2 = normalize_llava_med(normalize_llava_med(pred.lower()))
            f1, precision, recall = llava_med_f1(g2, p2)
            assert (100 * f1, 100 * precision, 100 * recall) == pytest.approx(
                (
                    row["llava-med"]["open_f1"],
                    row["llava-med"]["open_precision"],
                    row["llava-med"]["open_recall"],
                )
            )
            assert 100 * llava_med_exact_match(g2, p2) == pytest.approx(row["llava-med"]["open_exact_match"])


# ------------------------------------------------------------------ score_samples


def _samples(specs):
    return [
        VQASample(
            id=f"q{i}", image=img, question="?", answer=gold, answer_type=kind, benchmark="t", split="test"
        )
        for i, (img, kind, gold) in enumerate(specs)
    ]


def test_score_samples_rows_and_summary_contract():
    samples = _samples(
        [("a", "CLOSED", "yes"), ("a", "OPEN", "left lung"), ("b", "CLOSED", "no"), ("c", "OPEN", 2)]
    )
    preds = ["yes", "left", "normal", "two"]
    result = score_samples(samples, preds, seed=1, n_boot=200)
    assert (result.n, result.n_open, result.n_closed) == (4, 2, 2)
    assert set(result.summary) == {"llava-med", "strict"}
    assert list(result.summary["strict"]) == [
        "closed_accuracy",
        "open_recall",
        "open_precision",
        "open_f1",
        "open_exact_match",
    ]
    assert "open_bleu" in result.summary["llava-med"]
    row = result.rows[3]
    assert {k: row[k] for k in ("id", "image_id", "answer_type", "gold", "prediction")} == {
        "id": "q3",
        "image_id": "c",
        "answer_type": "OPEN",
        "gold": "2",
        "prediction": "two",
    }
    assert set(result.rows[0]["strict"]) == {"closed_accuracy"}
    for scorer, metrics in result.summary.items():
        for metric, mv in metrics.items():
            vals = [r[scorer][metric] for r in result.rows if metric in r[scorer]]
            assert mv.value == pytest.approx(sum(vals) / len(vals))
            assert mv.n == len(vals) == 2
            assert mv.ci_low <= mv.value <= mv.ci_high
    assert result.summary["llava-med"]["closed_accuracy"].value == 100.0
    assert result.summary["strict"]["closed_accuracy"].value == 50.0
    j = result.to_json()
    assert j["scorers"]["strict"]["open_recall"] == result.summary["strict"]["open_recall"].to_json()
    assert set(j["scorers"]["strict"]["open_recall"]) == {"value", "n", "ci_low", "ci_high"}


def test_score_samples_accepts_a_mapping_and_checks_inputs():
    samples = _samples([("a", "CLOSED", "yes"), ("b", "OPEN", "lung")])
    by_id = score_samples(samples, {"q1": "lung", "q0": "yes"}, n_boot=0)
    assert by_id.summary["strict"]["closed_accuracy"].value == 100.0
    with pytest.raises(BadInput, match="1 samples have no prediction"):
        score_samples(samples, {"q0": "yes"})
    with pytest.raises(BadInput, match="1 predictions for 2 samples"):
        score_samples(samples, ["yes"])
    with pytest.raises(BadInput, match=r"record q1.*prediction"):
        score_samples(samples, ["yes", None])
    with pytest.raises(BadInput, match="unknown scorer 'bleu'"):
        score_samples(samples, ["yes", "lung"], scorers="bleu")
    bad = [
        VQASample(id="x", image="i", question="?", answer="a", answer_type="MAYBE", benchmark="t", split="s")
    ]
    with pytest.raises(BadInput, match=r"record x.*answer_type"):
        score_samples(bad, ["a"])


def test_a_set_without_open_items_reports_nan_and_no_ci():
    result = score_samples(_samples([("a", "CLOSED", "yes"), ("b", "CLOSED", "no")]), ["yes", "no"])
    recall = result.summary["llava-med"]["open_recall"]
    assert recall.n == 0 and math.isnan(recall.value) and recall.ci_low is None
    assert result.to_json()["scorers"]["llava-med"]["open_recall"] == {
        "value": None,
        "n": 0,
        "ci_low": None,
        "ci_high": None,
    }
    assert result.summary["llava-med"]["closed_accuracy"].value == 100.0


def test_bootstrap_is_seeded_and_clustered_by_image():
    rng = random.Random(0)
    specs = [(f"img{i // 5}", "CLOSED", "yes") for i in range(200)]
    preds = ["yes" if rng.random() < 0.6 else "no" for _ in specs]
    samples = _samples(specs)
    a = score_samples(samples, preds, seed=3).summary["strict"]["closed_accuracy"]
    b = score_samples(samples, preds, seed=3).summary["strict"]["closed_accuracy"]
    c = score_samples(samples, preds, seed=4).summary["strict"]["closed_accuracy"]
    assert (a.ci_low, a.ci_high) == (b.ci_low, b.ci_high)
    assert (a.ci_low, a.ci_high) != (c.ci_low, c.ci_high)
    assert a.ci_low < a.value < a.ci_high


def test_cluster_bootstrap_resamples_clusters_not_items():
    # 10 images × 10 identical items each = the bootstrap of the 10 image means, draw for draw.
    per_image = np.array([0, 1, 1, 0, 1, 1, 1, 0, 1, 1], dtype=float)
    items = np.repeat(per_image, 10)
    groups = np.repeat(np.arange(10), 10)
    lo_c, hi_c = cluster_bootstrap_ci(items, groups, n_boot=500, rng=np.random.default_rng(5))
    lo_i, hi_i = cluster_bootstrap_ci(per_image, np.arange(10), n_boot=500, rng=np.random.default_rng(5))
    assert (lo_c[0], hi_c[0]) == (lo_i[0], hi_i[0])
    # treating the 100 items as independent gives a (wrongly) narrower interval
    lo_n, hi_n = cluster_bootstrap_ci(items, np.arange(100), n_boot=500, rng=np.random.default_rng(5))
    assert hi_n[0] - lo_n[0] < hi_c[0] - lo_c[0]


def test_cluster_bootstrap_handles_columns_that_skip_items():
    values = np.array([[1.0, np.nan], [0.0, np.nan], [np.nan, 0.5], [np.nan, 1.0]])
    lo, hi = cluster_bootstrap_ci(values, np.array([0, 1, 2, 3]), n_boot=300)
    assert 0.0 <= lo[0] <= hi[0] <= 1.0 and 0.5 <= lo[1] <= hi[1] <= 1.0


def test_an_empty_gold_is_refused_not_counted_correct():
    empty = VQASample("q1", "", "Is it?", " ", "CLOSED", "x", "test", {})
    with pytest.raises(BadInput, match=r"record q1.*'answer'.*empty gold"):
        score_samples([empty], ["yes"])


def test_n_boot_is_capped():
    from medvqa.scoring import MAX_N_BOOT

    s = VQASample("q1", "", "Is it?", "yes", "CLOSED", "x", "test", {})
    with pytest.raises(BadInput, match="n-boot"):
        score_samples([s], ["yes"], n_boot=1_000_000_000)
    with pytest.raises(BadInput, match="n-boot"):
        score_samples([s], ["yes"], n_boot=MAX_N_BOOT + 1)
    assert score_samples([s], ["yes"], n_boot=MAX_N_BOOT).summary["strict"]["closed_accuracy"].ci_low == 100.0
