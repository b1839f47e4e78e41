"""Phantom: the embedded synthetic radiology-like VQA benchmark (registry name `phantom`).

Imaging phantoms are the synthetic test objects of medical imaging. This one is procedural: each
image is a *scene* — modality (ct, mri, x-ray), body region (head, chest, abdomen), plane (axial,
coronal), organs drawn as shapes, 0–3 lesions in distinct quadrants (upper/lower × left/right, as
seen in the image) with a size — rendered to a grayscale PNG with numpy + pillow, deterministic
from a seed. Questions come from a small grammar with three paraphrases per slot; the grammar
parses back (`parse_question`) and answers itself from any scene (`answer_for`), so a judge can
decide any question of the grammar about any image, and refuses (None) what it cannot decide.

On disk (`write_phantom(out_dir, config)`):

    phantom.json                      generator version, config, counts
    {split}/images/{image_id}.png     the images
    {split}/scenes.jsonl              one scene record per image (the ground truth of everything)
    {split}/samples.jsonl             one `VQASample.to_json()` per line, image paths relative to the root
    {split}/captions.jsonl            {"image_id", "image", "caption"}: one sentence per image

Top-level imports are light (stdlib only): the CLI derives its flags from `PhantomConfig` at
start-up. numpy and pillow are imported inside the functions that draw.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medvqa.errors import BadInput
from medvqa.registry import benchmarks
from medvqa.types import Benchmark, VQASample

GENERATOR_VERSION = "1.3"
BUILD_HINT = "build one with: medvqa data phantom --out DIR"

MODALITIES: tuple[str, ...] = ("ct", "mri", "x-ray")
REGIONS: tuple[str, ...] = ("head", "chest", "abdomen")
PLANES: tuple[str, ...] = ("axial", "coronal")
SIDES: tuple[str, ...] = ("left", "right")
LEVELS: tuple[str, ...] = ("upper", "lower")
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

ASK_INSTRUCTION = "Ask a question about this image."
CAPTION_INSTRUCTION = "Describe this image."


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------


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


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" or word in ("mri", "x-ray") else "a"


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


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

# Tissue intensities (0-255) per modality. CT: black air, grey soft tissue, white bone, sharp and
# quiet. MRI (T1-like): bright fat rim, dark cortical bone, smooth, a bias field, noisy background.
# X-ray: a blurry grainy projection on a grey background with bright bones.
_TISSUE: dict[str, dict[str, float]] = {
    "ct": {
        "bg": 4, "soft": 100, "fat": 62, "bone": 250, "brain": 122, "cerebellum": 138, "csf": 55,
        "lung": 16, "heart": 135, "liver": 145, "spleen": 122, "kidney": 122, "lesion": 228,
    },
    "mri": {
        "bg": 12, "soft": 150, "fat": 238, "bone": 30, "brain": 182, "cerebellum": 160, "csf": 40,
        "lung": 14, "heart": 105, "liver": 175, "spleen": 130, "kidney": 118, "lesion": 252,
    },
    "x-ray": {
        "bg": 70, "soft": 120, "fat": 105, "bone": 235, "brain": 135, "cerebellum": 135, "csf": 130,
        "lung": 60, "heart": 160, "liver": 155, "spleen": 140, "kidney": 140, "lesion": 240,
    },
}  # fmt: skip
_NOISE = {"ct": 4.0, "mri": 7.0, "x-ray": 8.0}
_BLUR = {"ct": 0.0, "mri": 0.8, "x-ray": 1.1}  # radius in supersampled pixels


class _Canvas:
    """A float image on a supersampled grid with normalized coordinates [-1, 1] (y down)."""

    def __init__(self, np: Any, side: int, scale: float, dx: float, dy: float, fill: float):
        self.np = np
        coords = (np.arange(side, dtype=np.float32) + 0.5) / side * 2 - 1
        self.x = (coords[None, :] - dx) / scale
        self.y = (coords[:, None] - dy) / scale
        self.img = np.full((side, side), fill, dtype=np.float32)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float) -> Any:
        return ((self.x - cx) / rx) ** 2 + ((self.y - cy) / ry) ** 2 <= 1.0

    def rect(self, x0: float, y0: float, x1: float, y1: float) -> Any:
        return (self.x >= x0) & (self.x <= x1) & (self.y >= y0) & (self.y <= y1)

    def paint(self, mask: Any, value: float) -> None:
        self.img[mask] = value


def _vertebra(c: _Canvas, y: float, t: Mapping[str, float]) -> None:
    """An axial vertebra: a wide body with a spinous process behind it (not a round blob like a lesion)."""
    c.paint(c.ellipse(0, y, 0.17, 0.08) | c.rect(-0.03, y, 0.03, y + 0.2), t["bone"])


def _draw_anatomy(c: _Canvas, region: str, plane: str, t: Mapping[str, float]) -> None:
    """Body silhouette, organs and bones. Coronal bodies run off the bottom edge; axial ones do not."""
    if region == "head":
        if plane == "axial":
            outer = c.ellipse(0, 0, 0.66, 0.84)
            skull_in = c.ellipse(0, 0, 0.57, 0.75)
            c.paint(outer, t["fat"])
            c.paint(c.ellipse(0, 0, 0.62, 0.8), t["bone"])
            c.paint(skull_in, t["brain"])
            c.paint(c.ellipse(0, 0.5, 0.46, 0.2) & skull_in, t["cerebellum"])
            c.paint(c.ellipse(-0.12, -0.05, 0.08, 0.26), t["csf"])  # lateral ventricles
            c.paint(c.ellipse(0.12, -0.05, 0.08, 0.26), t["csf"])
        else:
            c.paint(c.rect(-0.3, 0.3, 0.3, 1.2), t["soft"])  # neck
            c.paint(c.rect(-0.08, 0.3, 0.08, 1.2), t["bone"])  # cervical spine
            c.paint(c.ellipse(0, -0.2, 0.68, 0.7), t["fat"])
            c.paint(c.ellipse(0, -0.2, 0.64, 0.66), t["bone"])
            inner = c.ellipse(0, -0.2, 0.55, 0.57)
            c.paint(inner, t["brain"])
            c.paint(c.ellipse(0, 0.15, 0.46, 0.19) & inner, t["cerebellum"])
            c.paint(c.ellipse(-0.12, -0.25, 0.07, 0.16), t["csf"])
            c.paint(c.ellipse(0.12, -0.25, 0.07, 0.16), t["csf"])
    elif region == "chest":
        if plane == "axial":
            c.paint(c.ellipse(0, 0.02, 0.94, 0.66), t["fat"])
            c.paint(c.ellipse(0, 0.02, 0.88, 0.6), t["soft"])
            c.paint(c.ellipse(-0.45, -0.02, 0.3, 0.46), t["lung"])
            c.paint(c.ellipse(0.45, -0.02, 0.3, 0.46), t["lung"])
            c.paint(c.ellipse(0.24, 0.2, 0.26, 0.22), t["heart"])
            _vertebra(c, 0.5, t)
            c.paint(c.ellipse(0, -0.5, 0.09, 0.05), t["bone"])  # sternum
        else:
            body = c.ellipse(0, -0.35, 0.92, 0.5) | c.rect(-0.82, -0.35, 0.82, 1.2)
            c.paint(body, t["fat"])
            c.paint(c.ellipse(0, -0.33, 0.87, 0.46) | c.rect(-0.77, -0.33, 0.77, 1.2), t["soft"])
            c.paint(c.ellipse(-0.42, -0.05, 0.3, 0.58), t["lung"])
            c.paint(c.ellipse(0.42, -0.05, 0.3, 0.58), t["lung"])
            c.paint(c.ellipse(0.24, 0.35, 0.28, 0.24), t["heart"])
            c.paint(c.rect(-0.06, -0.8, 0.06, 1.2), t["bone"])  # spine
            c.paint(c.rect(-0.7, -0.72, -0.1, -0.66) | c.rect(0.1, -0.72, 0.7, -0.66), t["bone"])  # clavicles
    else:  # abdomen
        if plane == "axial":
            c.paint(c.ellipse(0, 0.02, 0.92, 0.66), t["fat"])
            c.paint(c.ellipse(0, 0.02, 0.84, 0.58), t["soft"])
            c.paint(c.ellipse(-0.38, -0.15, 0.36, 0.32), t["liver"])
            c.paint(c.ellipse(0.5, -0.15, 0.22, 0.22), t["spleen"])
            c.paint(c.ellipse(-0.42, 0.3, 0.17, 0.14), t["kidney"])
            c.paint(c.ellipse(0.42, 0.3, 0.17, 0.14), t["kidney"])
            _vertebra(c, 0.42, t)
        else:
            c.paint(c.rect(-0.86, -1.2, 0.86, 1.2), t["fat"])
            c.paint(c.rect(-0.8, -1.2, 0.8, 1.2), t["soft"])
            c.paint(c.ellipse(-0.38, -0.45, 0.4, 0.3), t["liver"])
            c.paint(c.ellipse(0.45, -0.4, 0.22, 0.2), t["spleen"])
            c.paint(c.ellipse(-0.3, 0.25, 0.14, 0.22), t["kidney"])
            c.paint(c.ellipse(0.3, 0.25, 0.14, 0.22), t["kidney"])
            c.paint(c.rect(-0.06, -1.2, 0.06, 1.2), t["bone"])  # spine
            iliac = c.ellipse(-0.5, 0.95, 0.32, 0.2) | c.ellipse(0.5, 0.95, 0.32, 0.2)
            c.paint(iliac, t["bone"])


def _gaussian_blur(np: Any, img: Any, sigma: float) -> Any:
    """Separable Gaussian blur with edge padding (numpy only, deterministic)."""
    radius = max(1, int(3 * sigma + 0.5))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1, dtype=np.float32) / sigma) ** 2)
    taps /= taps.sum()
    padded = np.pad(img, radius, mode="edge")
    rows = sum(w * padded[:, k : k + img.shape[1]] for k, w in enumerate(taps))
    return sum(w * rows[k : k + img.shape[0], :] for k, w in enumerate(taps))


def render_scene(scene: Scene, size: int, rng: Any, config: PhantomConfig | None = None) -> Any:
    """The uint8 grayscale array (size x size) of a scene; `rng` supplies the pixel noise."""
    import numpy as np

    config = config or PhantomConfig()
    t = _TISSUE[scene.modality]
    side = size * 2  # draw at twice the size, then average 2x2 blocks: anti-aliased edges
    c = _Canvas(np, side, scene.scale, scene.dx, scene.dy, t["bg"])
    _draw_anatomy(c, scene.region, scene.plane, t)
    # Lesions: blobs clearly brighter than the organ they sit in, with a soft edge.
    raw_x = np.arange(side, dtype=np.float32)[None, :] + 0.5
    raw_y = np.arange(side, dtype=np.float32)[:, None] + 0.5
    for lesion in scene.lesions:
        cx, cy, r = lesion.x * side, lesion.y * side, lesion.radius * side
        d = np.sqrt((raw_x - cx) ** 2 + (raw_y - cy) ** 2) / r
        weight = np.clip((1.15 - d) / 0.3, 0.0, 1.0)
        base = t[lesion.organ]
        target = base + (t["lesion"] - base) * config.lesion_contrast
        c.img += weight * (target - c.img)
    img = c.img
    if scene.modality == "mri":  # bias field: a smooth left-right/top-bottom intensity ramp
        angle = rng.uniform(0, 2 * np.pi)
        ramp = np.cos(angle) * c.x + np.sin(angle) * c.y
        img = np.where(img > t["bg"] + 5, img * (1.0 + 0.12 * ramp), img)
    elif scene.modality == "x-ray":  # heel effect: brighter towards the top
        img = img + 12.0 * (-c.y)
    img = np.clip(img, 0, 255)
    blur = _BLUR[scene.modality] * side / 128
    if blur > 0:
        img = _gaussian_blur(np, img, blur)
    img = img.reshape(size, 2, size, 2).mean(axis=(1, 3))
    sigma = _NOISE[scene.modality] * config.noise
    if sigma > 0:
        noise = rng.normal(0.0, sigma, size=img.shape).astype(np.float32)
        if scene.modality == "mri":  # Rician-like: magnitude of a noisy signal, visible in the background
            img = np.sqrt((img + noise) ** 2 + (rng.normal(0.0, sigma, size=img.shape)) ** 2)
        else:
            img = img + noise
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# The question grammar
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Question sampling
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Writing and reading a Phantom folder
# --------------------------------------------------------------------------------------------

_SPLIT_STREAM = {"train": 1, "test": 2}


# Fields that change what image i (and its questions) looks like; the counts and captions do not.
_CONTENT_FIELDS_EXCLUDED = ("train_images", "test_images", "captions")


def data_key(config: PhantomConfig) -> str:
    """Short hash of the generator version and every setting that shapes an image.

    It is part of every image and question id, so two Phantom folders built with different seeds,
    sizes or knobs never share an id (prediction caches key on ids), while a folder with more
    images keeps the ids (and bytes) of the smaller one.
    """
    from medvqa.types import stable_hash

    content = {k: v for k, v in config.to_json().items() if k not in _CONTENT_FIELDS_EXCLUDED}
    return stable_hash({"version": GENERATOR_VERSION, **content}, length=6)


def _image_id(split: str, i: int, key: str) -> str:
    return f"{split}-{i:05d}-{key}"


def write_phantom(out_dir: str | Path, config: PhantomConfig | None = None) -> dict[str, Any]:
    """Build a Phantom folder (see the module docstring); same config, same bytes. Returns a summary."""
    import numpy as np
    from PIL import Image

    config = config or PhantomConfig()
    config.validate()
    started = time.perf_counter()
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise BadInput("exists and is not a folder", path=root)
    if root.exists() and any(root.iterdir()):
        if not (root / "phantom.json").is_file():
            raise BadInput(
                "folder is not empty and is not a Phantom folder; choose an empty or new folder", path=root
            )
        for split in _SPLIT_STREAM:
            if (root / split).is_dir():
                shutil.rmtree(root / split)
    root.mkdir(parents=True, exist_ok=True)
    # Marks the folder as ours while building (so a rebuild may clear it) and as incomplete until the end.
    building = {"benchmark": "phantom", "version": GENERATOR_VERSION, "status": "building"}
    _write_text(root / "phantom.json", json.dumps(building, indent=2, sort_keys=True) + "\n")
    counts: dict[str, dict[str, int]] = {}
    key = data_key(config)
    for split, n_images in (("train", config.train_images), ("test", config.test_images)):
        split_dir = root / split
        (split_dir / "images").mkdir(parents=True, exist_ok=True)
        scenes, samples, captions = [], [], []
        n_open = n_closed = n_yes = 0
        for i in range(n_images):
            image_id = _image_id(split, i, key)
            # One independent stream per image: image i does not depend on how many are drawn.
            rng = np.random.default_rng([config.seed, _SPLIT_STREAM[split], i])
            scene = sample_scene(rng, image_id, split, config)
            pixels = render_scene(scene, config.size, rng, config)
            rel = f"{split}/images/{image_id}.png"
            Image.fromarray(pixels, mode="L").save(root / rel, format="PNG", compress_level=6)
            record = scene.to_json()
            record["image"] = rel
            scenes.append(record)
            meta_base = {
                "image_id": image_id,
                "modality": scene.modality,
                "region": scene.region,
                "plane": scene.plane,
                "n_lesions": scene.n_lesions,
            }
            for j, (parsed, answer) in enumerate(
                sample_questions(
                    rng, scene, config.open_per_image, config.closed_per_image, config.lesion_weight
                )
            ):
                answer_type = SLOTS_BY_NAME[parsed.slot].answer_type
                n_open += answer_type == "OPEN"
                n_closed += answer_type == "CLOSED"
                n_yes += answer == "yes"
                sample = VQASample(
                    id=f"{image_id}-q{j}",
                    image=rel,
                    question=render_question(parsed.slot, parsed.arg, parsed.paraphrase),
                    answer=answer,
                    answer_type=answer_type,  # type: ignore[arg-type]
                    benchmark="phantom",
                    split=split,
                    meta={
                        **meta_base,
                        "slot": parsed.slot,
                        "slot_arg": parsed.arg,
                        "paraphrase": parsed.paraphrase,
                    },
                )
                samples.append(sample.to_json())
            if config.captions:
                captions.append({"image_id": image_id, "image": rel, "caption": caption_for(scene)})
        _write_jsonl(split_dir / "scenes.jsonl", scenes)
        _write_jsonl(split_dir / "samples.jsonl", samples)
        if config.captions:
            _write_jsonl(split_dir / "captions.jsonl", captions)
        counts[split] = {
            "images": n_images,
            "samples": len(samples),
            "open": n_open,
            "closed": n_closed,
            "closed_yes": n_yes,
            "captions": len(captions),
        }
    manifest = {
        "benchmark": "phantom",
        "version": GENERATOR_VERSION,
        "status": "complete",
        "data_key": key,
        "config": config.to_json(),
        "counts": counts,
    }
    _write_text(root / "phantom.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return {
        "out": str(root),
        "version": GENERATOR_VERSION,
        "seed": config.seed,
        "size": config.size,
        "data_key": key,
        "splits": counts,
        "seconds": round(time.perf_counter() - started, 3),
    }


def _write_text(path: Path, text: str) -> None:
    from medvqa.io import atomic_write_text

    atomic_write_text(path, text)


def _write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    _write_text(path, "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows))


def read_manifest(root: str | Path) -> dict[str, Any]:
    """The `phantom.json` of a folder; a BadInput with the build command if it is not a Phantom folder."""
    from medvqa.io import read_json

    root = Path(root)
    path = root / "phantom.json"
    if not root.is_dir():
        raise BadInput(f"no such folder; {BUILD_HINT}", path=root)
    if not path.is_file():
        raise BadInput(f"not a Phantom folder (no phantom.json); {BUILD_HINT}", path=root)
    manifest = read_json(path)
    if not isinstance(manifest, dict) or manifest.get("benchmark") != "phantom":
        raise BadInput(f"not a Phantom manifest; {BUILD_HINT}", path=path, field="benchmark")
    if manifest.get("status") != "complete":
        raise BadInput(f"incomplete Phantom build (interrupted?); {BUILD_HINT}", path=path, field="status")
    if manifest.get("version") != GENERATOR_VERSION:
        raise BadInput(
            f"built by Phantom generator version {manifest.get('version')!r}, this is {GENERATOR_VERSION!r}; "
            f"rebuild it ({BUILD_HINT})",
            path=path,
            field="version",
        )
    return manifest


def _split_file(root: Path, split: str, name: str) -> Path:
    if split not in Phantom.splits:
        raise BadInput(f"unknown split {split!r}; Phantom has {list(Phantom.splits)}")
    read_manifest(root)
    path = root / split / name
    if not path.is_file():
        raise BadInput(f"missing {split}/{name}; {BUILD_HINT}", path=path)
    return path


def _inside(root: Path, rel: Any, path: Path, lineno: int, key: str) -> Path:
    """`rel` resolved inside `root`; absolute paths, `..` and escaping symlinks are refused."""
    if not isinstance(rel, str) or not rel:
        raise BadInput("missing image path", path=path, record=f"line {lineno}", field=key)
    candidate = Path(rel)
    if candidate.is_absolute() or ".." in candidate.parts:
        raise BadInput(
            f"image path {rel!r} must be relative to the data root",
            path=path,
            record=f"line {lineno}",
            field=key,
        )
    resolved = (root / candidate).resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise BadInput(
            f"image path {rel!r} escapes the data root", path=path, record=f"line {lineno}", field=key
        )
    return resolved


def load_scenes(root: str | Path, split: str) -> dict[str, Scene]:
    """Scene records of a split, by image id."""
    from medvqa.io import iter_jsonl

    root = Path(root)
    path = _split_file(root, split, "scenes.jsonl")
    scenes: dict[str, Scene] = {}
    for lineno, record in iter_jsonl(path):
        try:
            scene = Scene.from_json(record)
        except (TypeError, KeyError, AttributeError) as exc:
            raise BadInput(f"malformed scene record ({exc})", path=path, record=f"line {lineno}") from None
        scenes[scene.image_id] = scene
    return scenes


def scenes_by_image(root: str | Path, splits: Sequence[str] | None = None) -> dict[str, Scene]:
    """Scenes of the given splits (default: all) keyed by the resolved absolute image path.

    This is how a judge that receives only an image path (as `VQASample.image` holds it) finds the
    scene; `load_scenes` keys by image id instead.
    """
    from medvqa.io import iter_jsonl

    root = Path(root)
    out: dict[str, Scene] = {}
    for split in splits or Phantom.splits:
        path = _split_file(root, split, "scenes.jsonl")
        for lineno, record in iter_jsonl(path):
            image = _inside(
                root, record.get("image") if isinstance(record, dict) else None, path, lineno, "image"
            )
            try:
                out[str(image)] = Scene.from_json(record)
            except (TypeError, KeyError, AttributeError) as exc:
                raise BadInput(
                    f"malformed scene record ({exc})", path=path, record=f"line {lineno}"
                ) from None
    return out


def load_captions(root: str | Path, split: str) -> list[dict[str, Any]]:
    """Caption records of a split: {"image_id", "image" (absolute, inside root), "caption"}."""
    from medvqa.io import iter_jsonl

    root = Path(root)
    path = _split_file(root, split, "captions.jsonl")
    out = []
    for lineno, record in iter_jsonl(path):
        for key in ("image_id", "image", "caption"):
            if not isinstance(record, dict) or key not in record:
                raise BadInput("missing field", path=path, record=f"line {lineno}", field=key)
        image = _inside(root, record["image"], path, lineno, "image")
        out.append({"image_id": record["image_id"], "image": str(image), "caption": record["caption"]})
    return out


@benchmarks.register("phantom")
class Phantom(Benchmark):
    """Phantom: synthetic radiology-like VQA (ct/mri/x-ray, head/chest/abdomen, lesions), built offline."""

    name = "phantom"
    version = GENERATOR_VERSION
    splits = ("train", "test")
    description = (
        "Procedurally generated radiology-like VQA (modality, region, plane, lesions), deterministic from a "
        "seed; the embedded default of the CPU demo."
    )

    def detect_layout(self, root: Path) -> str:
        manifest = read_manifest(root)
        config = manifest.get("config", {})
        return (
            f"phantom generator v{manifest['version']} (seed {config.get('seed')}, {config.get('size')} px, "
            f"data key {manifest.get('data_key')})"
        )

    def closed_rule(self, root: Path) -> str:
        return "dataset answer_type (generated yes/no questions)"

    def load(self, split: str, root: Path, *, skip_bad: bool = False) -> list[VQASample]:
        from medvqa.io import iter_jsonl

        root = Path(root)
        path = _split_file(root, split, "samples.jsonl")
        samples: list[VQASample] = []
        seen: set[str] = set()
        self.n_skipped = 0
        for lineno, record in iter_jsonl(path):
            try:
                samples.append(self._sample(root, path, lineno, record, split, seen))
            except BadInput:
                if not skip_bad:
                    raise
                self.n_skipped += 1
        return samples

    @staticmethod
    def _sample(root: Path, path: Path, lineno: int, record: Any, split: str, seen: set[str]) -> VQASample:
        where = {"path": path, "record": f"line {lineno}"}
        if not isinstance(record, dict):
            raise BadInput("expected a JSON object", **where)
        for key in ("id", "image", "question", "answer", "answer_type"):
            if not isinstance(record.get(key), str) or not record[key]:
                raise BadInput("missing or empty field", **where, field=key)
        if record["answer_type"] not in ("OPEN", "CLOSED"):
            raise BadInput(
                f"answer_type must be OPEN or CLOSED, got {record['answer_type']!r}",
                **where,
                field="answer_type",
            )
        if record["id"] in seen:
            raise BadInput(f"duplicate question id {record['id']!r}", **where, field="id")
        seen.add(record["id"])
        image = _inside(root, record["image"], path, lineno, "image")
        if not image.is_file():
            raise BadInput(f"image file not found: {image}", **where, field="image")
        return VQASample(
            id=record["id"],
            image=str(image),
            question=record["question"],
            answer=record["answer"],
            answer_type=record["answer_type"],
            benchmark="phantom",
            split=split,
            meta=dict(record.get("meta") or {}),
        )


def slot_table() -> list[dict[str, Any]]:
    """The grammar as rows (slot, type, example question, answers, when defined), for docs and `inspect`."""
    return [
        {
            "slot": s.name,
            "answer_type": s.answer_type,
            "example": render_question(s.name, s.args[0] if s.args else None, 0),
            "arguments": list(s.args),
            "answers": list(s.answers),
            "description": s.description,
        }
        for s in SLOTS
    ]


__all__: Sequence[str] = (
    "ASK_INSTRUCTION",
    "CAPTION_INSTRUCTION",
    "SLOTS",
    "Lesion",
    "ParsedQuestion",
    "Phantom",
    "PhantomConfig",
    "Scene",
    "answer_for",
    "answer_matches",
    "caption_for",
    "corpus_texts",
    "data_key",
    "load_captions",
    "load_scenes",
    "normalize_answer",
    "parse_question",
    "render_question",
    "render_scene",
    "scenes_by_image",
    "write_phantom",
)
