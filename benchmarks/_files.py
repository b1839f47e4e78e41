"""What the file-based benchmark loaders share: layouts, safe paths, image checks, safe pickles, parquet.

Everything here treats the data as untrusted input that came from the internet:

- image paths taken from a JSON/pickle record stay inside the data root (`resolve_inside`):
  absolute paths, `..` components and symlinks that lead out of the root are refused;
- images are checked to exist and to be decodable (`ImageChecker`, cached per image);
- PathVQA pickles are read with `safe_load_pickle`, a restricted unpickler that admits only plain
  containers and scalars and refuses — without executing it — any pickle that names a callable;
- a bad record is a `BadInput` naming file, record and field, or with `skip_bad` it is skipped and
  counted (`Problems`).

Heavy libraries (PIL, pyarrow) are imported inside the functions that need them, so importing a
benchmark module (e.g. for `medvqa benchmarks`) stays cheap.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import pickle
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, ClassVar

from medvqa.errors import BadInput
from medvqa.types import Benchmark, VQASample

YES_NO_RULE = "gold answer is yes/no (no answer_type in this layout)"
DATASET_RULE = "dataset answer_type"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


# --------------------------------------------------------------------------------------------- options


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """This benchmark takes no options."""


class FileBenchmark(Benchmark):
    """Base of the benchmarks read from files on disk.

    Options: each subclass declares an `Options` dataclass (one field per option, with its default and
    `metadata={"help": ...}`); `Benchmark(**options)` validates them, e.g. `Slake(lang="zh")`.
    After `load`, `self.skipped` lists the messages of the records skipped under `skip_bad=True`.
    A non-default option is part of `version`, so predictions cached for one setting are never
    served for another.
    """

    Options: ClassVar[type] = NoOptions
    base_version: ClassVar[str] = "1"
    split_aliases: ClassVar[Mapping[str, str]] = {}

    def __init__(self, **options: Any):
        self.options = make_options(self.Options, options, owner=self.name)
        changed = {
            f.name: getattr(self.options, f.name)
            for f in dataclasses.fields(self.options)
            if getattr(self.options, f.name) != f.default
        }
        suffix = "".join(f"+{k}={v}" for k, v in sorted(changed.items()))
        self.version = f"{self.base_version}{suffix}"
        self.skipped: list[str] = []

    def canonical_split(self, split: str) -> str:
        split = self.split_aliases.get(split, split)
        if split not in self.splits:
            raise BadInput(f"{self.name} has no split {split!r}; splits: {', '.join(self.splits)}")
        return split


class OriginalOrParquetBenchmark(FileBenchmark):
    """A benchmark shipped both as its original release and as a Hugging Face parquet export.

    Subclasses say how to recognise the original release (`_is_original(folder)`), describe both
    layouts (`original_layout`, `parquet_layout`, shown by `detect_layout` and in the error when
    neither is found), and implement one loader per layout.
    """

    original_layout: ClassVar[str] = ""
    parquet_layout: ClassVar[str] = ""

    @staticmethod
    def _is_original(folder: Path) -> bool:
        raise NotImplementedError

    def _locate(self, root: Path) -> tuple[str, Path]:
        """("original" | "hf-parquet", the folder that holds that layout) under `root`."""
        root = Path(root)
        found = find_root(root, self._is_original)
        if found is not None:
            return "original", found
        found = find_root(root, has_parquet)
        if found is not None:
            return "hf-parquet", found
        raise no_layout(
            self.name,
            root,
            [f"{self.original_layout} (original release)", f"{self.parquet_layout} (Hugging Face)"],
        )

    def detect_layout(self, root: Path) -> str:
        layout, where = self._locate(root)
        if layout == "original":
            return f"original release ({self.original_layout}) at {where}"
        return f"Hugging Face parquet ({self.parquet_layout}) at {where}"

    def load(
        self, split: str, root: Path, *, skip_bad: bool = False, check_images: str = "verify"
    ) -> list[VQASample]:
        split = self.canonical_split(split)
        layout, where = self._locate(root)
        problems = Problems(skip_bad)
        checker = ImageChecker(check_images)
        load_layout = self._load_original if layout == "original" else self._load_parquet
        samples = load_layout(split, where, problems, checker)
        self.skipped = problems.skipped
        return samples

    def _load_original(
        self, split: str, where: Path, problems: Problems, checker: ImageChecker
    ) -> list[VQASample]:
        raise NotImplementedError

    def _load_parquet(
        self, split: str, where: Path, problems: Problems, checker: ImageChecker
    ) -> list[VQASample]:
        raise NotImplementedError


def option_fields(cls: type) -> list[tuple[str, Any, Any, str]]:
    """(name, type, default, help) for each field of an options dataclass."""
    hints = typing.get_type_hints(cls)
    return [(f.name, hints[f.name], f.default, f.metadata.get("help", "")) for f in dataclasses.fields(cls)]


def make_options(cls: type, given: Mapping[str, Any], *, owner: str) -> Any:
    """An options dataclass from keyword values (strings from a CLI are converted), checked."""
    fields = {name: (tp, default) for name, tp, default, _ in option_fields(cls)}
    unknown = sorted(set(given) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields)) or "none"
        raise BadInput(f"benchmark {owner!r} has no option(s) {unknown}; its options: {known}")
    values = {}
    for key, value in given.items():
        tp, _ = fields[key]
        if typing.get_origin(tp) is typing.Literal:
            choices = typing.get_args(tp)
            if value not in choices:
                raise BadInput(
                    f"benchmark {owner!r}: option {key!r} must be one of {list(choices)}, got {value!r}"
                )
        elif tp is bool and isinstance(value, str):
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise BadInput(f"benchmark {owner!r}: option {key!r} must be true or false, got {value!r}")
            value = value.lower() in ("1", "true", "yes")
        elif tp in (int, float) and isinstance(value, str):
            try:
                value = tp(value)
            except ValueError:
                raise BadInput(
                    f"benchmark {owner!r}: option {key!r} must be {tp.__name__}, got {value!r}"
                ) from None
        values[key] = value
    return cls(**values)


# --------------------------------------------------------------------------------------------- problems


class Problems:
    """Bad records: raise the first one, or — with `skip_bad` — keep its message and go on."""

    def __init__(self, skip_bad: bool):
        self.skip_bad = skip_bad
        self.skipped: list[str] = []

    def bad(self, exc: BadInput) -> None:
        if not self.skip_bad:
            raise exc
        self.skipped.append(str(exc))


class Duplicates:
    """Question ids seen so far; a repeated id is a BadInput naming both records."""

    def __init__(self, path: Path):
        self.path = path
        self.seen: dict[str, object] = {}

    def check(self, qid: str, record: object, field: str = "qid") -> None:
        if qid in self.seen:
            raise BadInput(
                f"duplicate question id {qid!r} (first seen at record {self.seen[qid]})",
                path=self.path,
                record=record,
                field=field,
            )
        self.seen[qid] = record


# --------------------------------------------------------------------------------------------- layouts


def no_layout(benchmark: str, root: Path, expected: Sequence[str]) -> BadInput:
    """The error for a root that holds none of a benchmark's layouts: what was expected, what is there."""
    if not root.exists():
        return BadInput(f"data root does not exist (benchmark {benchmark})", path=root)
    if not root.is_dir():
        return BadInput(f"data root is not a folder (benchmark {benchmark})", path=root)
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    shown = ", ".join(found[:8]) + (", ..." if len(found) > 8 else "") if found else "(empty folder)"
    lines = "; ".join(expected)
    return BadInput(f"no known {benchmark} layout here; expected one of: {lines}; found: {shown}", path=root)


