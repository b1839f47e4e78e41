"""What the file-based benchmark loaders share: layouts, record fields, bad-record bookkeeping, parquet.

The security boundary they all go through (path confinement, image checks, the restricted
unpickler) is `medvqa.safety`, kept apart so it can be reviewed alone. A bad record is a
`BadInput` naming file, record and field, or with `skip_bad` it is skipped and listed (`Problems`,
then `Benchmark.skipped`).

Heavy libraries (PIL, datasets) are imported inside the functions that need them, so importing a
benchmark module (e.g. for `medvqa benchmarks`) stays cheap.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from medvqa.errors import BadInput
from medvqa.safety import DEFAULT_MAX_PIXELS, ImageChecker, image_sha256, resolve_inside
from medvqa.types import Benchmark, SkippedRecord, VQASample

YES_NO_RULE = "gold answer is yes/no (no answer_type in this layout)"
DATASET_RULE = "dataset answer_type"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


# --------------------------------------------------------------------------------------------- bases


class FileBenchmark(Benchmark):
    """Base of the benchmarks read from files on disk.

    `load` is written once here: it resolves split aliases (`val` for `validate`, ...), starts a fresh
    `skipped` list and an image checker (`image_check` is the default level), and hands them to the
    subclass's `_load(split, root, problems, checker)`.
    """

    split_aliases: ClassVar[Mapping[str, str]] = {}
    image_check: ClassVar[str] = "verify"

    def load(
        self,
        split: str,
        root: Path,
        *,
        skip_bad: bool = False,
        check_images: str | None = None,
        max_pixels: int | None = None,
    ) -> list[VQASample]:
        problems = Problems(skip_bad)
        self.skipped = problems.skipped
        cap = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
        checker = ImageChecker(check_images or self.image_check, cap)
        return self._load(self.canonical_split(split), Path(root), problems, checker)

    def _load(self, split: str, root: Path, problems: Problems, checker: ImageChecker) -> list[VQASample]:
        raise NotImplementedError

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

    def detect_layout(self, root: Path, split: str = "test") -> str:
        layout, where = self._locate(root)
        if layout == "original":
            return f"original release ({self.original_layout}) at {where}"
        return f"Hugging Face parquet ({self.parquet_layout}) at {where}"

    def _load(self, split: str, root: Path, problems: Problems, checker: ImageChecker) -> list[VQASample]:
        layout, where = self._locate(root)
        load_layout = self._load_original if layout == "original" else self._load_parquet
        return load_layout(split, where, problems, checker)

    def _load_original(
        self, split: str, where: Path, problems: Problems, checker: ImageChecker
    ) -> list[VQASample]:
        raise NotImplementedError

    def _load_parquet(
        self, split: str, where: Path, problems: Problems, checker: ImageChecker
    ) -> list[VQASample]:
        raise NotImplementedError


# --------------------------------------------------------------------------------------------- problems


class Problems:
    """Bad records: raise the first one, or — with `skip_bad` — record it and go on."""

    def __init__(self, skip_bad: bool):
        self.skip_bad = skip_bad
        self.skipped: list[SkippedRecord] = []

    def bad(self, exc: BadInput) -> None:
        if not self.skip_bad:
            raise exc
        self.skipped.append(SkippedRecord.from_error(exc))


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
    """Hugging Face parquet shards of a split: `data/{split}-*.parquet` (or `{split}-*.parquet`), or the
    split's folder of a `datasets.save_to_disk` export (`read_parquet_rows` reads both)."""
    from medvqa.benchmarks.hub import is_save_to_disk_dict, save_to_disk_splits

    if is_save_to_disk_dict(root):
        return save_to_disk_splits(root, split_names)
    out: list[Path] = []
    for folder in (root / "data", root):
        for name in split_names:
            out += sorted(folder.glob(f"{name}-*.parquet")) + sorted(folder.glob(f"{name}.parquet"))
        if out:
            return out
    return out


