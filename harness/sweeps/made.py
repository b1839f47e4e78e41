"""What a `[[prepare]]` step made: the file or folder its `creates` stands for, and a digest of it.

The jobs that read a step's output (a base model, a judge, a data folder) put that digest in their
keys, so a judge retrained under the same command, or a model replaced by hand, reruns what read
the old one. The digest hashes content, not times, so a copied or moved run keeps its keys.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from medvqa.types import stable_hash

# Files up to this size are hashed whole; larger ones by size + first and last MiB (a 5 GB shard).
FULL_HASH_LIMIT = 256 * 1024 * 1024
_CHUNK = 1 << 20


def made_path(creates: str, run_dir: Path) -> Path | None:
    """The file or folder a step owns: inside the run folder, the folder holding `creates` (what the
    command writes: `models/judge` for `models/judge/checkpoint.json`), or `creates` itself when it
    is a folder or lies directly in the run folder; outside the run folder, `creates` itself."""
    if not creates:
        return None
    path = Path(os.path.abspath(creates))
    run = Path(os.path.abspath(run_dir))
    if path.is_dir() or not inside(path.parent, run):
        return path
    return path.parent


def inside(path: Path, run_dir: Path) -> bool:
    """`path` lies strictly below the run folder (the only place a sweep moves things aside)."""
    return Path(os.path.abspath(run_dir)) in Path(os.path.abspath(path)).parents


def made_digest(path: Path | None) -> str:
    """Digest of a step's output ("" when there is none): each top-level file's content (a model's
    config and weights, a data folder's index files) and every nested file's name and size (an
    image tree is listed, not read). Hidden names (`.locks`, ...) do not count."""
    if path is None or not path.exists():
        return ""
    if path.is_file():
        return _file_digest(path)
    top: dict[str, str] = {}
    nested: dict[str, int] = {}
    for folder, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel_folder = Path(folder).relative_to(path)
        for name in sorted(files):
            if name.startswith("."):
                continue
            file = Path(folder) / name
            if not file.is_file():
                continue
            if rel_folder == Path("."):
                top[name] = _file_digest(file)
            else:
                nested[(rel_folder / name).as_posix()] = file.stat().st_size
    return stable_hash({"files": top, "nested": nested})


def _file_digest(path: Path) -> str:
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if size <= FULL_HASH_LIMIT:
            for chunk in iter(lambda: fh.read(_CHUNK), b""):
                h.update(chunk)
        else:
            h.update(fh.read(_CHUNK))
            fh.seek(-_CHUNK, os.SEEK_END)
            h.update(fh.read(_CHUNK))
            h.update(str(size).encode())
    return h.hexdigest()[:16]
