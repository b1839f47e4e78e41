"""The medical-VQA scorers: `llava-med` (the published convention) and `strict` (what it should mean).

`llava-med` reproduces LLaVA-Med v1.0.0 `llava/eval/run_eval_batch.py` bit for bit, quirks included:

- `normalize_llava_med` is the reference `normalize_word`: each of 21 punctuation marks is deleted
  when the text has it followed or preceded by a space (or the text contains digit,digit anywhere),
  else replaced by a space; periods not followed by a digit are deleted, but only the first 32 of
  them (the reference passes `re.UNICODE`, which is 32, as `re.sub`'s *count*); lowercase; number
  words none/zero..ten → digits; articles a/an/the dropped; the VQA contractions map; commas removed.
- The reference normalizes each string once for closed accuracy and BLEU and then *again* inside
  its recall/precision/F1 and exact-match helpers: those see `normalize(normalize(text))`, which
  differs from one pass only for texts with more than 32 periods. We do the same.
- closed accuracy: `normalized_gold in normalized_prediction`, a plain substring test ("no" is
  found in "normal", and an empty gold is found everywhere).
- open recall/precision/F1: token counts where a word present on both sides counts with its
  *prediction* count (gold `right upper lobe` vs `upper upper upper`: tp=3, fn=2, recall=0.6);
  0 when either side has no token or tp is 0. Exact match: distinct gold words present in the
  prediction / number of prediction tokens. BLEU: nltk `sentence_bleu` (BLEU-4, no smoothing).

`strict` keeps the normalization minus its quirks (every punctuation mark becomes a space, all
periods but decimal points, no 32-period cap, digit-group commas joined) and scores: closed
yes/no gold by a whole-word yes/no decision (both or neither present = wrong), other closed gold
by normalized exact match; open by set-based token recall/precision/F1 and normalized exact match.

All metrics are in percent. Every summary value is the mean of the per-item row values, with a
95% bootstrap confidence interval clustered by image (images resampled with replacement, seeded).
The scoring path is fast: each distinct string is normalized once and each distinct
(type, gold, prediction) triple is scored once (see `tests/perf`).
"""

from __future__ import annotations

import math
import re
import sys
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from medvqa.errors import BadInput
from medvqa.types import MetricValue, VQASample

SCORERS: tuple[str, ...] = ("llava-med", "strict")
# Bumped whenever a scorer gives other numbers for the same predictions (a fix): a finished eval
# scored by another version is rescored from its predictions.jsonl, without generating again.
SCORER_VERSION = "1"
# Bootstrap replicates: beyond ~10^4 the CI's percentiles no longer move; the cap keeps the replicate
# table (n_boot × metrics × 8 bytes) at a few MB, so `--n-boot 1000000000` is refused, not an 82 GiB alloc.
MAX_N_BOOT = 100_000
CLOSED_METRICS: tuple[str, ...] = ("closed_accuracy",)
OPEN_METRICS: dict[str, tuple[str, ...]] = {
    "llava-med": ("open_recall", "open_precision", "open_f1", "open_exact_match", "open_bleu"),
    "strict": ("open_recall", "open_precision", "open_f1", "open_exact_match"),
}
# The one number per answer type that a table, an export or the viewer shows for an item.
HEADLINE: dict[str, str] = {"CLOSED": "closed_accuracy", "OPEN": "open_recall"}
METRIC_HELP: dict[str, str] = {
    "closed_accuracy": "CLOSED items answered right (llava-med: gold is a substring of the prediction)",
    "open_recall": "OPEN items: share of gold words found in the prediction",
    "open_precision": "OPEN items: share of prediction words found in the gold answer",
    "open_f1": "OPEN items: harmonic mean of recall and precision",
    "open_exact_match": "OPEN items: llava-med: distinct gold words found / prediction words; strict: same text",
    "open_bleu": "OPEN items: sentence BLEU-4 (nltk, no smoothing)",
}


