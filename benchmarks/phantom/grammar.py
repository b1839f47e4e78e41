"""Phantom's question grammar: render, parse back, answer from a scene; captions; question sampling.

The grammar parses back (`parse_question`) and answers itself from any scene (`answer_for`), so a
judge can decide any question of the grammar about any image, and refuses (None) what it cannot
decide. This is all the Phantom expert needs (stdlib only; the regexes compile on first use).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from medvqa.benchmarks.phantom.scenes import Lesion, Scene
from medvqa.benchmarks.phantom.taxonomy import (
    COUNT_WORDS,
    MODALITIES,
    ORGANS,
    PLANES,
    QUADRANT_ORGAN,
    QUADRANTS,
    REGIONS,
    SIDES,
    SIZES,
)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" or word in ("mri", "x-ray") else "a"


@dataclass(frozen=True)
class Slot:
    name: str
    answer_type: str  # OPEN | CLOSED
    templates: tuple[str, ...]  # "{x}" = the argument, "{a_x}" = the argument with its article
    args: tuple[str, ...] = ()  # the argument's vocabulary (empty: no argument)
    answers: tuple[str, ...] = ()  # the possible answers (documentation and vocabulary)
    description: str = ""

    @property
    def about_lesions(self) -> bool:
        return self.name not in _GLOBAL_SLOTS


_GLOBAL_SLOTS = frozenset({"modality", "region", "plane", "is_modality", "is_region", "is_plane"})


SLOTS: tuple[Slot, ...] = (
    Slot("modality", "OPEN", ("what modality is this?", "what imaging modality was used?",
         "which modality is shown in this image?"), answers=MODALITIES,
         description="imaging modality"),
    Slot("region", "OPEN", ("what body region is shown?", "which part of the body is this?",
         "what region is imaged?"), answers=REGIONS, description="body region"),
    Slot("plane", "OPEN", ("what plane is this image in?", "in which plane was this image taken?",
         "what is the imaging plane?"), answers=PLANES, description="image plane"),
    Slot("count", "OPEN", ("how many lesions are there?", "how many lesions are seen?",
         "what is the number of lesions?"), answers=COUNT_WORDS,
         description="number of lesions, as a word"),
    Slot("location", "OPEN", ("where is the lesion?", "where is the lesion located?",
         "in which quadrant is the lesion?"),
         answers=tuple(f"{lv} {sd}" for lv, sd in QUADRANTS),
         description="quadrant of the lesion; defined only with exactly one lesion"),
    Slot("organ", "OPEN", ("which organ is abnormal?", "which organ has a lesion?", "what organ is affected?"),
         answers=ORGANS, description="organ holding the lesion(s); defined only when all lesions lie in one organ"),
    Slot("is_modality", "CLOSED", ("is this {a_x}?", "was this image taken with {x}?", "is the modality {x}?"),
         args=MODALITIES, answers=("yes", "no"), description="is the modality X"),
    Slot("is_region", "CLOSED", ("does this image show the {x}?", "is this an image of the {x}?",
         "is the {x} imaged here?"), args=REGIONS, answers=("yes", "no"), description="is the region X"),
    Slot("is_plane", "CLOSED", ("is this {a_x} image?", "was this image taken in the {x} plane?",
         "is the plane {x}?"), args=PLANES, answers=("yes", "no"), description="is the plane X"),
    Slot("lesion_side", "CLOSED", ("is there a lesion on the {x}?", "is there a lesion on the {x} side?",
         "does the {x} side show a lesion?"), args=SIDES, answers=("yes", "no"),
         description="is there a lesion on side X (as seen in the image)"),
    Slot("normal", "CLOSED", ("is the image normal?", "is this a normal image?", "is the image free of lesions?"),
         answers=("yes", "no"), description="no lesion at all"),
    Slot("multiple", "CLOSED", ("are there multiple lesions?", "is there more than one lesion?",
         "are several lesions present?"), answers=("yes", "no"), description="two lesions or more"),
    Slot("organ_abnormal", "CLOSED", ("is the {x} abnormal?", "does the {x} have a lesion?",
         "is there a lesion in the {x}?"), args=ORGANS, answers=("yes", "no"),
         description="does organ X hold a lesion; defined only when the region shows X"),
)  # fmt: skip
SLOTS_BY_NAME: dict[str, Slot] = {s.name: s for s in SLOTS}


@dataclass(frozen=True)
class ParsedQuestion:
    slot: str
    arg: str | None = None
    paraphrase: int = 0

    @property
    def answer_type(self) -> str:
        return SLOTS_BY_NAME[self.slot].answer_type


def render_question(slot: str, arg: str | None = None, paraphrase: int = 0) -> str:
    """The text of one question of the grammar (what `parse_question` reads back)."""
    spec = SLOTS_BY_NAME[slot]
    template = spec.templates[paraphrase]
    if spec.args:
        if arg not in spec.args:
            raise ValueError(f"slot {slot!r} takes one of {spec.args}, got {arg!r}")
        return template.replace("{a_x}", f"{_article(arg)} {arg}").replace("{x}", arg)
    return template


_SYNONYMS = (
    (re.compile(r"\bx ray\b|\bxray\b|\bradiograph\b"), "x-ray"),
    (re.compile(r"\bmr\b"), "mri"),
    (re.compile(r"\bct scan\b"), "ct"),
)


def normalize_question(text: str) -> str:
    """Lowercase, punctuation to spaces (the hyphen of x-ray kept), collapsed whitespace."""
    text = text.lower().replace("\u2019", "'")
    text = re.sub(r"[^a-z0-9\- ]+", " ", text)
    text = re.sub(r"\s*-\s*", "-", text)
    text = " ".join(text.split())
    for pattern, repl in _SYNONYMS:
        text = pattern.sub(repl, text)
    return text


_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def normalize_answer(text: str) -> str:
    """An answer in the grammar's own form: `normalize_question`, digits as words, no articles.

    "2" -> "two", "The Liver." -> "liver", "X ray" -> "x-ray", "none" -> "zero".
    """
    words = normalize_question(text).split()
    words = [_NUMBER_WORDS[int(w)] if w.isdigit() and int(w) < len(_NUMBER_WORDS) else w for w in words]
    words = ["zero" if w == "none" else w for w in words if w not in ("a", "an", "the")]
    return " ".join(words)


def answer_matches(gold: str, answer: str) -> bool:
    """Whether `answer` says exactly the gold answer of the grammar (after `normalize_answer`)."""
    return normalize_answer(answer) == normalize_answer(gold)


def _compile_grammar() -> list[tuple[re.Pattern[str], str, int]]:
    compiled = []
    for spec in SLOTS:
        for i, template in enumerate(spec.templates):
            text = template.replace("{a_x}", "qqaxqq").replace("{x}", "qqxqq")
            pattern = re.escape(normalize_question(text))
            alternation = "|".join(re.escape(a) for a in sorted(spec.args, key=len, reverse=True))
            pattern = pattern.replace("qqaxqq", rf"(?:an?\ )?(?P<a>{alternation})")
            pattern = pattern.replace("qqxqq", rf"(?:the\ )?(?P<x>{alternation})")
            compiled.append((re.compile(rf"^{pattern}$"), spec.name, i))
    return compiled


_GRAMMAR: list[tuple[re.Pattern[str], str, int]] = []


def parse_question(text: str) -> ParsedQuestion | None:
    """The slot and argument of a question of the grammar, or None if it is not one."""
    if not isinstance(text, str):
        return None
    norm = normalize_question(text)
    if not norm:
        return None
    if not _GRAMMAR:  # compiled on first use: importing this module stays cheap for the CLI
        _GRAMMAR.extend(_compile_grammar())
    for pattern, slot, i in _GRAMMAR:
        m = pattern.match(norm)
        if m:
            groups = m.groupdict()
            arg = groups.get("x") or groups.get("a")
            return ParsedQuestion(slot=slot, arg=arg, paraphrase=i)
    return None


def answer_for(scene: Scene, parsed: ParsedQuestion | None) -> str | None:
    """The gold answer of a parsed question about a scene, or None if it is undefined there."""
    if parsed is None or parsed.slot not in SLOTS_BY_NAME:
        return None
    slot, arg = parsed.slot, parsed.arg
    spec = SLOTS_BY_NAME[slot]
    if spec.args and arg not in spec.args:
        return None
    n = scene.n_lesions

    def yn(flag: bool) -> str:
        return "yes" if flag else "no"

    if slot == "modality":
        return scene.modality
    if slot == "region":
        return scene.region
    if slot == "plane":
        return scene.plane
    if slot == "count":
        return COUNT_WORDS[n]
    if slot == "location":
        return scene.lesions[0].location if n == 1 else None
    if slot == "organ":
        organs = scene.abnormal_organs
        return organs[0] if len(organs) == 1 else None
    if slot == "is_modality":
        return yn(scene.modality == arg)
    if slot == "is_region":
        return yn(scene.region == arg)
    if slot == "is_plane":
        return yn(scene.plane == arg)
    if slot == "lesion_side":
        return yn(any(lesion.side == arg for lesion in scene.lesions))
    if slot == "normal":
        return yn(n == 0)
    if slot == "multiple":
        return yn(n >= 2)
    if slot == "organ_abnormal":
        if arg not in scene.organs:
            return None
        return yn(arg in scene.abnormal_organs)
    return None


def all_questions(slot: str | None = None) -> list[tuple[str, ParsedQuestion]]:
    """Every question string of the grammar with its parse (slot, argument, paraphrase)."""
    out = []
    for spec in SLOTS:
        if slot is not None and spec.name != slot:
            continue
        for arg in spec.args or (None,):
            for i in range(len(spec.templates)):
                out.append((render_question(spec.name, arg, i), ParsedQuestion(spec.name, arg, i)))
    return out


def caption_for(scene: Scene) -> str:
    """One sentence describing the scene (for the alignment stage)."""
    head = f"{_article(scene.plane)} {scene.plane} {scene.modality} image of the {scene.region}"
    n = scene.n_lesions
    if n == 0:
        return f"{head} with no lesion."
    if n == 1:
        lesion = scene.lesions[0]
        return f"{head} showing one {lesion.size} lesion in the {lesion.organ} at the {lesion.location}."
    organs = " and ".join(scene.abnormal_organs)
    return f"{head} showing {COUNT_WORDS[n]} lesions in the {organs}."


def corpus_texts() -> list[str]:
    """Every text the tiny model must be able to tokenize: questions, answers, captions, instructions."""
    from medvqa.prompts import ASK_INSTRUCTION, CAPTION_INSTRUCTION  # the trainers' instructions

    texts = [ASK_INSTRUCTION, CAPTION_INSTRUCTION]
    texts += [q for q, _ in all_questions()]
    for spec in SLOTS:
        texts += list(spec.answers)
    texts += ["yes", "no", *SIZES, *ORGANS, *(f"{lv} {sd}" for lv, sd in QUADRANTS)]
    for modality in MODALITIES:
        for region in REGIONS:
            for plane in PLANES:
                base = Scene("corpus", "corpus", modality, region, plane)
                texts.append(caption_for(base))
                quads = list(QUADRANTS)
                for k, (level, side) in enumerate(quads):
                    for size in SIZES:
                        lesion = Lesion(
                            level, side, QUADRANT_ORGAN[region][(level, side)], size, 0.5, 0.5, 0.1
                        )
                        texts.append(caption_for(dataclasses.replace(base, lesions=(lesion,))))
                    for n in range(2, 5):
                        group = [quads[(k + j) % 4] for j in range(n)]
                        lesions = tuple(
                            Lesion(lv, sd, QUADRANT_ORGAN[region][(lv, sd)], "small", 0.5, 0.5, 0.1)
                            for lv, sd in group
                        )
                        texts.append(caption_for(dataclasses.replace(base, lesions=lesions)))
    return list(dict.fromkeys(texts))


def _defined(scene: Scene, slot: str, arg: str | None) -> str | None:
    return answer_for(scene, ParsedQuestion(slot, arg))


def sample_questions(
    rng: Any, scene: Scene, n_open: int, n_closed: int, lesion_weight: float = 1.0
) -> list[tuple[ParsedQuestion, str]]:
    """OPEN questions on distinct defined slots, then CLOSED ones alternating yes/no from a random start.

    Slots about lesions are drawn `lesion_weight` times as often as the global ones (modality,
    region, plane), among the slots defined for the scene.
    """
    out: list[tuple[ParsedQuestion, str]] = []

    def weight(slot: str) -> float:
        return lesion_weight if SLOTS_BY_NAME[slot].about_lesions else 1.0

    open_slots = [
        s.name for s in SLOTS if s.answer_type == "OPEN" and _defined(scene, s.name, None) is not None
    ]
    k = min(n_open, len(open_slots))
    w = [weight(slot) for slot in open_slots]
    p = [x / sum(w) for x in w]
    for idx in sorted(rng.choice(len(open_slots), size=k, replace=False, p=p).tolist()) if k else []:
        slot = open_slots[idx]
        parsed = ParsedQuestion(slot, None, int(rng.integers(3)))
        out.append((parsed, _defined(scene, slot, None)))  # type: ignore[arg-type]
    candidates: dict[str, list[tuple[str, str | None]]] = {"yes": [], "no": []}
    for spec in SLOTS:
        if spec.answer_type != "CLOSED":
            continue
        for arg in spec.args or (None,):
            answer = _defined(scene, spec.name, arg)
            if answer in candidates:
                candidates[answer].append((spec.name, arg))
    used: set[tuple[str, str | None]] = set()
    start = int(rng.integers(2))
    for j in range(n_closed):
        want = ("yes", "no")[(start + j) % 2]
        pool = [c for c in candidates[want] if c not in used] or [
            c for c in candidates["yes" if want == "no" else "no"] if c not in used
        ]
        if not pool:
            break
        slots = sorted({s for s, _ in pool}, key=lambda s: [x.name for x in SLOTS].index(s))
        w = [weight(slot) for slot in slots]
        slot = slots[int(rng.choice(len(slots), p=[x / sum(w) for x in w]))]
        args = [a for s, a in pool if s == slot]
        arg = args[int(rng.integers(len(args)))]
        used.add((slot, arg))
        parsed = ParsedQuestion(slot, arg, int(rng.integers(3)))
        out.append((parsed, _defined(scene, slot, arg)))  # type: ignore[arg-type]
    return out
