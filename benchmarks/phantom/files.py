"""Writing and reading a Phantom folder (the layout is in the package docstring).

`write_phantom` builds one (same config, same bytes); the readers check the manifest and keep every
image path inside the root (`medvqa.safety.PathGuard`, one per load).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from medvqa.benchmarks.phantom.grammar import SLOTS_BY_NAME, caption_for, render_question, sample_questions
from medvqa.benchmarks.phantom.render import render_scene
from medvqa.benchmarks.phantom.scenes import Scene, sample_scene
from medvqa.benchmarks.phantom.taxonomy import BUILD_HINT, GENERATOR_VERSION, SPLITS, PhantomConfig
from medvqa.errors import BadInput
from medvqa.safety import PathGuard
from medvqa.types import VQASample

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


def split_file(root: Path, split: str, name: str) -> Path:
    """`root/split/name` of a complete Phantom folder (a BadInput with the build command if absent)."""
    if split not in SPLITS:
        raise BadInput(f"unknown split {split!r}; Phantom has {list(SPLITS)}")
    read_manifest(root)
    path = root / split / name
    if not path.is_file():
        raise BadInput(f"missing {split}/{name}; {BUILD_HINT}", path=path)
    return path


def inside(guard: PathGuard, rel: Any, path: Path, lineno: int, key: str) -> Path:
    """`rel` (from line `lineno` of `path`) resolved inside the guard's root: the loaders' one path
    confinement (`medvqa.safety`), one guard per load."""
    return guard.resolve(rel, path=path, index=f"line {lineno}", field=key)


def load_scenes(root: str | Path, split: str) -> dict[str, Scene]:
    """Scene records of a split, by image id."""
    from medvqa.io import iter_jsonl

    root = Path(root)
    path = split_file(root, split, "scenes.jsonl")
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
    guard = PathGuard(root)
    out: dict[str, Scene] = {}
    for split in splits or SPLITS:
        path = split_file(root, split, "scenes.jsonl")
        for lineno, record in iter_jsonl(path):
            image = inside(
                guard, record.get("image") if isinstance(record, dict) else None, path, lineno, "image"
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
    path = split_file(root, split, "captions.jsonl")
    guard = PathGuard(root)
    out = []
    for lineno, record in iter_jsonl(path):
        for key in ("image_id", "image", "caption"):
            if not isinstance(record, dict) or key not in record:
                raise BadInput("missing field", path=path, record=f"line {lineno}", field=key)
        image = inside(guard, record["image"], path, lineno, "image")
        out.append({"image_id": record["image_id"], "image": str(image), "caption": record["caption"]})
    return out