def metric_names(scorer: str) -> tuple[str, ...]:
    """The metrics one scorer reports, in display order."""
    return CLOSED_METRICS + OPEN_METRICS[scorer]


# --------------------------------------------------------------------------------------------
# The normalization tables of the VQA evaluation code, as used by LLaVA-Med.
# --------------------------------------------------------------------------------------------

CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
MANUAL_MAP: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES: tuple[str, ...] = ("a", "an", "the")
PUNCT: tuple[str, ...] = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")  # fmt: skip
# The reference's pattern, verbatim: `(?!<=\d)` is a lookahead (a typo for a lookbehind) that
# never fails before a ".", so the rule is "a period not followed by a digit".
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
# `re.sub(PERIOD_STRIP, "", text, re.UNICODE)` in the reference: re.UNICODE lands in `count`.
PERIOD_STRIP_COUNT = int(re.UNICODE)  # == 32

_PUNCT_SET = frozenset(PUNCT)
_ARTICLE_SET = frozenset(ARTICLES)


def _word_rule(word: str) -> str | None:
    """The reference's word step: number word → digit, then drop articles, then contractions."""
    word = MANUAL_MAP.get(word, word)
    return None if word in _ARTICLE_SET else CONTRACTIONS.get(word, word)


# The word step as one lookup (None = dropped), for every word it changes.
_WORD_MAP: dict[str, str | None] = {
    w: _word_rule(w) for w in (*MANUAL_MAP, *ARTICLES, *CONTRACTIONS) if _word_rule(w) != w
}
_WORD_KEYS = frozenset(_WORD_MAP)


def _map_words(words: list[str]) -> str:
    if _WORD_KEYS.isdisjoint(words):
        return " ".join(words)
    mapped = [_WORD_MAP.get(w, w) for w in words]
    return " ".join([w for w in mapped if w is not None])


def normalize_llava_med(text: str) -> str:
    """LLaVA-Med's `normalize_word`, exactly (one pass). See the module docstring for the rules.

    >>> normalize_llava_med("The X-ray shows two nodules.")
    'x ray shows 2 nodules'
    """
    token = text
    present = _PUNCT_SET.intersection(token)
    if present:
        # The reference loops over the marks; each decision looks at the *original* text, so one
        # translation table gives the same result as the 21 sequential replacements.
        digit_comma = COMMA_STRIP.search(token) is not None
        table = {}
        for p in present:
            delete = digit_comma or (p + " ") in token or (" " + p) in token
            table[ord(p)] = None if delete else " "
        token = token.translate(table)
    if "." in token:
        token = PERIOD_STRIP.sub("", token, count=PERIOD_STRIP_COUNT)
    return _map_words(token.lower().split()).replace(",", "")


def _check_second_pass_is_identity() -> None:
    # One pass leaves no punctuation mark, no article, no number word and no contraction key that
    # maps to something else, so a second pass can change only texts with periods left over (more
    # than 32 of them) or non-ASCII text (lowercasing is re-applied). `_normalize_twice` relies on it.
    # (keys with capitals, e.g. "Im", never match lowercased text, so their values never appear)
    reachable = [v for k, v in CONTRACTIONS.items() if k == k.lower()]
    for value in [*reachable, *MANUAL_MAP.values()]:
        if normalize_llava_med(value) != value:
            raise AssertionError(f"second normalization pass changes {value!r}")


_check_second_pass_is_identity()


def _normalize_twice(once: str) -> str:
    """`normalize_llava_med(once)` for a text that is already the output of one pass."""
    if "." in once or not once.isascii():
        return normalize_llava_med(once)
    return once


# strict: every mark is a separator, periods too unless a decimal point; 1,000 → 1000.
_STRICT_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")
_STRICT_PERIOD = re.compile(r"\.(?!\d)")
_STRICT_TABLE = {ord(p): " " for p in (*PUNCT, ":")}


