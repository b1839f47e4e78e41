"""Train/test image overlap: how many test questions ask about an image the training split also has.

Images are compared by content (`medvqa.safety.image_sha256`), not by name, because the public
releases re-encode and rename images between splits. Used by `medvqa data overlap`; callable by a
sweep or a report that wants to say whether a benchmark's test split is clean.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from medvqa.safety import image_sha256
from medvqa.types import VQASample


def _digests(samples: Sequence[VQASample], cache: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """(content hash → first image id, the hash of every sample's image in order)."""
    first: dict[str, str] = {}
    per_sample = []
    for s in samples:
        key = s.image if isinstance(s.image, str) else None
        digest = cache.get(key) if key is not None else None
        if digest is None:
            digest = image_sha256(s.image)
            if key is not None:
                cache[key] = digest
        first.setdefault(digest, s.image_id)
        per_sample.append(digest)
    return first, per_sample


def image_overlap(
    train: Sequence[VQASample], test: Sequence[VQASample], *, examples: int = 5
) -> dict[str, Any]:
    """Counts of images shared between `train` and `test` (by content), and a few examples."""
    cache: dict[str, str] = {}
    train_images, _ = _digests(train, cache)
    test_images, test_digests = _digests(test, cache)
    shared = sorted(set(train_images) & set(test_images), key=lambda d: test_images[d])
    shared_set = set(shared)
    return {
        "n_images": {"train": len(train_images), "test": len(test_images)},
        "n_shared_images": len(shared),
        "share_of_test_images": round(100.0 * len(shared) / len(test_images), 2) if test_images else 0.0,
        "n_test_questions_on_shared_images": sum(d in shared_set for d in test_digests),
        "n_test_questions": len(test_digests),
        "examples": [
            {"sha256": d, "train": train_images[d], "test": test_images[d]}
            for d in shared[: max(examples, 0)]
        ],
    }
