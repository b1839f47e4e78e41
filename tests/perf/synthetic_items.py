"""Random but realistic (answer_type, gold, prediction) triples for scorer equivalence and speed tests.

Golds look like VQA-RAD/SLAKE/PathVQA answers (yes/no, organs, sides, counts, short phrases,
numbers); predictions mix short answers, verbose sentences, hedges ("yes and no"), punctuation
in every position the reference treats specially (digit,digit; marks next to spaces; periods
before digits; runs of more than 32 periods), number words, articles, contractions, case and
non-ASCII text, and empty answers.
"""

from __future__ import annotations

import random

_WORD_TEXT = (
    "left right upper lower lobe lung liver kidney spleen brain heart chest abdomen pelvis mass nodule "
    "effusion pneumothorax fracture edema hemorrhage infarct lesion cyst tumor opacity consolidation "
    "ct mri x-ray t1 t2 flair axial coronal sagittal contrast enhancement normal abnormal small large "
    "bilateral midline shift ventricle cortex bone rib vertebra aorta colon bowel bladder prostate "
    "none one two three four five six seven ten a an the is are there of in with without dont isnt "
    "cant thats whats it's"
)
WORDS = _WORD_TEXT.split()
MARKS = [*';/[]"{}()=+\\_-><@`,?!.:', "...", ", ", " - ", "'"]
YES_NO = ("yes", "no", "Yes", "No", "YES", "yes.", "No.")


def _phrase(rng: random.Random, k_min: int = 1, k_max: int = 4) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(k_min, k_max)))


def _noisy(rng: random.Random, text: str) -> str:
    """Sprinkle punctuation, numbers and case changes into a text."""
    out = []
    for word in text.split(" "):
        r = rng.random()
        if r < 0.15:
            word = word + rng.choice(MARKS)
        elif r < 0.22:
            word = rng.choice(MARKS) + word
        elif r < 0.27:
            word = f"{rng.randint(1, 9)},{rng.randint(100, 999)}"
        elif r < 0.31:
            word = f"{rng.randint(0, 9)}.{rng.randint(0, 9)}"
        elif r < 0.35:
            word = word.upper()
        elif r < 0.37:
            word = word + "é"
        out.append(word)
    return " ".join(out)


def make_gold(rng: random.Random) -> tuple[str, str]:
    r = rng.random()
    if r < 0.45:
        return "CLOSED", rng.choice(("yes", "no", "Yes", "No"))
    if r < 0.55:
        return "CLOSED", _phrase(rng, 1, 2)  # e.g. "left" / "ct"
    if r < 0.65:
        return "OPEN", str(rng.randint(0, 12))
    if r < 0.9:
        return "OPEN", _phrase(rng, 1, 3)
    return "OPEN", _noisy(rng, _phrase(rng, 1, 4))


def make_prediction(rng: random.Random, gold: str) -> str:
    r = rng.random()
    if r < 0.25:
        return gold
    if r < 0.4:
        return rng.choice(YES_NO)
    if r < 0.5:
        return f"{rng.choice(YES_NO)}, {_phrase(rng, 3, 10)}."
    if r < 0.6:
        return f"The answer is {gold}. {_phrase(rng, 2, 8)}"
    if r < 0.63:
        return "yes and no"
    if r < 0.65:
        return ""
    if r < 0.67:
        return ". " * rng.randint(20, 60) + _phrase(rng)  # the 32-period cap matters here
    if r < 0.8:
        return _noisy(rng, _phrase(rng, 1, 12))
    return _phrase(rng, 1, 6)


def make_items(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """n (answer_type, gold, prediction) triples, deterministic for a seed."""
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        kind, gold = make_gold(rng)
        items.append((kind, gold, make_prediction(rng, gold)))
    return items