def candidate_roots(root: Path) -> list[Path]:
    """The root itself, then its sub-folders (a user may point at the parent of the data folder)."""
    root = Path(root)
    out = [root]
    if root.is_dir():
        out += sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    return out


def find_root(root: Path, test: Callable[[Path], bool]) -> Path | None:
    """The first of `candidate_roots(root)` that passes `test`, or None."""
    for cand in candidate_roots(root):
        if test(cand):
            return cand
    return None


def parquet_files(root: Path, split_names: Sequence[str]) -> list[Path]:
    """Hugging Face parquet shards of a split: `data/{split}-*.parquet` (or `{split}-*.parquet`)."""
    out: list[Path] = []
    for folder in (root / "data", root):
        for name in split_names:
            out += sorted(folder.glob(f"{name}-*.parquet")) + sorted(folder.glob(f"{name}.parquet"))
        if out:
            return out
    return out


def has_parquet(root: Path) -> bool:
    return any((root / "data").glob("*.parquet")) or any(root.glob("*.parquet"))


# --------------------------------------------------------------------------------------------- fields


def require(record: Any, field: str, *, path: Path, index: object) -> Any:
    if not isinstance(record, Mapping):
        raise BadInput(f"expected an object, got {type(record).__name__}", path=path, record=index)
    if field not in record or record[field] is None:
        raise BadInput("missing field", path=path, record=index, field=field)
    return record[field]


