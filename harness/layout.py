"""The names inside a run folder (DESIGN.md, "Runs and reproducibility"), defined once.

The sweep writes `<run>/<label>/f<fraction>/s<seed>/...` and the report walks the same tree, so
both read the folder names and the reserved top-level names from here: a trainer label that the
report would skip (`models`, `data`, ...) is refused when the sweep config is loaded, instead of
training for an hour and vanishing from the table.
"""

from __future__ import annotations

import re

from medvqa.errors import BadInput

# Top-level folders of a run that are not trainer labels (set-up output, references, the report,
# the STLLaVA-Med stage cache the demo keeps at `{out}/stage-cache`).
RESERVED_NAMES = frozenset({"reference", "report", "base", "data", "models", "logs", "stage-cache"})
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def fraction_dirname(fraction: float) -> str:
    """`f0.09`, `f0.25`, `f1.0`: the folder name of a fraction in a sweep."""
    return f"f{float(fraction)!r}"


def seed_dirname(seed: int) -> str:
    """`s0`, `s1`: the folder name of a seed in a sweep."""
    return f"s{int(seed)}"


_FRACTION_DIR = re.compile(r"f(\d+(?:\.\d+)?)")  # also hand-made names: f1, f0.50
_SEED_DIR = re.compile(r"s(-?\d+)")


def parse_fraction_dirname(name: str) -> float | None:
    """The fraction a folder name stands for (the inverse of `fraction_dirname`, which writes
    5e-05 as `f5e-05`), else None: the report reads back every name the sweep writes."""
    m = _FRACTION_DIR.fullmatch(name)
    if m:
        return float(m.group(1))
    try:
        value = float(name[1:]) if name.startswith("f") else None
    except ValueError:
        return None
    return value if value is not None and fraction_dirname(value) == name and 0 < value <= 1 else None


def parse_seed_dirname(name: str) -> int | None:
    """The seed a folder name stands for (the inverse of `seed_dirname`), else None."""
    m = _SEED_DIR.fullmatch(name)
    return int(m.group(1)) if m else None


STALE_MARK = ".stale-"


def stale_name(name: str, key: str) -> str:
    """Where a sweep moves output made by other settings: `<name>.stale-<key>` beside it (kept, never read)."""
    return f"{name}{STALE_MARK}{key}"


def is_stale(name: str) -> bool:
    """A folder a sweep moved aside (`stale_name`): not a result, whatever it holds."""
    return STALE_MARK in name


def is_reserved(name: str) -> bool:
    """A top-level run folder the report does not read as a trainer line."""
    return name in RESERVED_NAMES or name.startswith((".", "_"))


def check_folder_name(name: object, what: str, *, top_level: bool = False) -> str:
    """`name` if it is one safe path component (no separator, no `..`, not absolute, not hidden);
    `top_level` also refuses the reserved run-folder names. Else BadInput naming `what`."""
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or name in (".", ".."):
        raise BadInput(
            f"{what} {name!r} cannot be a folder name: use letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if top_level and is_reserved(name):
        raise BadInput(
            f"{what} {name!r} is a reserved run-folder name ({', '.join(sorted(RESERVED_NAMES))}); choose another"
        )
    return name
