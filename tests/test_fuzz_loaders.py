"""Seeded fuzzing of the loaders: hostile records and files either load or are one BadInput, fast.

Every case starts from a valid fixture tree (VQA-RAD JSON and parquet, SLAKE, PathVQA pickle and
parquet, LLaVA-Med JSON, Phantom) and mutates it: fields set to hostile values (NaN, huge numbers,
NUL bytes, lone surrogates, escaping or over-long paths, nested containers), fields removed, records
replaced, files truncated or byte-flipped. The invariant: `load` returns well-formed samples (text
question and answer, OPEN/CLOSED, an image inside the root) or raises BadInput; with `skip_bad`
every bad record is listed in `skipped`. Anything else — another exception, a hang — is a failure.

The suite runs a bounded number of cases; a longer run by hand:
`MEDVQA_FUZZ_CASES=3000 pytest tests/test_fuzz_loaders.py -q -s` (prints cases tried / failed).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import shutil
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from medvqa.errors import BadInput
from medvqa.registry import benchmarks
from medvqa.types import VQASample

from tests import real_fixtures as fx

CASES = int(os.environ.get("MEDVQA_FUZZ_CASES", "12"))  # per layout
SECONDS_PER_CASE = 10.0

_TEXTS = [
    "",
    " ",
    "yes",
    "nan",
    "\x00",
    "a\x00b",
    "\ud800",
    "é\u202e",
    "x" * 5000,
    "../secret.jpg",
    "/etc/passwd",
    "C:\\x.jpg",
    "imgs/../../x",
    "..\\..\\x",
    "y" * 300 + ".jpg",
    "xmlab1/source.jpg",
    "synpic1.jpg",
    "test_0000",
    "OPEN",
    "closed ",
    "MAYBE",
    "en",
    "test_freeform",
]


def _hostile(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(10 if depth < 3 else 7)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 2**63, -(2**80), 7])
    if kind == 3:
        return rng.choice([math.nan, math.inf, -math.inf, -0.0, 1e308, 2.5])
    if kind in (4, 5, 6):
        return rng.choice(_TEXTS)
    if kind == 7:
        return [_hostile(rng, depth + 1) for _ in range(rng.randrange(3))]
    if kind == 8:
        return {
            rng.choice(["bytes", "path", "from", "value", "x"]): _hostile(rng, depth + 1) for _ in range(2)
        }
    return b"\x89PNG not really"


def _mutate_records(rng: random.Random, records: list[Any], *, json_safe: bool) -> list[Any]:
    records = [dict(r) if isinstance(r, dict) else r for r in records]
    for _ in range(rng.randrange(1, 4)):
        i = rng.randrange(len(records))
        rec = records[i]
        op = rng.randrange(6)
        if op == 0 or not isinstance(rec, dict):
            records[i] = _hostile(rng)
            continue
        key = rng.choice(sorted(rec))
        if op == 1:
            del rec[key]
        elif op == 2:
            rec[rng.choice(["extra", key + "_", "meta"])] = _hostile(rng)
        else:
            rec[key] = _hostile(rng)
        if not json_safe and rng.random() < 0.2:
            rec[key] = 10**5000
    if rng.random() < 0.1:
        records.append(records[0])  # a duplicate
    return records


def _write_json(path: Path, obj: Any, rng: random.Random) -> None:
    text = json.dumps(obj, ensure_ascii=rng.random() < 0.5, allow_nan=True, default=repr)
    roll = rng.random()
    if roll < 0.08:
        text = text[: rng.randrange(len(text))]  # truncated
    elif roll < 0.12:
        text = "[" * 100_000 + "]" * 100_000  # deep nesting
    elif roll < 0.15:
        text = '[{"answer": ' + "9" * 5000 + "}]"  # an integer over the 4,300-digit limit
    path.write_text(text, encoding="utf-8", errors="surrogatepass")


def _write_pickle(path: Path, obj: Any, rng: random.Random) -> None:
    try:
        data = pickle.dumps(obj, protocol=rng.choice([0, 2, 4, 5]))
    except (ValueError, pickle.PicklingError):
        data = pickle.dumps([])
    if rng.random() < 0.3:
        buf = bytearray(data)
        for _ in range(rng.randrange(1, 4)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        data = bytes(buf)
    if rng.random() < 0.1:
        data = data[: rng.randrange(len(data))]
    path.write_bytes(data)


def _vqa_rad(root: Path, rng: random.Random) -> None:
    fx.make_vqa_rad_original(root)
    _write_json(root / fx.VQA_RAD_JSON, _mutate_records(rng, fx.vqa_rad_records(), json_safe=True), rng)


def _slake(root: Path, rng: random.Random) -> None:
    fx.make_slake(root)
    recs = _mutate_records(rng, fx.slake_records("test"), json_safe=True)
    _write_json(root / "Slake1.0" / "test.json", recs, rng)


def _pathvqa(root: Path, rng: random.Random) -> None:
    fx.make_pathvqa_original(root, splits=("test",))
    recs = _mutate_records(rng, fx.pathvqa_records("test"), json_safe=False)
    _write_pickle(root / "pvqa" / "qas" / "test" / "test_qa.pkl", recs, rng)


def _llava(root: Path, rng: random.Random) -> None:
    fx.make_llava_med(root)
    _write_json(root / "test.json", _mutate_records(rng, fx.llava_med_items(), json_safe=True), rng)


def _parquet(root: Path, rng: random.Random) -> None:
    """A Hugging Face parquet shard with hostile cells (each column keeps one type, as parquet does)."""
    rows = fx.hf_rows([(1, "is it?", "yes"), (2, "what?", "lung"), (3, "how many?", "2")])
    images = [
        {"bytes": None, "path": None},
        {"bytes": None, "path": "../x.png"},
        {"bytes": None, "path": "/etc/passwd"},
        {"bytes": None, "path": "a\x00b.png"},
        {"bytes": None, "path": "z" * 400 + ".png"},
        {"bytes": b"garbage", "path": None},
        {"bytes": b"", "path": "img1.png"},
        {"bytes": fx.bomb_png(9000, 9000), "path": "bomb.png"},
    ]
    for _ in range(rng.randrange(1, 4)):
        row = rows[rng.randrange(len(rows))]
        key = rng.choice(["image", "question", "answer"])
        texts = [t for t in _TEXTS if t != "\ud800"]  # parquet strings are UTF-8: no lone surrogates
        row[key] = rng.choice(images) if key == "image" else rng.choice([None, *texts])
    if rng.random() < 0.3:  # a numeric answer column with missing cells (pandas writes NaN)
        for row in rows:
            row["answer"] = rng.choice([1.0, 2.0, math.nan, math.inf])
    fx.make_parquet(root / "data" / "test-00000-of-00001.parquet", rows)
    if rng.random() < 0.1:
        shard = root / "data" / "test-00000-of-00001.parquet"
        shard.write_bytes(shard.read_bytes()[: rng.randrange(8, 200)])  # truncated


def _phantom(root: Path, rng: random.Random) -> None:
    shutil.copytree(_PHANTOM_TEMPLATE, root)
    path = root / "test" / "samples.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows = _mutate_records(rng, rows, json_safe=True)
    path.write_text("".join(json.dumps(r, allow_nan=True, default=repr) + "\n" for r in rows))


_PHANTOM_TEMPLATE = Path()

LAYOUTS: dict[str, tuple[str, Callable[[Path, random.Random], None]]] = {
    "vqa-rad-json": ("vqa-rad", _vqa_rad),
    "vqa-rad-parquet": ("vqa-rad", _parquet),
    "pathvqa-parquet": ("pathvqa", _parquet),
    "slake": ("slake", _slake),
    "pathvqa-pickle": ("pathvqa", _pathvqa),
    "llava-med-json": ("llava-med-json", _llava),
    "phantom": ("phantom", _phantom),
}


def _well_formed(s: VQASample, root: Path) -> str | None:
    if not (isinstance(s.question, str) and s.question.strip()):
        return f"question {s.question!r}"
    if not (isinstance(s.answer, str) and s.answer.strip()):
        return f"answer {s.answer!r}"
    if s.answer_type not in ("OPEN", "CLOSED"):
        return f"answer_type {s.answer_type!r}"
    if isinstance(s.image, str):
        image = Path(s.image)
        if not (image.is_file() and image.resolve().is_relative_to(root.resolve())):
            return f"image {s.image!r} outside the root or missing"
    elif not isinstance(s.image, bytes):
        return f"image of type {type(s.image).__name__}"
    try:  # what eval writes (predictions, scored rows) must be writable as UTF-8 JSON
        row = {"id": s.id, "question": s.question, "answer": s.answer, "meta": dict(s.meta)}
        json.dumps(row, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        return f"not writable as JSON ({type(exc).__name__}: {exc})"
    return None


def run_cases(layout: str, n: int, seed: int, where: Path) -> tuple[int, list[str]]:
    """(cases tried, failures) for `n` seeded cases of one layout."""
    name, build = LAYOUTS[layout]
    failures: list[str] = []
    for case in range(n):
        rng = random.Random(f"{layout}-{seed}-{case}")
        root = where / f"{layout}-{case}"
        build(root, rng)
        for skip_bad in (False, True):
            bench = benchmarks.get(name)()
            started = time.perf_counter()
            try:
                samples = bench.load("test", root, skip_bad=skip_bad)
            except BadInput as exc:
                message = str(exc)
                if "\n" in message or not message:
                    failures.append(f"{layout} case {case}: BadInput is not one line: {message!r}")
                continue
            except Exception:  # the invariant: nothing but BadInput may escape
                failures.append(f"{layout} case {case} skip_bad={skip_bad}: {traceback.format_exc(limit=3)}")
                continue
            finally:
                if time.perf_counter() - started > SECONDS_PER_CASE:
                    failures.append(f"{layout} case {case}: took {time.perf_counter() - started:.1f} s")
            for s in samples:
                problem = _well_formed(s, root)
                if problem is not None:
                    failures.append(f"{layout} case {case}: sample {s.id!r}: {problem}")
            if not skip_bad and bench.skipped:
                failures.append(f"{layout} case {case}: skipped without skip_bad")
        shutil.rmtree(root, ignore_errors=True)
    return n, failures


@pytest.fixture(scope="module")
def phantom_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medvqa.benchmarks.phantom import PhantomConfig, write_phantom

    global _PHANTOM_TEMPLATE
    _PHANTOM_TEMPLATE = tmp_path_factory.mktemp("fuzz") / "phantom"
    write_phantom(_PHANTOM_TEMPLATE, PhantomConfig(seed=2, train_images=0, test_images=3, size=16))
    return _PHANTOM_TEMPLATE


@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_fuzzed_files_load_or_are_one_bad_input(layout: str, tmp_path: Path, phantom_template: Path) -> None:
    tried, failures = run_cases(layout, CASES, seed=0, where=tmp_path)
    print(f"fuzz {layout}: {tried} cases tried, {len(failures)} failed")
    assert not failures, "\n".join(failures[:5])
