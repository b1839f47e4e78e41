"""Stage 2, step 4: preference pairs from the judged answers (+ labeled replay rows) → `pairs.jsonl`.

Per judged question with n scored answers: chosen = the most common answer among the best-scored,
rejected = the most common among the worst (then the next-worst distinct answers, up to
`pairs_per_question`), when chosen - rejected > 0 and >= `pair_min_margin`. "Most common" makes the
pair the policy's typical right vs typical wrong answer. When all n scores are equal the question
is a tie: skipped, or with `tie_policy="second"` (the original code's rule, defined for two
answers) answer 2 is chosen over answer 1.

Labeled replay: each labeled QA as a chosen == rejected row (`"replay": true`). Its DPO term is the
constant log 2 (no gradient); an SFT term (`dpo_loss="sigmoid+sft"`) trains on it, so the labels are
replayed inside the DPO run. These rows are labeled data already counted in `n_labeled`: `pairs`
counts only the self-generated pairs.

Counts (what explains a result): judged, unjudgeable, ties, ties_identical (all n answers the same
string), mixed (best > worst), below_margin, pairs, replay, closed pairs and the share of them whose
chosen answer is "yes", pairs per category (the expert's, e.g. the Phantom slot).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medvqa.errors import BadInput
from medvqa.trainers.stllava_med.stagefiles import iter_checked

TIE_POLICIES = ("skip", "second")


def _most_common(answers: Sequence[str]) -> list[str]:
    """Distinct answers, most frequent first (ties: first seen first)."""
    counts = Counter(answers)
    first = {a: i for i, a in reversed(list(enumerate(answers)))}
    return sorted(counts, key=lambda a: (-counts[a], first[a]))


def select_pairs(
    answers: Sequence[str],
    scores: Sequence[float],
    *,
    min_margin: float = 0.0,
    per_question: int = 1,
    tie_policy: str = "skip",
) -> list[tuple[str, str, float, float]]:
    """(chosen, rejected, chosen score, rejected score) for one question's scored answers."""
    if len(answers) != len(scores) or not answers:
        return []
    best, worst = max(scores), min(scores)
    if best == worst:
        if tie_policy == "second" and len(answers) >= 2:
            return [(answers[1], answers[0], scores[1], scores[0])]
        return []
    if best - worst < min_margin:
        return []
    score_of: dict[str, float] = {}
    for a, s in zip(answers, scores, strict=True):
        score_of.setdefault(a, s)  # a judge scores one string one way; the first score stands
    chosen = next(a for a in _most_common(answers) if score_of[a] == best)
    worse = [a for a in _most_common(answers) if best - score_of[a] >= max(min_margin, 1e-12)]
    worse.sort(key=lambda a: score_of[a])  # worst first; equal scores keep frequency order
    return [(chosen, r, best, score_of[r]) for r in worse[: max(1, per_question)]]


def replay_rows(samples: Sequence[Any]) -> list[dict[str, Any]]:
    """Labeled QA as chosen == rejected rows (SFT-term only in DPO)."""
    return [
        {
            "id": f"replay-{s.id}",
            "image": s.image,
            "prompt": s.question,
            "answer_type": s.prompt_answer_type,
            "chosen": s.answer,
            "rejected": s.answer,
            "replay": True,
        }
        for s in samples
    ]


def make_pairs(
    judged_path: Path,
    out_path: Path,
    tie_policy: str = "skip",
    *,
    min_margin: float = 0.0,
    per_question: int = 1,
    replay: Sequence[Any] = (),
) -> dict[str, Any]:
    """`pairs.jsonl` from `judged.jsonl` (+ replay rows for the labeled `replay` samples); the counts."""
    from medvqa.io import atomic_write_jsonl

    if tie_policy not in TIE_POLICIES:
        raise BadInput(f"tie_policy must be 'skip' or 'second', got {tie_policy!r}")
    rows = iter_checked(judged_path, ("id", "image", "question"))
    pairs: list[dict[str, Any]] = []
    c: Counter[str] = Counter()
    per_category: Counter[str] = Counter()
    closed = closed_yes = 0
    for r in rows:
        scores, answers = r.get("scores"), r.get("answers") or []
        if scores is None or len(scores) != len(answers) or len(answers) < 2:
            c["unjudgeable"] += 1
            continue
        c["judged"] += 1
        if max(scores) == min(scores):
            c["ties"] += 1
            c["ties_identical"] += len(set(answers)) == 1
        else:
            c["mixed"] += 1
        chosen_rows = select_pairs(
            answers, scores, min_margin=min_margin, per_question=per_question, tie_policy=tie_policy
        )
        if not chosen_rows and max(scores) > min(scores):
            c["below_margin"] += 1
        for k, (chosen, rejected, s_c, s_r) in enumerate(chosen_rows):
            pairs.append(
                {
                    "id": r["id"] if k == 0 else f"{r['id']}-p{k}",
                    "image": r["image"],
                    "prompt": r["question"],
                    "answer_type": r.get("answer_type") or "",
                    "chosen": chosen,
                    "rejected": rejected,
                    "scores": [s_c, s_r],
                    **({"category": r["category"]} if r.get("category") else {}),
                }
            )
            c["chosen_yes"] += chosen.strip().lower() == "yes"
            if (r.get("answer_type") or "") == "CLOSED":
                closed += 1
                closed_yes += chosen.strip().lower() == "yes"
            per_category[str(r.get("category") or "unknown")] += 1
    replayed = replay_rows(replay)
    atomic_write_jsonl(out_path, [*pairs, *replayed])
    return {
        **{k: c[k] for k in ("judged", "unjudgeable", "ties", "ties_identical", "mixed", "below_margin")},
        "pairs": len(pairs),
        "replay": len(replayed),
        "chosen_yes": c["chosen_yes"],
        "closed_pairs": closed,
        "closed_chosen_yes_rate": round(closed_yes / closed, 4) if closed else None,
        "pairs_per_category": dict(sorted(per_category.items())),
    }
