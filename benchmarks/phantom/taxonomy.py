"""Phantom's taxonomy (modalities, regions, planes, quadrants, organs, sizes) and its generator config.

Everything else in the package speaks these words; `PhantomConfig` is the one place a generator
knob is declared (the CLI flags of `medvqa data phantom` derive from it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from medvqa.errors import BadInput

GENERATOR_VERSION = "1.3"
BUILD_HINT = "build one with: medvqa data phantom --out DIR"

MODALITIES: tuple[str, ...] = ("ct", "mri", "x-ray")
REGIONS: tuple[str, ...] = ("head", "chest", "abdomen")
PLANES: tuple[str, ...] = ("axial", "coronal")
SIDES: tuple[str, ...] = ("left", "right")
# Quadrants in a fixed order: (level, side). Left/right are as seen in the image.
QUADRANTS: tuple[tuple[str, str], ...] = (
    ("upper", "left"),
    ("upper", "right"),
    ("lower", "left"),
    ("lower", "right"),
)
SIZES: tuple[str, ...] = ("small", "large")
COUNT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four")  # max_lesions <= 4
# Which organ a lesion in each quadrant lies in, per region (image left = patient right: the liver).
QUADRANT_ORGAN: dict[str, dict[tuple[str, str], str]] = {
    "head": {
        ("upper", "left"): "brain",
        ("upper", "right"): "brain",
        ("lower", "left"): "cerebellum",
        ("lower", "right"): "cerebellum",
    },
    "chest": {
        ("upper", "left"): "lung",
        ("upper", "right"): "lung",
        ("lower", "left"): "lung",
        ("lower", "right"): "heart",
    },
    "abdomen": {
        ("upper", "left"): "liver",
        ("upper", "right"): "spleen",
        ("lower", "left"): "kidney",
        ("lower", "right"): "kidney",
    },
}
REGION_ORGANS: dict[str, tuple[str, ...]] = {
    region: tuple(dict.fromkeys(mapping.values())) for region, mapping in QUADRANT_ORGAN.items()
}
ORGANS: tuple[str, ...] = tuple(dict.fromkeys(o for r in REGIONS for o in REGION_ORGANS[r]))

SPLITS: tuple[str, ...] = ("train", "test")


@dataclass(frozen=True)
class PhantomConfig:
    """How a Phantom benchmark is generated. Every knob is one field; CLI flags derive from it."""

    seed: int = field(default=0, metadata={"help": "Seed of the generator: same seed, same bytes."})
    train_images: int = field(default=2000, metadata={"help": "Number of training images."})
    test_images: int = field(default=400, metadata={"help": "Number of test images."})
    size: int = field(default=64, metadata={"help": "Image side in pixels (the CPU demo uses 32)."})
    open_per_image: int = field(
        default=3, metadata={"help": "OPEN questions per image (distinct slots; fewer if fewer are defined)."}
    )
    closed_per_image: int = field(
        default=2,
        metadata={"help": "CLOSED yes/no questions per image, alternating yes and no (chance = 50%)."},
    )
    p_normal: float = field(default=0.3, metadata={"help": "Share of images without any lesion."})
    max_lesions: int = field(
        default=3, metadata={"help": "Most lesions in one image (1-4, one per quadrant)."}
    )
    noise: float = field(default=1.0, metadata={"help": "Scale of the modality's pixel noise (0 = clean)."})
    lesion_contrast: float = field(
        default=1.0, metadata={"help": "Scale of the lesions' contrast against their organ (lower = harder)."}
    )
    lesion_weight: float = field(
        default=2.0,
        metadata={
            "help": "How much more often questions about lesions are drawn than modality/region/plane ones."
        },
    )
    captions: bool = field(default=True, metadata={"help": "Write captions.jsonl for every split."})

    def validate(self) -> None:
        checks = [
            (self.train_images >= 0, "train_images must be >= 0"),
            (self.test_images >= 0, "test_images must be >= 0"),
            (8 <= self.size <= 1024, "size must be between 8 and 1024 pixels"),
            (self.open_per_image >= 0, "open_per_image must be >= 0"),
            (self.closed_per_image >= 0, "closed_per_image must be >= 0"),
            (self.open_per_image + self.closed_per_image > 0, "at least one question per image is needed"),
            (0.0 <= self.p_normal <= 1.0, "p_normal must be in [0, 1]"),
            (1 <= self.max_lesions <= 4, "max_lesions must be in 1..4"),
            (self.noise >= 0.0, "noise must be >= 0"),
            (self.lesion_contrast > 0.0, "lesion_contrast must be > 0"),
            (self.lesion_weight > 0.0, "lesion_weight must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise BadInput(f"phantom config: {message}")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
