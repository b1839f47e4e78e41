"""Rendering a Phantom scene to a grayscale image (numpy only, deterministic from the generator).

numpy is imported inside `render_scene`, so importing the package stays cheap.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from medvqa.benchmarks.phantom.scenes import Scene
from medvqa.benchmarks.phantom.taxonomy import PhantomConfig

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