def normalize_strict(text: str) -> str:
    """The same normalization without the quirks: no context-dependent deletion, no 32-period cap.

    Unicode NFKC and lowercase; commas inside digit groups dropped (1,000 → 1000); periods turned
    into spaces unless followed by a digit (3.5 and .5 stay); the 21 marks and ":" become spaces;
    number words → digits; articles dropped; the VQA contractions map.

    >>> normalize_strict("Yes, the left lung.")
    'yes left lung'
    """
    token = (text if text.isascii() else unicodedata.normalize("NFKC", text)).lower()
    if "," in token:
        token = _STRICT_DIGIT_COMMA.sub("", token)
    if "." in token:
        token = _STRICT_PERIOD.sub(" ", token)
    token = token.translate(_STRICT_TABLE)
    return _map_words(token.split())


# --------------------------------------------------------------------------------------------
# Per-item scores (fractions in [0, 1]; the summary turns them into percent).
# --------------------------------------------------------------------------------------------


def llava_med_closed_hit(gold_norm: str, pred_norm: str) -> float:
    """The reference's closed rule: the normalized gold is a substring of the normalized prediction."""
    return 1.0 if gold_norm in pred_norm else 0.0


def llava_med_f1(gold_norm2: str, pred_norm2: str) -> tuple[float, float, float]:
    """(f1, precision, recall) as the reference computes them: tp counted with prediction counts."""
    pred_counts = Counter(pred_norm2.split())
    gold_counts = Counter(gold_norm2.split())
    if not pred_counts or not gold_counts:
        return 0.0, 0.0, 0.0
    tp = fp = fn = 0
    for word, count in pred_counts.items():
        if word in gold_counts:
            tp += count
        else:
            fp += count
    for word, count in gold_counts.items():
        if word not in pred_counts:
            fn += count
    if tp == 0:
        return 0.0, 0.0, 0.0
    precision = tp / (tp + fp)
    recall = tp / (tp + fn)
    return 2 * precision * recall / (precision + recall), precision, recall


def llava_med_exact_match(gold_norm2: str, pred_norm2: str) -> float:
    """The reference's "exact match": distinct gold words present in the prediction / prediction tokens."""
    pred_tokens = pred_norm2.split()
    if not pred_tokens:
        return 0.0
    present = set(pred_tokens)
    return sum(1 for word in set(gold_norm2.split()) if word in present) / len(pred_tokens)


_FLOAT_MIN = sys.float_info.min


def sentence_bleu4(reference: Sequence[str], hypothesis: Sequence[str]) -> float:
    """nltk's `sentence_bleu([reference], hypothesis)` (BLEU-4, uniform weights, no smoothing), same float.

    Mirrors nltk 3.9/3.10 step by step: clipped n-gram precisions with denominator max(1, count);
    0 when no unigram matches; a zero higher-order precision becomes `sys.float_info.min` (nltk's
    `method0`); brevity penalty against the single reference; `bp * exp(fsum(w * log p))`.
    """
    return _bleu4(reference, hypothesis, Counter(reference), Counter(hypothesis))


_LOG_MIN_TERM = 0.25 * math.log(_FLOAT_MIN)


def _bleu4(
    reference: Sequence[str], hypothesis: Sequence[str], ref_counts: Counter, hyp_counts: Counter
) -> float:
    hyp_len, ref_len = len(hypothesis), len(reference)
    if hyp_len == 0 or ref_len == 0:
        return 0.0
    matches = sum(min(c, ref_counts[w]) for w, c in hyp_counts.items() if w in ref_counts)
    if matches == 0:
        return 0.0
    log_terms = [0.25 * math.log(matches / hyp_len)]
    for n in (2, 3, 4):
        num = 0
        if hyp_len >= n and ref_len >= n:
            hyp_grams = Counter(zip(*(hypothesis[i:] for i in range(n))))
            ref_grams = Counter(zip(*(reference[i:] for i in range(n))))
            num = sum(min(c, ref_grams[g]) for g, c in hyp_grams.items() if g in ref_grams)
        if num == 0:
            # no n-gram match means no longer match either: the rest are all nltk's "0 → float min"
            log_terms += [_LOG_MIN_TERM] * (5 - n)
            break
        log_terms.append(0.25 * math.log(num / (hyp_len - n + 1)))
    bp = 1 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return bp * math.exp(math.fsum(log_terms))


