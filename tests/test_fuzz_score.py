"""Seeded fuzzing of `medvqa score` and `medvqa report`: hostile files give exit 0 or one line, exit 2.

Each case mutates a valid GT / answer file (or a run folder's scores.json / checkpoint.json /
scored.jsonl): a field set to a hostile value (NaN, ±Infinity, 5,000-digit integers, deep nesting,
lone surrogates, NUL bytes, 100k-character strings, wrong types), a field or record removed or
duplicated, the file truncated or byte-flipped. The invariant: the command returns 0 with finite
percentages (or null), or 2 with one line naming a file; anything else — a traceback, another exit
code, a NaN printed as a number — fails, and the case is printed so it can be replayed.

A longer run by hand: `MEDVQA_FUZZ_CASES=2000 pytest tests/test_fuzz_score.py -q -s`.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from medvqa.cli import main

DATA = Path(__file__).parent / "data"
N_CASES = int(os.environ.get("MEDVQA_FUZZ_CASES", "60"))

HOSTILE: list[Any] = [
    None,
    True,
    0,
    -1,
    1e308,
    float("nan"),
    float("inf"),
    "",
    " ",
    "\x00",
    "\ud800",
    "yes\ud800no",
    "x" * 100_000,
    [],
    {},
    [[[[["deep"]]]]],
    {"value": 1},
    "CLOSED",
    "OPEN",
    "<script>alert(1)</script>",
    "é" * 10,
]
RAW_HOSTILE = ["9" * 5000, "[" * 50_000 + "]" * 50_000, "NaN", "-Infinity", '"\\ud800"', "1e99999"]


def _dump(obj: Any, rng: random.Random) -> str:
    """JSON text, with a raw hostile token spliced in for one value now and then."""
    text = json.dumps(obj, allow_nan=True)
    if rng.random() < 0.3 and '"__RAW__"' in text:
        text = text.replace('"__RAW__"', rng.choice(RAW_HOSTILE), 1)
    return text


def _mutate_obj(obj: Any, rng: random.Random) -> Any:
    """Set, delete or replace one field somewhere in a nested JSON value."""
    if isinstance(obj, dict) and obj:
        key = rng.choice(list(obj))
        op = rng.random()
        if op < 0.2:
            del obj[key]
        elif op < 0.55 or not isinstance(obj[key], dict | list):
            obj[key] = "__RAW__" if rng.random() < 0.2 else rng.choice(HOSTILE)
        else:
            obj[key] = _mutate_obj(obj[key], rng)
        return obj
    if isinstance(obj, list) and obj:
        i = rng.randrange(len(obj))
        op = rng.random()
        if op < 0.15:
            obj.append(obj[i])  # a duplicate record
        elif op < 0.3:
            del obj[i]
        elif op < 0.45:
            obj[i] = rng.choice(HOSTILE)
        else:
            obj[i] = _mutate_obj(obj[i], rng)
        return obj
    return rng.choice(HOSTILE)


def _mutate_text(text: str, rng: random.Random) -> str:
    op = rng.random()
    if op < 0.5:
        return text[: rng.randrange(len(text) + 1)]
    data = bytearray(text.encode("utf-8"))
    for _ in range(rng.randint(1, 4)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    return (
        data.decode("utf-8", errors="surrogateescape")
        if rng.random() < 0.5
        else bytes(data).decode("latin-1")
    )


def _write_bytes(path: Path, text: str) -> None:
    path.write_bytes(text.encode("utf-8", errors="surrogateescape"))


def _check(rc: int, capsys: pytest.CaptureFixture[str], case: str, files: list[Path]) -> str:
    out, err = capsys.readouterr()
    assert rc in (0, 2), f"{case}: rc {rc}\n{err[-3000:]}"
    assert "Traceback" not in err, f"{case}:\n{err[-3000:]}"
    if rc == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("medvqa: error: "), f"{case}: {err[-2000:]}"
        assert any(str(f) in lines[0] for f in files) or "--" in lines[0], (
            f"{case}: names no file: {lines[0]}"
        )
    return out


def _finite_json(out: str, case: str) -> None:
    result = json.loads(out)
    for scorer, metrics in result["scorers"].items():
        for metric, mv in metrics.items():
            if metric in ("n_open", "n_closed"):
                continue
            v = mv["value"]
            assert v is None or (math.isfinite(v) and 0 <= v <= 100), f"{case}: {scorer}.{metric} = {v}"


def test_fuzz_score_inputs(tmp_path, capsys):
    gt_items = json.loads((DATA / "test.json").read_text())
    pred_rows = [json.loads(line) for line in (DATA / "answers.jsonl").read_text().splitlines()]
    for case in range(N_CASES):
        rng = random.Random(case)
        work = tmp_path / f"c{case}"
        work.mkdir()
        gt, pred = work / "gt.json", work / "pred.jsonl"
        g = json.loads(json.dumps(gt_items))
        p = json.loads(json.dumps(pred_rows))
        target = rng.random()
        if target < 0.45:
            gt_text = _dump(_mutate_obj(g, rng), rng)
            pred_text = "".join(json.dumps(r) + "\n" for r in p)
        elif target < 0.9:
            gt_text = json.dumps(g)
            p = _mutate_obj(p, rng)
            rows = p if isinstance(p, list) else [p]
            pred_text = "".join(_dump(r, rng) + "\n" for r in rows)
        else:
            gt_text = _mutate_text(json.dumps(g), rng)
            pred_text = "".join(json.dumps(r) + "\n" for r in p)
        _write_bytes(gt, gt_text)
        _write_bytes(pred, pred_text)
        args = ["score", "--gt", str(gt), "--pred", str(pred), "--json", "--n-boot", "20"]
        if case % 3 == 0:
            args += ["--out-scored", str(work / "scored.jsonl")]
        rc = main(args)
        out = _check(rc, capsys, f"case {case}", [gt, pred])
        if rc == 0:
            _finite_json(out, f"case {case}")
            if case % 3 == 0:
                json.loads((work / "scored.jsonl").read_text(encoding="utf-8").splitlines()[0])
        shutil.rmtree(work)


def test_fuzz_report_inputs(tmp_path, capsys):
    from tests.test_reports import fabricate

    clean = fabricate(tmp_path / "clean", seeds=(0,), benches=("phantom",), references=True)
    files = [
        clean / "stllava-med" / "f0.09" / "s0" / "eval" / "phantom" / "scores.json",
        clean / "sft" / "f0.25" / "s0" / "checkpoint" / "checkpoint.json",
        clean / "reference" / "llava-med-v1.5" / "reference.json",
        clean / "sft" / "f1.0" / "s0" / "eval" / "phantom" / "scored.jsonl",
    ]
    for case in range(max(15, N_CASES // 4)):
        rng = random.Random(10_000 + case)
        run = tmp_path / f"r{case}"
        shutil.copytree(clean, run)
        target = run / rng.choice(files).relative_to(clean)
        if target.suffix == ".jsonl":
            rows = [json.loads(x) for x in target.read_text().splitlines()]
            rows[rng.randrange(len(rows))] = _mutate_obj(rows[rng.randrange(len(rows))], rng)
            text = "".join(_dump(r, rng) + "\n" for r in rows)
        elif rng.random() < 0.85:
            text = _dump(_mutate_obj(json.loads(target.read_text()), rng), rng)
        else:
            text = _mutate_text(target.read_text(), rng)
        _write_bytes(target, text)
        rc = main(["report", str(run), "--format", "md,csv,html", "--quiet"])
        _check(rc, capsys, f"report case {case} ({target.relative_to(run)})", [target, run])
        if rc == 0:
            md = (run / "report" / "data_efficiency.md").read_text()
            assert not re.search(r"\|\s*[-+]?(nan|inf)", md, re.I), md  # never a NaN shown as a number
        shutil.rmtree(run)