def has_parquet(root: Path) -> bool:
    """A Hugging Face release here: parquet shards, or a `DatasetDict.save_to_disk` folder."""
    from medvqa.benchmarks.hub import is_save_to_disk_dict

    return any((root / "data").glob("*.parquet")) or any(root.glob("*.parquet")) or is_save_to_disk_dict(root)


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
    if isinstance(value, float) and not math.isfinite(value):
        # pandas writes a missing cell as NaN: it must not become the text "nan"
        raise BadInput(f"missing value ({value!r})", path=path, record=index, field=field)
    if isinstance(value, int):
        if value.bit_length() > 1000:  # str() of an int over 4,300 digits raises; no answer is that long
            raise BadInput("number too large to be text", path=path, record=index, field=field)
        value = str(value)
    elif isinstance(value, float):
        value = str(int(value)) if value.is_integer() else repr(value)
    if not isinstance(value, str):
        raise BadInput(f"expected text, got {type(value).__name__}", path=path, record=index, field=field)
    value = value.strip()
    if not value:
        raise BadInput("empty text", path=path, record=index, field=field)
    if not is_unicode(value):
        raise BadInput("text is not valid Unicode (a lone surrogate)", path=path, record=index, field=field)
    return value


def plain_meta(meta: Mapping[Any, Any]) -> dict[str, Any]:
    """The metadata values that can be written back as JSON: valid text, finite numbers, booleans, None.

    Metadata rides along with a sample (into predictions and scored rows) but is never scored, so a
    hostile value — NaN, a lone surrogate, a nested container, a 5,000-digit number — is dropped
    rather than left to break a file written later.
    """

    def plain(value: Any) -> bool:
        if value is None or isinstance(value, bool):
            return True
        if isinstance(value, int):
            return value.bit_length() <= 63
        if isinstance(value, float):
            return math.isfinite(value)
        return isinstance(value, str) and is_unicode(value)

    return {k: v for k, v in meta.items() if isinstance(k, str) and is_unicode(k) and plain(v)}


def is_unicode(text: str) -> bool:
    """False for a string holding a lone surrogate (JSON allows `\\ud800`): it could not be written back."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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


# --------------------------------------------------------------------------------------------- parquet


def read_parquet_rows(
    files: Iterable[Path], columns: Sequence[str]
) -> Iterator[tuple[Path, int, dict[str, Any]]]:
    """(file, row index within the file, row) for each row of the shards (parquet files or save_to_disk
    split folders), read by `datasets` itself with images undecoded; missing columns name the file."""
    from medvqa.benchmarks.hub import dataset_rows

    return dataset_rows(files, columns)


def parquet_image(
    value: Any, *, root: Path, path: Path, index: object, field: str = "image"
) -> tuple[bytes | Path, str]:
    """(bytes or a safe path, image id) from a Hugging Face `Image` cell: {bytes, path}, bytes or a path."""
    if isinstance(value, Mapping):
        data, name = value.get("bytes"), value.get("path")
        if data:
            image_id = str(name) if isinstance(name, str) and name else image_sha256(data)[:16]
            return bytes(data), image_id
        if isinstance(name, str) and name:
            return resolve_inside(root, name, path=path, index=index, field=f"{field}.path"), name
        raise BadInput("image cell has neither bytes nor path", path=path, record=index, field=field)
    if isinstance(value, bytes | bytearray) and value:
        return bytes(value), image_sha256(bytes(value))[:16]
    if isinstance(value, str) and value:
        return resolve_inside(root, value, path=path, index=index, field=field), value
    raise BadInput(
        f"unreadable image cell of type {type(value).__name__}", path=path, record=index, field=field
    )


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

    `make_benchmark("slake", {"lang": "zh"})` is `Slake(lang="zh")`. A benchmark without options
    accepts none (a BadInput lists what it accepts).
    """
    from medvqa.registry import benchmarks

    return benchmarks.get(name)(**dict(options or {}))
