"""The security boundary of the loaders, in one module so it can be reviewed alone.

Benchmark files come from the internet and are treated as hostile:

- an image path taken from a record stays inside the data root (`resolve_inside`): absolute paths,
  `..` components, NUL bytes, over-long names, symlink loops and symlinks that lead out of the root
  are refused with a BadInput naming file, record and field — never a traceback;
- an image is checked to exist and to parse (`ImageChecker`, once per image), and an image larger
  than the harness's pixel cap (`DEFAULT_MAX_PIXELS`, configurable) is refused before anything
  decodes it: Pillow's own bomb limit (~179 Mpx) lets a few-hundred-KB PNG of 11000×11000 through,
  which then takes gigabytes to decode (the cap reads only the header, at every check level);
- a pickle (PathVQA) is read by `safe_load_pickle`: a restricted unpickler that builds only plain
  containers and scalars and refuses, without executing it, any pickle that names a callable; the
  result is then walked in bounded time (cycles and oversized graphs are refused, so a
  self-containing list or 60 levels of `x = [x, x]` cannot hang a loader).

Nothing here imports PIL at module level: listing benchmarks stays cheap.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import stat
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from medvqa.errors import BadInput

# --------------------------------------------------------------------------------------------- paths


def resolve_inside(
    root: Path, relative: Any, *, base: Path | None = None, path: Path, index: object, field: str
) -> Path:
    """`base / relative`, refused unless it stays inside `root` (absolute, `..`, escaping symlinks).

    Returns the resolved path (symlinks followed), which is then known to be inside the root. The one
    path confinement of the tree: every loader, and anything else that follows a path named in a
    file, goes through it (a loader reading many paths under one root uses one `PathGuard`).
    """
    return PathGuard(root).resolve(relative, base=base, path=path, index=index, field=field)


class PathGuard:
    """`resolve_inside` for the many paths of one load under one root, paying each resolution once.

    The checks are `resolve_inside`'s, unchanged; what is shared is the work: the root and its
    confinement roots are resolved once, each folder once (8,000 Phantom questions live in a few
    folders), and a path already admitted is not resolved again (four questions share an image).
    The file's own name is still looked at for every new path: a symlink there is followed and
    judged like any other. Resolving a folder once is what `Path.resolve` of each file did
    component by component (`os.path.realpath`), so a link anywhere on the way is caught the same.
    One guard per load: the files are read as they stand at that moment (as `ImageChecker` checks
    each image once); a later load takes a new guard and sees any change.
    """

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self._real_root: Path | None = None
        self._allowed: tuple[Path, ...] = ()
        self._folders: dict[Path, Path] = {}
        self._admitted: dict[tuple[str, str], Path] = {}

    def resolve(
        self, relative: Any, *, base: Path | None = None, path: Path, index: object, field: str
    ) -> Path:
        """`base / relative` (base defaults to the root), as `resolve_inside` admits or refuses it."""
        key = (str(base) if base is not None else "", relative) if isinstance(relative, str) else None
        if key is not None and key in self._admitted:
            return self._admitted[key]

        def refuse(message: str) -> BadInput:
            return BadInput(message, path=path, record=index, field=field)

        rel, parts = _relative_parts(relative, refuse)
        try:
            real_root = self._resolved_root()
            full = (Path(base) if base is not None else self.root).joinpath(*parts)
            in_snapshot = self._folder(full.parent) / full.name  # the file's own name, its folders resolved
            real = in_snapshot.resolve() if _is_symlink(in_snapshot) else in_snapshot
        except RuntimeError:  # Python 3.11 reports a symlink loop this way
            raise refuse(f"image path {rel!r} is a symlink loop; refused") from None
        except (OSError, ValueError) as exc:
            raise refuse(f"image path {rel!r} cannot be resolved ({type(exc).__name__}: {exc})") from None
        if real.is_relative_to(real_root):
            found = real
        elif not any(real.is_relative_to(folder) for folder in self._allowed):
            raise refuse(
                f"image path {rel!r} leads outside the data root through a symlink (to {real}); refused"
            )
        elif in_snapshot.is_relative_to(real_root):
            # a hub snapshot's file (a link into blobs/): keep its path and name inside the snapshot, which
            # image ids, seeds and suffixes are made from (a blob's name is a hash)
            found = in_snapshot
        else:
            found = real
        if key is not None:
            self._admitted[key] = found
        return found

    def _resolved_root(self) -> Path:
        if self._real_root is None:
            real_root = self.root.resolve()
            self._allowed = confinement_roots(real_root)
            self._real_root = real_root
        return self._real_root

    def _folder(self, folder: Path) -> Path:
        """`folder.resolve()`, once per folder (a failure is not kept: it is raised again)."""
        if folder not in self._folders:
            self._folders[folder] = folder.resolve()
        return self._folders[folder]


def _relative_parts(relative: Any, refuse: Callable[[str], BadInput]) -> tuple[str, tuple[str, ...]]:
    """The stripped text and its parts, refused if it could name anything outside its base by itself:
    empty, NUL, not encodable, absolute (POSIX or Windows, a drive), `..`, an over-long name."""
    if not isinstance(relative, str) or not relative.strip():
        raise refuse("image path must be non-empty text")
    rel = relative.strip()
    if "\x00" in rel:
        raise refuse(f"image path {rel[:80]!r} holds a NUL byte; refused")
    try:
        os.fsencode(rel)
    except UnicodeEncodeError:
        raise refuse(f"image path {rel[:80]!r} is not valid text for a file name; refused") from None
    windows = PureWindowsPath(rel)
    if PurePosixPath(rel).is_absolute() or windows.is_absolute() or windows.drive:
        raise refuse(f"absolute image path {rel!r} refused (paths must stay inside the data root)")
    parts = PurePosixPath(rel.replace("\\", "/")).parts
    if ".." in parts:
        raise refuse(f"image path {rel!r} with '..' refused (paths must stay inside the data root)")
    too_long = next((p for p in parts if len(os.fsencode(p)) > 255), None)
    if too_long is not None or len(os.fsencode(rel)) > 4096:
        raise refuse(f"image path {rel[:60]!r}... is too long ({len(rel)} characters); refused")
    return rel, parts


def _is_symlink(path: Path) -> bool:
    """Whether `path` itself is a symlink; unreadable counts as not (what `os.path.realpath` does)."""
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return False


def confinement_roots(real_root: Path) -> tuple[Path, ...]:
    """Where a path under the (resolved) data root may lead: the root itself, and — when the root is a
    Hugging Face cache snapshot (`<cache>/datasets--O--N/snapshots/<commit>/...`, `medvqa.benchmarks.hub`)
    — that repo's `blobs/`, which huggingface_hub links every snapshot file to. Nowhere else."""
    for folder in (real_root, *real_root.parents):
        repo = folder.parent.parent
        if folder.parent.name == "snapshots" and repo.name.startswith("datasets--"):
            return (real_root, repo / "blobs")
    return (real_root,)


