"""Phantom scenes: everything true about one image, and how one is drawn from a seeded generator."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from medvqa.benchmarks.phantom.taxonomy import (
    MODALITIES,
    PLANES,
    QUADRANT_ORGAN,
    QUADRANTS,
    REGION_ORGANS,
    REGIONS,
    SIZES,
    PhantomConfig,
)


@dataclass(frozen=True)
class Lesion:
    level: str  # upper | lower
    side: str  # left | right
    organ: str
    size: str  # small | large
    x: float  # centre, fraction of the width (0 = left edge)
    y: float  # centre, fraction of the height (0 = top edge)
    radius: float  # fraction of the width

    @property
    def location(self) -> str:
        return f"{self.level} {self.side}"


@dataclass(frozen=True)
class Scene:
    """Everything true about one image; every answer is computed from this."""

    image_id: str
    split: str
    modality: str
    region: str
    plane: str
    lesions: tuple[Lesion, ...] = ()
    # Pose of the body in the frame: scale and shift in normalized coordinates ([-1, 1] per axis).
    scale: float = 1.0
    dx: float = 0.0
    dy: float = 0.0

    @property
    def n_lesions(self) -> int:
        return len(self.lesions)

    @property
    def organs(self) -> tuple[str, ...]:
        return REGION_ORGANS[self.region]

    @property
    def abnormal_organs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(lesion.organ for lesion in self.lesions))

    def to_json(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        record["lesions"] = [dataclasses.asdict(lesion) for lesion in self.lesions]
        record["n_lesions"] = self.n_lesions
        record["organs"] = list(self.organs)
        return record

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> Scene:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in record.items() if k in names}
        values["lesions"] = tuple(Lesion(**lesion) for lesion in record.get("lesions", ()))
        return cls(**values)


# Lesion centres per region and plane, in normalized coordinates before the pose is applied.
_LESION_SITES: dict[tuple[str, str], dict[tuple[str, str], tuple[float, float]]] = {
    ("head", "axial"): {
        ("upper", "left"): (-0.28, -0.3),
        ("upper", "right"): (0.28, -0.3),
        ("lower", "left"): (-0.28, 0.5),
        ("lower", "right"): (0.28, 0.5),
    },
    ("head", "coronal"): {
        ("upper", "left"): (-0.28, -0.42),
        ("upper", "right"): (0.28, -0.42),
        ("lower", "left"): (-0.27, 0.16),
        ("lower", "right"): (0.27, 0.16),
    },
    ("chest", "axial"): {
        ("upper", "left"): (-0.45, -0.2),
        ("upper", "right"): (0.45, -0.2),
        ("lower", "left"): (-0.45, 0.2),
        ("lower", "right"): (0.3, 0.24),
    },
    ("chest", "coronal"): {
        ("upper", "left"): (-0.42, -0.35),
        ("upper", "right"): (0.42, -0.35),
        ("lower", "left"): (-0.42, 0.22),
        ("lower", "right"): (0.32, 0.38),
    },
    ("abdomen", "axial"): {
        ("upper", "left"): (-0.42, -0.2),
        ("upper", "right"): (0.5, -0.2),
        ("lower", "left"): (-0.42, 0.3),
        ("lower", "right"): (0.42, 0.3),
    },
    ("abdomen", "coronal"): {
        ("upper", "left"): (-0.4, -0.45),
        ("upper", "right"): (0.45, -0.4),
        ("lower", "left"): (-0.32, 0.27),
        ("lower", "right"): (0.32, 0.27),
    },
}
_SIZE_RADIUS = {"small": (0.12, 0.14), "large": (0.18, 0.21)}  # normalized units ([-1, 1] spans the width)


def sample_scene(rng: Any, image_id: str, split: str, config: PhantomConfig) -> Scene:
    """Draw one scene from a numpy Generator."""
    modality = MODALITIES[int(rng.integers(len(MODALITIES)))]
    region = REGIONS[int(rng.integers(len(REGIONS)))]
    # A radiograph is a frontal projection: x-ray images are coronal.
    plane = "coronal" if modality == "x-ray" else PLANES[int(rng.integers(len(PLANES)))]
    scale = float(rng.uniform(0.92, 1.04))
    dx, dy = (float(v) for v in rng.uniform(-0.04, 0.04, size=2))
    if rng.random() < config.p_normal:
        n = 0
    else:
        n = int(rng.integers(1, config.max_lesions + 1))
    chosen = sorted(rng.choice(len(QUADRANTS), size=n, replace=False).tolist()) if n else []
    lesions = []
    for q in chosen:
        level, side = QUADRANTS[q]
        size = SIZES[int(rng.integers(2))]
        lo, hi = _SIZE_RADIUS[size]
        radius = float(rng.uniform(lo, hi)) * scale
        bx, by = _LESION_SITES[(region, plane)][(level, side)]
        jx, jy = (float(v) for v in rng.uniform(-0.04, 0.04, size=2))
        cx = (bx + jx) * scale + dx
        cy = (by + jy) * scale + dy
        lesions.append(
            Lesion(
                level=level,
                side=side,
                organ=QUADRANT_ORGAN[region][(level, side)],
                size=size,
                x=round((cx + 1) / 2, 4),
                y=round((cy + 1) / 2, 4),
                radius=round(radius / 2, 4),
            )
        )
    return Scene(
        image_id=image_id,
        split=split,
        modality=modality,
        region=region,
        plane=plane,
        lesions=tuple(lesions),
        scale=round(scale, 4),
        dx=round(dx, 4),
        dy=round(dy, 4),
    )
