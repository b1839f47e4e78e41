"""Labeled-data fractions: seeded, nested, stratified by answer type, drawn at the image level.

Every image gets a rank from a seeded hash of its id; images are grouped into strata by the mix
of answer types they carry, and a fraction f takes the first ceil(f * n) images of each stratum
in rank order. Because the order never depends on f, f=0.09 ⊂ f=0.25 ⊂ f=1.0 for one seed.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medvqa.errors import BadInput
from medvqa.types import TrainRequest, VQASample, stable_hash

MAX_SEED = 2**32  # seeds are numpy/torch seeds: [0, 2^32)


def check_seed(seed: Any, what: str = "seed") -> int:
    """A seed numpy and torch both accept (checked before any data or model is loaded)."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < MAX_SEED:
        raise BadInput(f"{what} must be an integer in [0, 2^32), got {seed!r}")
    return seed


def check_fraction(fraction: Any, what: str = "fraction") -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction <= 1:
        raise BadInput(f"{what} must be a number in (0, 1], got {fraction!r}")
    return float(fraction)


def _rank(seed: int, image_id: str) -> str:
    return hashlib.sha256(f"{seed}\x00{image_id}".encode()).hexdigest()


def select_fraction(samples: Sequence[VQASample], fraction: float, seed: int) -> list[VQASample]:
    """The samples of the images in the seeded, nested, stratified `fraction` of images."""
    if not 0.0 < fraction <= 1.0:
        raise BadInput(f"fraction must be in (0, 1], got {fraction}")
    by_image: dict[str, list[VQASample]] = defaultdict(list)
    for s in samples:
        by_image[s.image_id].append(s)
    strata: dict[tuple[int, int], list[str]] = defaultdict(list)
    for image_id, items in by_image.items():
        n_closed = sum(s.answer_type == "CLOSED" for s in items)
        strata[(len(items) - n_closed, n_closed)].append(image_id)
    chosen: set[str] = set()
    for images in strata.values():
        images.sort(key=lambda i: _rank(seed, i))
        chosen.update(images[: math.ceil(fraction * len(images))])
    return [s for s in samples if s.image_id in chosen]


def manifest_hash(samples: Sequence[VQASample]) -> str:
    """Identity of a training subset: the hash of its sorted sample ids (and benchmark/split)."""
    return stable_hash(sorted((s.benchmark, s.split, s.id) for s in samples))


def fraction_request(
    samples: Sequence[VQASample],
    fraction: float,
    seed: int,
    *,
    base_model: str,
    out_dir: Path,
    config: Any = None,
    data_root: str = "",
) -> TrainRequest:
    """The training request for `fraction` of `samples`: the labeled subset and its manifest, the
    held-out rest (the `reference` expert's QA, never test data) and its images as the unlabeled pool."""
    chosen = select_fraction(samples, fraction, seed)
    chosen_images = {s.image_id for s in chosen}
    heldout = [s for s in samples if s.image_id not in chosen_images]
    unlabeled = sorted(dict.fromkeys(str(s.image) for s in heldout if isinstance(s.image, str)))
    return TrainRequest(
        base_model=base_model,
        train_samples=chosen,
        out_dir=out_dir,
        seed=seed,
        fraction=fraction,
        manifest_hash=manifest_hash(chosen),
        unlabeled_images=unlabeled,
        config=config,
        heldout_samples=heldout,
        data_root=data_root,
    )
