"""Benchmark data from where users hold it: the Hugging Face cache, and folders `datasets` wrote.

    resolve_root("hf://datasets/flaviagiammarino/vqa-rad@main")  -> ResolvedRoot(path=<snapshot>, commit=...)
    resolve_root("flaviagiammarino/vqa-rad")                      (a bare hub id, when no such local folder)
    resolve_root("~/data/vqa-rad")                                (a local folder, unchanged)

A hub root is resolved by `huggingface_hub.snapshot_download(..., local_files_only=True)`: the
library's own cache layout and offline rules (`HF_HUB_CACHE`, `HF_HUB_OFFLINE`); nothing is fetched at
run time — a dataset not yet in the cache is a BadInput that says how to get it. The resolved commit
goes into the benchmark version of every score, so two users can tell whether they scored the same
data. The snapshot's files are links into the repo's `blobs/`; path confinement admits exactly those
(`medvqa.safety.confinement_roots`).

`dataset_rows` reads Hugging Face parquet shards (as `datasets.Dataset`s with the features of their
schema metadata) and split folders written by `datasets.save_to_disk` (memory-mapped by
`datasets.load_from_disk`), with image columns left undecoded (`{bytes, path}`: the loaders check and
confine them).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medvqa.errors import BadInput

HF_PREFIX = "hf://"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SAVE_TO_DISK_SPLIT = "state.json"  # beside dataset_info.json and the .arrow shards of one split
SAVE_TO_DISK_DICT = "dataset_dict.json"


@dataclass(frozen=True)
class ResolvedRoot:
    """A data root on disk, and where it came from when it came from the hub."""

    path: Path
    repo_id: str | None = None
    revision: str | None = None  # as asked (a branch, tag or commit); None = the default branch
    commit: str | None = None  # the snapshot's commit hash

    @property
    def version_suffix(self) -> str:
        """What the benchmark version gains: `+hf=<repo>@<commit>` (empty for a local folder)."""
        return f"+hf={self.repo_id}@{self.commit}" if self.repo_id else ""


def parse_hub_root(root: str) -> tuple[str, str | None] | None:
    """(repo id, revision) of `hf://datasets/OWNER/NAME[@REV]` or a bare `OWNER/NAME[@REV]`, else None."""
    text = root.strip()
    if text.startswith(HF_PREFIX):
        text = text[len(HF_PREFIX) :]
        if not text.startswith("datasets/"):
            raise BadInput(
                f"{root!r}: only dataset repos are benchmark data (hf://datasets/OWNER/NAME[@REVISION])",
                field="--root",
            )
        text = text[len("datasets/") :]
        explicit = True
    else:
        explicit = False
    repo, _, revision = text.partition("@")
    if not _REPO_ID.match(repo) or (explicit and "@" in text and not revision):
        if explicit:
            raise BadInput(f"{root!r} is not hf://datasets/OWNER/NAME[@REVISION]", field="--root")
        return None
    return repo, revision or None


def resolve_root(root: str | os.PathLike[str]) -> ResolvedRoot:
    """A local folder as it is; an `hf://` root or a bare hub id through the local Hugging Face cache."""
    text = str(root)
    local = Path(text).expanduser()
    if not text.startswith(HF_PREFIX) and (local.exists() or parse_hub_root(text) is None):
        return ResolvedRoot(path=local)
    parsed = parse_hub_root(text)
    assert parsed is not None  # an hf:// root that does not parse raised above
    repo_id, revision = parsed
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(repo_id, repo_type="dataset", revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError) as exc:
        how = f"hf download {repo_id} --repo-type dataset" + (f" --revision {revision}" if revision else "")
        raise BadInput(
            f"{text!r} is neither a local folder nor a dataset in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}); fetch it once where there is network: `{how}` "
            f"({type(exc).__name__})",
            field="--root",
        ) from None
    return ResolvedRoot(path=path, repo_id=repo_id, revision=revision, commit=path.name)


def hub_root_uri(path: Path) -> str | None:
    """`hf://datasets/OWNER/NAME@COMMIT[/SUB]` for a folder inside a hub cache snapshot, else None.

    What a score records as its data root: the same for every user, unlike the cache's local path.
    (Hub repo names never hold "--", so the cache folder name `datasets--OWNER--NAME` is unambiguous.)
    """
    path = Path(path).absolute()
    for folder in (path, *path.parents):
        repo = folder.parent.parent
        if folder.parent.name == "snapshots" and repo.name.startswith("datasets--"):
            owner_name = repo.name[len("datasets--") :].replace("--", "/", 1)
            sub = path.relative_to(folder).as_posix()
            return f"{HF_PREFIX}datasets/{owner_name}@{folder.name}" + ("" if sub == "." else f"/{sub}")
    return None


def cli_root(text: str) -> Path:
    """`--root` for argparse (`type=cli_root`): a folder, or a hub dataset from the local cache.

    A dataset not in the cache is argparse's usage error (one line, exit 2), never a traceback.
    """
    import argparse

    try:
        return resolve_root(text).path
    except BadInput as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# --- rows through `datasets` ------------------------------------------------------------------


def is_save_to_disk_dict(root: Path) -> bool:
    return (root / SAVE_TO_DISK_DICT).is_file()


def save_to_disk_splits(root: Path, split_names: Sequence[str]) -> list[Path]:
    """The split folders of a `DatasetDict.save_to_disk` folder, for the first of `split_names` it has."""
    for name in split_names:
        if (root / name / SAVE_TO_DISK_SPLIT).is_file():
            return [root / name]
    return []


def _open(source: Path) -> Any:
    """A `datasets.Dataset` over one parquet shard or one save_to_disk split folder.

    A parquet shard becomes a `Dataset` over its Arrow table, with the features its Hugging Face schema
    metadata declares (`Image` columns included). Not `load_dataset("parquet", ...)`: its builder copies
    the shard into the datasets cache first, and its streaming mode imports torch, which commands that
    run no model never do.
    """
    import datasets

    try:
        if source.is_dir():
            return datasets.load_from_disk(str(source))
        import pyarrow.parquet as pq

        # a fingerprint from the file's identity: datasets would otherwise hash the whole table
        stat = source.stat()
        fingerprint = hashlib.sha256(
            f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()
        ).hexdigest()
        return datasets.Dataset(pq.read_table(source, memory_map=True), fingerprint=fingerprint[:16])
    except Exception as exc:  # datasets and pyarrow raise their own types for malformed files
        what = "save_to_disk folder" if source.is_dir() else "parquet file"
        raise BadInput(f"not a readable {what} ({type(exc).__name__}: {exc})", path=source) from None


def dataset_rows(
    sources: Iterable[Path], columns: Sequence[str]
) -> Iterator[tuple[Path, int, dict[str, Any]]]:
    """(source, row index within it, row) for each row; a missing column is a BadInput naming the source."""
    import datasets

    for source in sources:
        ds = _open(source)
        names = list(ds.features or {})
        missing = [c for c in columns if c not in names]
        if missing:
            what = "save_to_disk folder" if source.is_dir() else "parquet file"
            raise BadInput(f"{what} lacks column(s) {missing}; has {names}", path=source, field=missing[0])
        ds = ds.select_columns(list(columns))
        for name, feature in dict(ds.features).items():
            if isinstance(feature, datasets.Image):
                ds = ds.cast_column(name, datasets.Image(decode=False))
        try:
            i = 0
            for batch in ds.iter(batch_size=1024):  # ~10x faster than row by row
                for values in zip(*batch.values()):
                    yield source, i, dict(zip(batch, values))
                    i += 1
        except Exception as exc:  # a shard that breaks mid-way
            raise BadInput(f"unreadable rows ({type(exc).__name__}: {exc})", path=source) from None