def text_field(record: Any, field: str, *, path: Path, index: object) -> str:
    """A non-empty string field (numbers, e.g. VQA-RAD's numeric answers, become their text)."""
    value = require(record, field, path=path, index=index)
    if isinstance(value, bool):
        raise BadInput(f"expected text, got {value!r}", path=path, record=index, field=field)
    if isinstance(value, int):
        value = str(value)
    elif isinstance(value, float):
        value = str(int(value)) if value.is_integer() else repr(value)
    if not isinstance(value, str):
        raise BadInput(f"expected text, got {type(value).__name__}", path=path, record=index, field=field)
    value = value.strip()
    if not value:
        raise BadInput("empty text", path=path, record=index, field=field)
    return value


def answer_type_field(record: Any, field: str = "answer_type", *, path: Path, index: object) -> str:
    """OPEN or CLOSED, tolerating stray case and spaces ("closed ", " Open")."""
    value = require(record, field, path=path, index=index)
    norm = str(value).strip().upper()
    if norm not in ("OPEN", "CLOSED"):
        raise BadInput(
            f"unknown answer type {value!r} (expected OPEN or CLOSED)", path=path, record=index, field=field
        )
    return norm


def is_yes_no(answer: str) -> bool:
    return answer.strip().strip(".!").strip().lower() in ("yes", "no")


def yes_no_type(answer: str) -> str:
    return "CLOSED" if is_yes_no(answer) else "OPEN"


# --------------------------------------------------------------------------------------------- paths


def resolve_inside(
    root: Path, relative: Any, *, base: Path | None = None, path: Path, index: object, field: str
) -> Path:
    """`base / relative`, refused unless it stays inside `root` (absolute, `..`, escaping symlinks).

    Returns the resolved path (symlinks followed), which is then known to be inside the root.
    """
    if not isinstance(relative, str) or not relative.strip():
        raise BadInput("image path must be non-empty text", path=path, record=index, field=field)
    rel = relative.strip()
    if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute() or PureWindowsPath(rel).drive:
        raise BadInput(
            f"absolute image path {rel!r} refused (paths must stay inside the data root)",
            path=path,
            record=index,
            field=field,
        )
    parts = PurePosixPath(rel.replace("\\", "/")).parts
    if ".." in parts:
        raise BadInput(
            f"image path {rel!r} with '..' refused (paths must stay inside the data root)",
            path=path,
            record=index,
            field=field,
        )
    real_root = Path(root).resolve()
    full = (Path(base) if base is not None else Path(root)).joinpath(*parts)
    real = full.resolve()
    if not real.is_relative_to(real_root):
        raise BadInput(
            f"image path {rel!r} leads outside the data root through a symlink (to {real}); refused",
            path=path,
            record=index,
            field=field,
        )
    return real


# --------------------------------------------------------------------------------------------- images


IMAGE_CHECKS = ("exists", "verify", "decode")


class ImageChecker:
    """Checks each image once (questions share images), at one of three levels.

    `exists`: the file is there; `verify` (the loaders' default): PIL parses the file's structure
    (cheap: PNG chunk CRCs, JPEG headers — no pixel decoding); `decode`: every pixel is decoded, which
    also catches truncated JPEGs (`medvqa data inspect --decode`).
    """

    def __init__(self, level: str = "verify"):
        if level not in IMAGE_CHECKS:
            raise BadInput(f"image check must be one of {list(IMAGE_CHECKS)}, got {level!r}")
        self.level = level
        self._cache: dict[object, str | None] = {}

    def problem(self, image: Path | bytes) -> str | None:
        """None if the image is fine, else what is wrong with it."""
        key: object = hashlib.sha256(image).digest() if isinstance(image, bytes) else image
        if key not in self._cache:
            self._cache[key] = self._check(image)
        return self._cache[key]

    def _check(self, image: Path | bytes) -> str | None:
        if isinstance(image, Path):
            if not image.exists():
                return "image not found"
            if not image.is_file():
                return "image path is not a file"
        if self.level == "exists":
            return None
        from PIL import Image, UnidentifiedImageError

        try:
            src = io.BytesIO(image) if isinstance(image, bytes) else image
            with Image.open(src) as im:
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

    def check(self, image: Path | bytes, *, path: Path, index: object, field: str) -> None:
        what = self.problem(image)
        if what is not None:
            shown = f" {image}" if isinstance(image, Path) else ""
            raise BadInput(f"{what}{shown}", path=path, record=index, field=field)