def strict_closed_hit(gold_norm: str, pred_norm: str) -> float:
    """Yes/no gold: the prediction says exactly one of yes/no, and it is the gold. Else: same text."""
    if gold_norm in ("yes", "no"):
        words = set(pred_norm.split())
        says_yes, says_no = "yes" in words, "no" in words
        if says_yes == says_no:  # both or neither: no decision
            return 0.0
        return 1.0 if (says_yes if gold_norm == "yes" else says_no) else 0.0
    return 1.0 if pred_norm == gold_norm else 0.0


def strict_open(gold_norm: str, pred_norm: str) -> tuple[float, float, float, float]:
    """(recall, precision, f1, exact) with word *sets*; 0 when either side is empty."""
    gold, pred = set(gold_norm.split()), set(pred_norm.split())
    exact = 1.0 if gold_norm == pred_norm else 0.0
    if not gold or not pred:
        return 0.0, 0.0, 0.0, exact
    common = len(gold & pred)
    if common == 0:
        return 0.0, 0.0, 0.0, exact
    recall, precision = common / len(gold), common / len(pred)
    return recall, precision, 2 * precision * recall / (precision + recall), exact


def score_item(scorer: str, answer_type: str, gold: str, prediction: str) -> dict[str, float]:
    """One item's metric values in percent (CLOSED → closed_accuracy; OPEN → the open_* metrics)."""
    if scorer == "llava-med":
        return _llava_med_item(
            answer_type, normalize_llava_med(gold.lower()), normalize_llava_med(prediction.lower())
        )
    if scorer == "strict":
        return _strict_item(answer_type, normalize_strict(gold), normalize_strict(prediction))
    raise BadInput(f"unknown scorer {scorer!r}; known: {', '.join(SCORERS)}")


def _llava_med_item(answer_type: str, gold1: str, pred1: str) -> dict[str, float]:
    """One item from once-normalized texts; the same numbers as the public functions above, fused."""
    if answer_type == "CLOSED":
        return {"closed_accuracy": 100.0 * llava_med_closed_hit(gold1, pred1)}
    gold_tokens, pred_tokens = gold1.split(), pred1.split()
    gold_counts, pred_counts = Counter(gold_tokens), Counter(pred_tokens)
    bleu = _bleu4(gold_tokens, pred_tokens, gold_counts, pred_counts)
    gold2, pred2 = _normalize_twice(gold1), _normalize_twice(pred1)
    if gold2 != gold1:
        gold_counts = Counter(gold2.split())
    if pred2 != pred1:
        pred_tokens = pred2.split()
        pred_counts = Counter(pred_tokens)
    recall = precision = f1 = exact = 0.0
    if pred_counts and gold_counts:
        tp = fp = 0
        for word, count in pred_counts.items():
            if word in gold_counts:
                tp += count
            else:
                fp += count
        if tp:
            fn = sum(count for word, count in gold_counts.items() if word not in pred_counts)
            precision, recall = tp / (tp + fp), tp / (tp + fn)
            f1 = 2 * precision * recall / (precision + recall)
            exact = sum(1 for word in gold_counts if word in pred_counts) / len(pred_tokens)
    return {
        "open_recall": 100.0 * recall,
        "open_precision": 100.0 * precision,
        "open_f1": 100.0 * f1,
        "open_exact_match": 100.0 * exact,
        "open_bleu": 100.0 * bleu,
    }


def _strict_item(answer_type: str, gold: str, pred: str) -> dict[str, float]:
    if answer_type == "CLOSED":
        return {"closed_accuracy": 100.0 * strict_closed_hit(gold, pred)}
    recall, precision, f1, exact = strict_open(gold, pred)
    return {
        "open_recall": 100.0 * recall,
        "open_precision": 100.0 * precision,
        "open_f1": 100.0 * f1,
        "open_exact_match": 100.0 * exact,
    }