# --------------------------------------------------------------------------------------------- images


IMAGE_CHECKS = ("exists", "verify", "decode")
# 50 Mpx (about 7000 x 7000): far above every image of the supported benchmarks, far below what a
# decoder may allocate for one sample (an RGB 11000 x 11000 image is 363 MB before any resizing).
DEFAULT_MAX_PIXELS = 50_000_000


def _pixel_problem(size: tuple[int, int], max_pixels: int) -> str | None:
    width, height = size
    if max_pixels and width * height > max_pixels:
        return (
            f"image of {width}x{height} = {width * height:,} pixels exceeds the pixel cap of {max_pixels:,} "
            "(a decompression bomb, or raise the cap with --max-pixels)"
        )
    return None


@contextlib.contextmanager
def _quiet_pillow() -> Iterator[None]:
    """Pillow's own bomb warning is redundant under our cap, and a second stderr line for the CLI."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


class ImageChecker:
    """Checks each image once (questions share images), at one of three levels, under a pixel cap.

    `exists`: the file is there; `verify` (the loaders' default): PIL parses the file's structure
    (cheap: PNG chunk CRCs, JPEG headers — no pixel decoding); `decode`: every pixel is decoded too,
    which also catches truncated JPEGs (`medvqa data inspect --check-images decode`). At every
    level an image whose header declares more than `max_pixels` pixels is refused before anything
    decodes it (`max_pixels=0` lifts the harness's cap).
    """

    def __init__(self, level: str = "verify", max_pixels: int = DEFAULT_MAX_PIXELS):
        if level not in IMAGE_CHECKS:
            raise BadInput(f"image check must be one of {list(IMAGE_CHECKS)}, got {level!r}")
        if not isinstance(max_pixels, int) or isinstance(max_pixels, bool) or max_pixels < 0:
            raise BadInput(f"max_pixels must be an integer >= 0 (0 = no cap), got {max_pixels!r}")
        self.level = level
        self.max_pixels = max_pixels
        self._cache: dict[object, str | None] = {}

    def problem(self, image: Path | bytes) -> str | None:
        """None if the image is fine, else what is wrong with it."""
        key: object = hashlib.sha256(image).digest() if isinstance(image, bytes) else image
        if key not in self._cache:
            self._cache[key] = self._check(image)
        return self._cache[key]

    def _check(self, image: Path | bytes) -> str | None:
        if isinstance(image, Path):
            try:
                if not image.exists():
                    return "image not found"
                if not image.is_file():
                    return "image path is not a file"
            except OSError as exc:  # e.g. ENAMETOOLONG, ELOOP on a path not from resolve_inside
                return f"image path cannot be read ({exc.strerror or exc})"
        from PIL import Image, UnidentifiedImageError

        if self.level == "exists":
            return self._header_problem(image)

        try:
            src = io.BytesIO(image) if isinstance(image, bytes) else image
            with _quiet_pillow(), Image.open(src) as im:
                too_big = _pixel_problem(im.size, self.max_pixels)
                if too_big is not None:
                    return too_big
                if self.level == "decode":
                    im.load()
                else:
                    im.verify()
        except (
            UnidentifiedImageError,
            OSError,
            SyntaxError,
            ValueError,
            Image.DecompressionBombError,
        ) as exc:
            return f"corrupt image ({type(exc).__name__}: {exc})"
        return None

    def _header_problem(self, image: Path | bytes) -> str | None:
        """Only the pixel cap, from the header (`exists` leaves every other problem to the decoder)."""
        if not self.max_pixels:
            return None
        from PIL import Image, UnidentifiedImageError

        try:
            with _quiet_pillow(), Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as im:
                return _pixel_problem(im.size, self.max_pixels)
        except Image.DecompressionBombError as exc:
            return f"corrupt image (DecompressionBombError: {exc})"
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            return None  # not a readable header: not this level's business

    def check(self, image: Path | bytes, *, path: Path, index: object, field: str) -> None:
        what = self.problem(image)
        if what is not None:
            shown = f" {image}" if isinstance(image, Path) else ""
            raise BadInput(f"{what}{shown}", path=path, record=index, field=field)


def image_sha256(image: str | os.PathLike[str] | bytes) -> str:
    """Content hash of an image (bytes, or the file's bytes, streamed): the one image hash of the tree.

    Caches and overlap checks key on content, so a moved data folder still matches. A file that
    cannot be read is a BadInput naming it.
    """
    if isinstance(image, bytes | bytearray | memoryview):
        return hashlib.sha256(image).hexdigest()
    h = hashlib.sha256()
    try:
        with open(image, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    except FileNotFoundError:
        raise BadInput("image file not found", path=image, field="image") from None
    except IsADirectoryError:
        raise BadInput("is a folder, expected an image file", path=image, field="image") from None
    except (OSError, ValueError) as exc:
        raise BadInput(
            f"cannot read image ({type(exc).__name__}: {exc})", path=image, field="image"
        ) from None
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- pickles

_PLAIN = (dict, list, tuple, set, frozenset, str, bytes, bytearray, int, float, complex, bool, type(None))
_CONTAINERS = (dict, list, tuple, set, frozenset)
# Objects the plain-data walk visits at most (each distinct object once): a PathVQA split pickle
# holds well under a million; past this budget a pickle is refused rather than walked for minutes.
MAX_PICKLE_NODES = 20_000_000


class _Refused(Exception):
    pass


class _PlainUnpickler(pickle.Unpickler):
    """Builds only what pickle opcodes build without a lookup: containers, strings, numbers."""

    def find_class(self, module: str, name: str) -> Any:
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused(f"persistent id {pid!r}")


def safe_load_pickle(path: Path, *, max_nodes: int = MAX_PICKLE_NODES) -> Any:
    """Unpickle `path` admitting only plain, acyclic containers and scalars.

    A pickle that references any global (a class, a function, `os.system`, ...) is refused with a
    BadInput naming it, before anything it names is imported or called; so is one whose data holds
    a cycle or more than `max_nodes` objects.
    """
    path = Path(path)
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        raise BadInput("file not found", path=path) from None
    except OSError as exc:
        raise BadInput(f"cannot read file ({exc.strerror or exc})", path=path) from None
    try:
        obj = _PlainUnpickler(fh, encoding="utf-8").load()
    except _Refused as exc:
        raise BadInput(
            f"pickle refused: it references {exc}, and only plain lists/dicts/strings/numbers are "
            "admitted (a pickle that names a callable can run code; it was not executed)",
            path=path,
        ) from None
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        UnicodeDecodeError,
        MemoryError,
        RecursionError,
        OverflowError,
    ) as exc:
        raise BadInput(f"not a readable pickle ({type(exc).__name__}: {exc})", path=path) from None
    finally:
        fh.close()
    _check_plain(obj, path, max_nodes)
    return obj


def _check_plain(obj: Any, path: Path, max_nodes: int = MAX_PICKLE_NODES) -> None:
    """Every object is a plain scalar or container; no cycle; at most `max_nodes` distinct objects.

    Iterative depth-first walk that visits each container once (a shared reference is not walked
    again, so `x = [x, x]` sixty levels deep costs sixty steps, not 2**60) and keeps the containers on
    the current path to detect a cycle (a list that contains itself is not plain data).
    """
    done: set[int] = set()
    on_path: set[int] = set()
    # (object, exiting): exiting=True pops a container off the current path.
    stack: list[tuple[Any, bool]] = [(obj, False)]
    nodes = 0
    while stack:
        item, exiting = stack.pop()
        if exiting:
            on_path.discard(id(item))
            done.add(id(item))
            continue
        nodes += 1
        if nodes > max_nodes:
            raise BadInput(
                f"pickle refused: it holds more than {max_nodes:,} objects (a pickle bomb?)", path=path
            )
        if not isinstance(item, _PLAIN) or type(item) not in _PLAIN:
            raise BadInput(
                f"pickle holds a {type(item).__name__}; only plain containers and scalars are admitted",
                path=path,
            )
        if not isinstance(item, _CONTAINERS):
            continue
        key = id(item)
        if key in on_path:
            raise BadInput(
                f"pickle refused: a {type(item).__name__} contains itself (a cycle is not plain data)",
                path=path,
            )
        if key in done:
            continue
        on_path.add(key)
        stack.append((item, True))
        children = [*item.keys(), *item.values()] if isinstance(item, dict) else list(item)
        stack.extend((child, False) for child in children)