def image_sha256(image: str | bytes | Path) -> str:
    """Content hash of an image (bytes, or the file's bytes)."""
    if isinstance(image, bytes):
        return hashlib.sha256(image).hexdigest()
    h = hashlib.sha256()
    with open(image, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- pickles

_PLAIN = (dict, list, tuple, set, frozenset, str, bytes, bytearray, int, float, complex, bool, type(None))


class _Refused(Exception):
    pass


class _PlainUnpickler(pickle.Unpickler):
    """Builds only what pickle opcodes build without a lookup: containers, strings, numbers."""

    def find_class(self, module: str, name: str) -> Any:
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused(f"persistent id {pid!r}")


def safe_load_pickle(path: Path) -> Any:
    """Unpickle `path` admitting only plain containers and scalars.

    A pickle that references any global (a class, a function, `os.system`, ...) is refused with a
    BadInput naming it, before anything it names is imported or called.
    """
    path = Path(path)
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        raise BadInput("file not found", path=path) from None
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
    ) as exc:
        raise BadInput(f"not a readable pickle ({type(exc).__name__}: {exc})", path=path) from None
    finally:
        fh.close()
    _check_plain(obj, path)
    return obj


def _check_plain(obj: Any, path: Path) -> None:
    stack = [obj]
    while stack:
        item = stack.pop()
        if not isinstance(item, _PLAIN) or type(item) not in _PLAIN:
            raise BadInput(
                f"pickle holds a {type(item).__name__}; only plain containers and scalars are admitted",
                path=path,
            )
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple | set | frozenset):
            stack.extend(item)


# --------------------------------------------------------------------------------------------- parquet


def read_parquet_rows(
    files: Iterable[Path], columns: Sequence[str]
) -> Iterator[tuple[Path, int, dict[str, Any]]]:
    """(file, row index within the file, row) for each row of the shards; missing columns name the file."""
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        raise BadInput("reading parquet needs pyarrow: pip install pyarrow") from None
    for file in files:
        try:
            table = pq.read_table(file)
        except Exception as exc:  # pyarrow raises its own error types for malformed files
            raise BadInput(f"not a readable parquet file ({type(exc).__name__}: {exc})", path=file) from None
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise BadInput(
                f"parquet file lacks column(s) {missing}; has {table.column_names}",
                path=file,
                field=missing[0],
            )
        for i, row in enumerate(table.select(list(columns)).to_pylist()):
            yield file, i, row


def parquet_image(
    value: Any, *, root: Path, path: Path, index: object, field: str = "image"
) -> tuple[bytes | Path, str]:
    """(bytes or a safe path, image id) from a Hugging Face `Image` cell: {bytes, path}, bytes or a path."""
    if isinstance(value, Mapping):
        data, name = value.get("bytes"), value.get("path")
        if data:
            image_id = str(name) if isinstance(name, str) and name else hashlib.sha256(data).hexdigest()[:16]
            return bytes(data), image_id
        if isinstance(name, str) and name:
            return resolve_inside(root, name, path=path, index=index, field=f"{field}.path"), name
        raise BadInput("image cell has neither bytes nor path", path=path, record=index, field=field)
    if isinstance(value, bytes | bytearray) and value:
        return bytes(value), hashlib.sha256(value).hexdigest()[:16]
    if isinstance(value, str) and value:
        return resolve_inside(root, value, path=path, index=index, field=field), value
    raise BadInput(
        f"unreadable image cell of type {type(value).__name__}", path=path, record=index, field=field
    )


def sample_image_path(image: str | bytes) -> Path | bytes:
    return image if isinstance(image, bytes) else Path(image)


def collect(
    items: Iterable[tuple[Path, object, Any]],
    make: Callable[[Path, object, Any], VQASample | None],
    problems: Problems,
) -> list[VQASample]:
    """Run `make(file, record_index, record)` over the records; a BadInput is raised or, skipped, counted."""
    out = []
    for file, index, record in items:
        try:
            sample = make(file, index, record)
        except BadInput as exc:
            problems.bad(exc)
            continue
        if sample is not None:
            out.append(sample)
    return out


def parse_options(items: Iterable[str], *, flag: str = "--option") -> dict[str, str]:
    """`["lang=zh", ...]` → `{"lang": "zh"}` (values stay strings; `make_benchmark` converts them)."""
    options: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BadInput(f"{flag} expects KEY=VALUE, got {item!r}")
        options[key.strip()] = value
    return options


def make_benchmark(name: str, options: Mapping[str, Any] | None = None) -> Benchmark:
    """The registered benchmark `name`, built with its options (strings from a CLI are converted).

    `make_benchmark("slake", {"lang": "zh"})` is `Slake(lang="zh")`. A benchmark without an options
    dataclass accepts no options (a BadInput lists what it accepts).
    """
    from medvqa.registry import benchmarks

    cls = benchmarks.get(name)
    options = dict(options or {})
    if not options:
        return cls()
    if getattr(cls, "Options", None) is None:
        raise BadInput(f"benchmark {name!r} takes no options, got {sorted(options)}")
    return cls(**options)