# --------------------------------------------------------------------------------------------
# Whole-set scoring with clustered bootstrap CIs.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreResult:
    """Scores of one prediction set: `summary[scorer][metric]` and one row per sample.

    `rows[i]` = `{"id", "image_id", "answer_type", "question", "gold", "prediction", "image", "meta",
    scorer: {metric: value}}` (`image` is the sample's path, "" for image bytes; `meta` the sample's
    metadata, so that reports break scores down by category and `medvqa show` shows the sample);
    each summary value is the mean of the rows' values for that metric (so paired tests can be run
    from the rows). `to_json()` is what `scores.json` and `medvqa score --json` carry.
    """

    summary: dict[str, dict[str, MetricValue]]
    rows: list[dict[str, Any]] = field(repr=False)
    n: int = 0
    n_open: int = 0
    n_closed: int = 0
    seed: int = 0
    n_boot: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "n_open": self.n_open,
            "n_closed": self.n_closed,
            "ci": {
                "level": 0.95,
                "method": "bootstrap clustered by image",
                "n_boot": self.n_boot,
                "seed": self.seed,
            },
            "scorers": {
                scorer: {metric: _json_metric(value) for metric, value in metrics.items()}
                for scorer, metrics in self.summary.items()
            },
        }


def _json_metric(value: MetricValue) -> dict[str, Any]:
    """`MetricValue.to_json()`, with NaN (a metric without items) as null: files stay strict JSON."""
    out = value.to_json()
    if isinstance(out["value"], float) and math.isnan(out["value"]):
        out["value"] = None
    return out


