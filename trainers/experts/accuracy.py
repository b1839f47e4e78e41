"""A judge's own accuracy on labeled training samples: the number reported beside a line it judged.

A judge that is a model (or a noisy oracle) is only as good as its verdicts; its share of gold
answers scored correct on the policy's pool (whose labels the policy never sees) says how good.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any


def judge_accuracy(
    expert: Any, samples: Sequence[Any], correct_score: float, limit: int = 2000
) -> dict[str, Any]:
    """How often `expert` scores a labeled sample's gold answer `correct_score` (closed, open, all).

    At most `limit` samples (a seeded subset), so a model judge measures itself in seconds.
    """
    chosen = list(samples)
    if len(chosen) > limit:
        chosen = random.Random(0).sample(chosen, limit)
    items = [(s.image, s.question, [s.answer]) for s in chosen]
    verdicts = (
        expert.judge_many(items) if hasattr(expert, "judge_many") else [expert.judge(*i) for i in items]
    )
    hits: dict[str, list[int]] = {"CLOSED": [], "OPEN": []}
    for s, v in zip(chosen, verdicts, strict=True):
        if v is not None:
            hits.setdefault(s.answer_type, []).append(int(v[0] == correct_score))
    every = [h for hs in hits.values() for h in hs]

    def share(xs: list[int]) -> float | None:
        return round(100.0 * sum(xs) / len(xs), 2) if xs else None

    return {
        "n": len(chosen),
        "judged": len(every),
        "accuracy": share(every),
        "closed_accuracy": share(hits["CLOSED"]),
        "open_accuracy": share(hits["OPEN"]),
    }
