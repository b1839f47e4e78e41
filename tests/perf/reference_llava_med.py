"""A straightforward per-item port of LLaVA-Med v1.0.0's evaluation loop (`run_eval_batch.py`).

This is the yardstick for `medvqa.scoring`: same inputs, same numbers, and it is the baseline
of the speed benchmark. It follows the reference's control flow on purpose, slow parts included:
the 21 punctuation marks are handled by 21 sequential `str.replace` calls, each re-testing the
digit,digit regex; every string is normalized once in the loop and once more inside each of the
F1 and exact-match helpers (three times per OPEN item); BLEU is nltk `sentence_bleu`, called four
times per OPEN item (BLEU-4 and the 1-, 2-, 3-gram variants), with warnings silenced as the
reference does. Only the tables (punctuation, contractions, number words, articles) are shared
with `medvqa.scoring`; they are pinned by golden tests there.

Unlike the reference, items are joined by index (the caller aligns them) and it returns the
per-item values as well as the means, so that tests can compare item by item.
"""

from __future__ import annotations

import re
import warnings
from collections import defaultdict

from medvqa.scoring import ARTICLES, CONTRACTIONS, MANUAL_MAP, PUNCT
from nltk.translate.bleu_score import sentence_bleu

_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_DIGIT_COMMA = re.compile(r"(\d)(\,)(\d)")


def normalize_word(token: str) -> str:
    out = token
    for p in PUNCT:
        if (p + " " in token or " " + p in token) or (re.search(_DIGIT_COMMA, token) is not None):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The reference passes re.UNICODE (== 32) positionally, i.e. as `count`.
    token = _PERIOD.sub("", out, count=re.UNICODE)
    words = []
    for word in token.lower().split():
        word = MANUAL_MAP.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    for i, word in enumerate(words):
        if word in CONTRACTIONS:
            words[i] = CONTRACTIONS[word]
    return " ".join(words).replace(",", "")


def _word_counts(sentence: str) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for word in sentence.lower().strip().split():
        counts[word] += 1
    return counts


def calculate_exactmatch(candidate: str, reference: str) -> float:
    candidate_words = _word_counts(normalize_word(candidate))
    reference_words = _word_counts(normalize_word(reference))
    count = sum(1 for word in reference_words if word in candidate_words)
    total = sum(candidate_words.values())
    return 0 if total == 0 else count / total


def calculate_f1score(candidate: str, reference: str) -> tuple[float, float, float]:
    candidate_words = _word_counts(normalize_word(candidate))
    reference_words = _word_counts(normalize_word(reference))
    tp = fp = fn = 0
    for word in set(candidate_words) | set(reference_words):
        if word in candidate_words and word in reference_words:
            tp += candidate_words[word]
        elif word in candidate_words:
            fp += candidate_words[word]
        else:
            fn += reference_words[word]
    if len(candidate_words) == 0 or len(reference_words) == 0:
        return 0, 0, 0
    precision = tp / (tp + fp)
    recall = tp / (tp + fn)
    if tp == 0:
        return 0, 0, 0
    return 2 * precision * recall / (precision + recall), precision, recall


def evaluate(items: list[tuple[str, str, str]]) -> dict:
    """`items` = (answer_type, gold, prediction) triples; returns means (fractions) and per-item values."""
    per_item: list[dict[str, float]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for answer_type, gold, pred in items:
            gold_value = normalize_word(str(gold).lower())
            pred_value = normalize_word(str(pred).lower())
            if answer_type == "OPEN":
                f1, precision, recall = calculate_f1score(pred_value, gold_value)
                ref, hyp = [str(gold_value).lower().split()], str(pred_value).lower().split()
                per_item.append(
                    {
                        "open_hit": 1.0 if gold_value in pred_value else 0.0,
                        "open_exact_match": calculate_exactmatch(pred_value, gold_value),
                        "open_f1": f1,
                        "open_precision": precision,
                        "open_recall": recall,
                        "open_bleu": sentence_bleu(references=ref, hypothesis=hyp),
                        "open_bleu_1": sentence_bleu(references=ref, hypothesis=hyp, weights=(1, 0, 0, 0)),
                        "open_bleu_2": sentence_bleu(references=ref, hypothesis=hyp, weights=(0, 1, 0, 0)),
                        "open_bleu_3": sentence_bleu(references=ref, hypothesis=hyp, weights=(0, 0, 1, 0)),
                    }
                )
            elif answer_type == "CLOSED":
                f1, precision, recall = calculate_f1score(pred_value, gold_value)
                per_item.append(
                    {"closed_accuracy": 1.0 if gold_value in pred_value else 0.0, "closed_recall": recall}
                )
            else:
                per_item.append({})
    means: dict[str, float] = {}
    for metric in (
        "closed_accuracy",
        "open_recall",
        "open_precision",
        "open_f1",
        "open_exact_match",
        "open_bleu",
    ):
        vals = [row[metric] for row in per_item if metric in row]
        means[metric] = sum(vals) / len(vals) if vals else 0.0
    return {"means": means, "items": per_item}