def _as_text(value: Any, what: str, sample_id: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # VQA-RAD has numeric answers: scored as text
    raise BadInput(f"{what} is {type(value).__name__}, expected text", record=sample_id, field=what)


def check_n_boot(n_boot: Any, *, flag: str = "--n-boot") -> int:
    """0 (no CI) to MAX_N_BOOT bootstrap replicates; anything else is a BadInput."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or not 0 <= n_boot <= MAX_N_BOOT:
        raise BadInput(f"{flag} must be an integer from 0 to {MAX_N_BOOT:,}, got {n_boot!r}")
    return n_boot


def resolve_scorers(scorers: str | Iterable[str]) -> tuple[str, ...]:
    """`"all"`, one name, or several names → a tuple of known scorer names (BadInput otherwise)."""
    names = [scorers] if isinstance(scorers, str) else list(scorers)
    if "all" in names:
        return SCORERS
    for name in names:
        if name not in SCORERS:
            raise BadInput(f"unknown scorer {name!r}; known: {', '.join(SCORERS)}, all")
    if not names:
        raise BadInput(f"no scorer given; known: {', '.join(SCORERS)}, all")
    return tuple(dict.fromkeys(names))


def score_samples(
    samples: Sequence[VQASample],
    predictions: Sequence[str] | Mapping[str, str],
    scorers: str | Iterable[str] = SCORERS,
    seed: int = 0,
    n_boot: int = 1000,
) -> ScoreResult:
    """Score predictions against samples with each scorer; percent values with clustered 95% CIs.

    `predictions` is a list aligned with `samples`, or a mapping sample id → prediction text.
    Numbers (gold or predicted) are scored as their text. `n_boot=0` skips the CIs.
    """
    names = resolve_scorers(scorers)
    check_n_boot(n_boot)
    if isinstance(predictions, Mapping):
        missing = [s.id for s in samples if s.id not in predictions]
        if missing:
            raise BadInput(
                f"{len(missing)} samples have no prediction (e.g. {', '.join(map(repr, missing[:5]))})"
            )
        preds = [predictions[s.id] for s in samples]
    else:
        preds = list(predictions)
        if len(preds) != len(samples):
            raise BadInput(f"{len(preds)} predictions for {len(samples)} samples")

    types, golds, texts = [], [], []
    for sample, pred in zip(samples, preds):
        kind = sample.answer_type
        if kind != "OPEN" and kind != "CLOSED":
            kind = str(kind).strip().upper()
            if kind not in ("OPEN", "CLOSED"):
                raise BadInput(
                    f"unknown answer_type {sample.answer_type!r}", record=sample.id, field="answer_type"
                )
        types.append(kind)
        gold = sample.answer if type(sample.answer) is str else _as_text(sample.answer, "answer", sample.id)
        if not gold.strip():  # llava-med's substring rule finds an empty gold in every prediction
            raise BadInput("empty gold answer (it would count as correct)", record=sample.id, field="answer")
        golds.append(gold)
        texts.append(pred if type(pred) is str else _as_text(pred, "prediction", sample.id))

    scored = {name: _score_all(name, types, golds, texts) for name in names}

    image_ids = [s.image_id for s in samples]
    rows: list[dict[str, Any]] = [
        {
            "id": s.id,
            "image_id": image,
            "answer_type": kind,
            "question": s.question,
            "gold": gold,
            "prediction": pred,
            "image": s.image if isinstance(s.image, str) else "",
            "meta": _plain_meta(s.meta),
        }
        for s, image, kind, gold, pred in zip(samples, image_ids, types, golds, texts)
    ]
    for name in names:
        unique, inverse = scored[name]
        for row, j in zip(rows, inverse):
            row[name] = unique[j].copy()

    summary = _summarize(names, types, image_ids, scored, seed=seed, n_boot=n_boot)
    n_open = sum(1 for t in types if t == "OPEN")
    return ScoreResult(
        summary=summary,
        rows=rows,
        n=len(samples),
        n_open=n_open,
        n_closed=len(samples) - n_open,
        seed=seed,
        n_boot=n_boot,
    )


def _plain_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The sample's scalar metadata (category fields: modality, organ, slot, ...), JSON-safe."""
    return {
        str(k): v
        for k, v in meta.items()
        if k != "image_id"
        and (v is None or isinstance(v, str | bool | int) or (isinstance(v, float) and math.isfinite(v)))
    }


def _score_all(
    scorer: str, types: list[str], golds: list[str], preds: list[str]
) -> tuple[list[dict[str, float]], list[int]]:
    """Score each distinct (type, gold, prediction) once, normalizing each distinct string once.

    Returns the distinct items' values and, per item, the index of its distinct item.
    """
    if scorer == "llava-med":
        normalize, item = (lambda s: normalize_llava_med(s.lower())), _llava_med_item
    else:
        normalize, item = normalize_strict, _strict_item
    norm_cache: dict[str, str] = {}
    index: dict[tuple[str, str, str], int] = {}
    unique: list[dict[str, float]] = []
    inverse = []
    for key in zip(types, golds, preds):
        j = index.get(key)
        if j is None:
            kind, gold, pred = key
            g = norm_cache.get(gold)
            if g is None:
                g = norm_cache[gold] = normalize(gold)
            p = norm_cache.get(pred)
            if p is None:
                p = norm_cache[pred] = normalize(pred)
            j = index[key] = len(unique)
            unique.append(item(kind, g, p))
        inverse.append(j)
    return unique, inverse


def _summarize(
    names: Sequence[str],
    types: Sequence[str],
    image_ids: Sequence[str],
    scored: Mapping[str, tuple[list[dict[str, float]], list[int]]],
    *,
    seed: int,
    n_boot: int,
) -> dict[str, dict[str, MetricValue]]:
    import numpy as np

    columns = [(name, metric) for name in names for metric in metric_names(name)]
    # items × metrics, NaN where the metric does not apply (closed metric on an OPEN item, ...)
    values = np.empty((len(types), len(columns)))
    for j, (name, metric) in enumerate(columns):
        unique, inverse = scored[name]
        per_unique = np.array([u.get(metric, np.nan) for u in unique], dtype=np.float64)
        values[:, j] = per_unique[np.asarray(inverse, dtype=np.int64)]
    present = ~np.isnan(values)
    n_per_metric = present.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(present, values, 0.0).sum(axis=0) / n_per_metric
    if n_boot > 0 and len(types):
        codes: dict[str, int] = {}
        groups = np.fromiter((codes.setdefault(i, len(codes)) for i in image_ids), np.int64, len(image_ids))
        lows, highs = cluster_bootstrap_ci(values, groups, n_boot=n_boot, rng=np.random.default_rng(seed))
    else:
        lows = highs = np.full(len(columns), np.nan)
    summary: dict[str, dict[str, MetricValue]] = {name: {} for name in names}
    for j, (name, metric) in enumerate(columns):
        n = int(n_per_metric[j])
        low, high = float(lows[j]), float(highs[j])
        summary[name][metric] = MetricValue(
            value=float(means[j]) if n else float("nan"),
            n=n,
            ci_low=None if math.isnan(low) else low,
            ci_high=None if math.isnan(high) else high,
        )
    return summary


def cluster_bootstrap_ci(
    values: Any, groups: Any, *, n_boot: int = 1000, rng: Any = None, level: float = 0.95
):
    """Percentile CI of the mean of each column of `values` (items × metrics), resampling clusters.

    The replicates are `cluster_bootstrap_means`'. Returns (low, high) arrays, NaN for a column
    without items.
    """
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    present = ~np.isnan(values)
    stats = cluster_bootstrap_means(values, groups, n_boot=n_boot, rng=rng)
    tail = (1 - level) / 2 * 100
    low, high = np.full(values.shape[1], np.nan), np.full(values.shape[1], np.nan)
    for j in range(values.shape[1]):
        col = stats[:, j]
        col = col[~np.isnan(col)]
        if col.size and present[:, j].any():
            low[j], high[j] = np.percentile(col, [tail, 100 - tail])
    return low, high


def cluster_bootstrap_means(values: Any, groups: Any, *, n_boot: int = 1000, rng: Any = None) -> Any:
    """The bootstrap replicates (n_boot × metrics) of each column's mean, resampling clusters:
    the one cluster bootstrap of the tree (score CIs here, the report's paired test of differences).

    `groups[i]` is item i's cluster code (0..G-1: its image). NaN marks an item a column does not
    apply to (an OPEN item for closed accuracy). Each replicate draws G clusters with replacement
    and takes, per column, the mean over the drawn clusters' items (a ratio estimator, so clusters
    of any size are handled, and all metrics share the same draws). Vectorised: per chunk of
    replicates, the draw counts come from one `bincount` and the means from one matrix product.
    A replicate that drew no item of a column is NaN there.
    """
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    groups = np.asarray(groups, dtype=np.int64)
    rng = rng if rng is not None else np.random.default_rng(0)
    n_groups = int(groups.max()) + 1
    present = ~np.isnan(values)
    filled = np.where(present, values, 0.0)
    sums = np.stack([np.bincount(groups, weights=col, minlength=n_groups) for col in filled.T], axis=1)
    # columns share few distinct "which items apply" patterns: count each pattern once
    pattern_index: dict[bytes, int] = {}
    pattern_of_column = np.array(
        [pattern_index.setdefault(p.tobytes(), len(pattern_index)) for p in present.T]
    )
    patterns = [present[:, list(pattern_of_column).index(k)] for k in range(len(pattern_index))]
    counts = np.stack([np.bincount(groups, weights=p, minlength=n_groups) for p in patterns], axis=1)
    chunk = max(1, min(n_boot, 250_000 // n_groups))  # cache-sized blocks
    offsets = (np.arange(chunk) * n_groups)[:, None]
    stats = np.empty((n_boot, values.shape[1]))
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        draws = rng.integers(0, n_groups, size=(b, n_groups))
        draws += offsets[:b]
        weights = np.bincount(draws.ravel(), minlength=b * n_groups).reshape(b, n_groups).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            stats[start : start + b] = (weights @ sums) / (weights @ counts)[:, pattern_of_column]
    return stats
