"""Hostile benchmark files (issue 11): pickle bombs, hostile image paths, missing values, pixel bombs.

Each case failed on the code before the fix (a hang, a traceback, or silent garbage) and is now one
BadInput line naming file, record and field (exit 2), or a counted skip under --skip-bad.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path
from typing import Any

import pytest
from medvqa.cli import main
from medvqa.errors import BadInput
from medvqa.registry import benchmarks
from medvqa.safety import DEFAULT_MAX_PIXELS, resolve_inside, safe_load_pickle
from medvqa.types import SkippedRecord

from tests import real_fixtures as fx


def _one_line_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI; it must exit 2 with exactly one line on stderr and no traceback. Returns the line."""
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


# ------------------------------------------------------------------------------------------ pickle bombs


def _self_list() -> list[Any]:
    x: list[Any] = []
    x.append(x)
    return x


def _self_dict() -> list[Any]:
    d: dict[str, Any] = {"image": "test_0000", "question": "q?"}
    d["answer"] = d
    return [d]


def _shared_60() -> list[Any]:
    x: list[Any] = []
    for _ in range(60):
        x = [x, x]  # 2**60 paths through 61 objects
    return x


@pytest.mark.timeout(20)  # the old walk never returned
@pytest.mark.parametrize(
    "build, pattern",
    [
        (_self_list, r"pickle refused: a list contains itself"),
        (_self_dict, r"pickle refused: a dict contains itself"),
        (_shared_60, r"record #0: expected an object, got list"),
    ],
    ids=["self-containing list", "self-containing record", "60 levels of x=[x,x]"],
)
def test_pickle_bombs_are_refused_in_bounded_time(
    tmp_path: Path, build: Any, pattern: str, capsys: pytest.CaptureFixture[str]
) -> None:
    root = fx.make_pathvqa_original(tmp_path / "data", splits=("test",))
    pkl = root / "pvqa" / "qas" / "test" / "test_qa.pkl"
    pkl.write_bytes(pickle.dumps(build(), protocol=4))
    assert pkl.stat().st_size < 1000  # a few hundred bytes
    line = _one_line_exit_2(["data", "inspect", "pathvqa", "--root", str(root)], capsys)
    assert line.startswith(f"error: {pkl}") or str(pkl) in line
    assert re.search(pattern, line)
    with pytest.raises(BadInput, match=pattern):
        benchmarks.get("pathvqa")().load("test", root)


def test_pickle_node_budget(tmp_path: Path) -> None:
    pkl = tmp_path / "big.pkl"
    pkl.write_bytes(pickle.dumps([{"n": i} for i in range(100)]))
    with pytest.raises(BadInput, match=r"big\.pkl: pickle refused: it holds more than 50 objects"):
        safe_load_pickle(pkl, max_nodes=50)
    assert len(safe_load_pickle(pkl)) == 100
    shared = ["same text"] * 3
    pkl.write_bytes(pickle.dumps([shared, shared]))  # shared, acyclic references are plain data
    assert safe_load_pickle(pkl) == [shared, shared]


# ------------------------------------------------------------------------------------------ hostile paths


def _slake_with_image_name(tmp_path: Path, name: str) -> Path:
    root = fx.make_slake(tmp_path / "data")
    records = fx.slake_records("test")
    records[1]["img_name"] = name
    fx.write_json(root / "Slake1.0" / "test.json", records)
    return root


@pytest.mark.parametrize(
    "name, why",
    [
        ("xmlab1/sou\x00rce.jpg", "holds a NUL byte"),
        ("x" * 5000 + ".jpg", "is too long (5004 characters)"),
        ("xmlab1/" + "y" * 300 + ".jpg", "is too long"),
        ("loop/source.jpg", "is a symlink loop"),
    ],
    ids=["NUL byte", "5,000-character name", "over-long component", "symlink loop"],
)
def test_hostile_image_paths_are_one_line(
    tmp_path: Path, name: str, why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _slake_with_image_name(tmp_path, name)
    imgs = root / "Slake1.0" / "imgs"
    (imgs / "loop").symlink_to(imgs / "loop")  # a link to itself
    line = _one_line_exit_2(["data", "inspect", "slake", "--root", str(root)], capsys)
    assert "test.json, record #1 (qid 202), field 'img_name'" in line and why in line
    bench = benchmarks.get("slake")()
    samples = bench.load("test", root, skip_bad=True)
    assert len(samples) == 3 and [r.field for r in bench.skipped] == ["img_name"]
    assert why in bench.skipped[0].error


# ------------------------------------------------------------------------------------------ missing values


def test_nan_answer_in_parquet_is_not_the_gold_answer_nan(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = fx.hf_rows([(1, "how many?", "x"), (2, "how many?", "x"), (3, "how many?", "x")])
    shard = tmp_path / "hf" / "data" / "test-00000-of-00001.parquet"
    shard.parent.mkdir(parents=True)
    table = {
        "image": [r["image"] for r in rows],
        "question": [r["question"] for r in rows],
        "answer": pa.array([2.0, math.nan, 3.0], pa.float64()),  # a NaN value, not a null
    }
    pq.write_table(pa.table(table), shard)
    bench = benchmarks.get("vqa-rad")()
    with pytest.raises(BadInput, match=r"record row 1, field 'answer': missing value \(nan\)"):
        bench.load("test", tmp_path / "hf")
    samples = bench.load("test", tmp_path / "hf", skip_bad=True)
    assert [s.answer for s in samples] == ["2", "3"] and len(bench.skipped) == 1


def test_nan_and_empty_gold_in_json_are_refused(tmp_path: Path) -> None:
    root = fx.make_slake(tmp_path / "data")
    text = json.dumps(fx.slake_records("test"))
    records = json.loads(text)
    records[0]["answer"] = math.nan  # json.dumps writes NaN, and Python's JSON reader takes it
    records[1]["answer"] = "   "
    (root / "Slake1.0" / "test.json").write_text(json.dumps(records))
    bench = benchmarks.get("slake")()
    with pytest.raises(BadInput, match=r"record #0 \(qid 201\), field 'answer': missing value \(nan\)"):
        bench.load("test", root)
    assert len(bench.load("test", root, skip_bad=True)) == 2  # 4 English test questions, 2 refused
    assert [str(s).rsplit(": ", 1)[-1] for s in bench.skipped] == ["missing value (nan)", "empty text"]


def test_huge_integer_answer_is_one_line(tmp_path: Path) -> None:
    root = fx.make_pathvqa_original(tmp_path / "data", splits=("test",))
    records: list[Any] = fx.pathvqa_records("test")
    records[0]["answer"] = 10**5000  # str() of it raises ValueError (the 4,300-digit limit)
    with open(root / "pvqa" / "qas" / "test" / "test_qa.pkl", "wb") as fh:
        pickle.dump(records, fh)
    with pytest.raises(BadInput, match=r"record #0, field 'answer': number too large to be text"):
        benchmarks.get("pathvqa")().load("test", root)


# ------------------------------------------------------------------------------------------ pixel bombs


def test_decompression_bomb_below_pillows_limit_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = fx.make_vqa_rad_original(tmp_path / "rad")
    bomb = fx.bomb_png(11000, 11000)  # 121 Mpx: under Pillow's error limit (179 Mpx), 2 GB in eval
    assert len(bomb) < 1000
    (root / fx.VQA_RAD_IMAGES / "synpic3.jpg").write_bytes(bomb)
    bench = benchmarks.get("vqa-rad")()
    for level in ("exists", "verify", "decode"):  # the cap reads only the header, at every level
        with pytest.raises(
            BadInput,
            match=r"record #5 \(qid 6\), field 'image_name': image of 11000x11000 = 121,000,000 pixels "
            r"exceeds the pixel cap of 50,000,000",
        ):
            bench.load("test", root, check_images=level)
    line = _one_line_exit_2(["data", "inspect", "vqa-rad", "--root", str(root)], capsys)
    assert "exceeds the pixel cap" in line and "--max-pixels" in line
    assert len(bench.load("test", root, skip_bad=True)) == 2 and len(bench.skipped) == 3


def test_pixel_cap_is_configurable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = fx.make_vqa_rad_original(tmp_path / "rad")
    (root / fx.VQA_RAD_IMAGES / "synpic3.jpg").write_bytes(fx.bomb_png(8000, 8000))  # 64 Mpx
    assert DEFAULT_MAX_PIXELS < 8000 * 8000
    bench = benchmarks.get("vqa-rad")()
    with pytest.raises(BadInput, match="exceeds the pixel cap of 50,000,000"):
        bench.load("test", root)
    assert len(bench.load("test", root, max_pixels=70_000_000)) == 5  # raised: the header parses
    assert len(bench.load("test", root, max_pixels=0)) == 5  # 0: no cap of ours
    with pytest.raises(BadInput, match="exceeds the pixel cap of 1,000"):
        bench.load("test", root, max_pixels=1000)  # every 8x8 fixture image is fine, the bomb is not
    assert main(["data", "inspect", "vqa-rad", "--root", str(root), "--max-pixels", "70000000"]) == 0
    _one_line_exit_2(["data", "inspect", "vqa-rad", "--root", str(root), "--max-pixels", "-1"], capsys)


def test_phantom_counts_its_skips_through_the_base_class(tmp_path: Path) -> None:
    from medvqa.benchmarks.phantom import PhantomConfig, write_phantom

    root = tmp_path / "ph"
    write_phantom(root, PhantomConfig(seed=1, train_images=0, test_images=3, size=16, captions=False))
    images = sorted((root / "test" / "images").glob("*.png"))
    images[0].unlink()
    images[1].write_bytes(fx.bomb_png(9000, 9000))
    bench = benchmarks.get("phantom")()
    n_all = len((root / "test" / "samples.jsonl").read_text().splitlines())
    samples = bench.load("test", root, skip_bad=True)
    assert len(samples) == n_all // 3 and len(bench.skipped) == n_all - n_all // 3
    assert all(isinstance(r, SkippedRecord) and r.field == "image" for r in bench.skipped)
    assert any("pixel cap" in r.error for r in bench.skipped) and any(
        "not found" in r.error for r in bench.skipped
    )


def test_llava_med_item_without_conversations_is_one_line(tmp_path: Path) -> None:
    """Found by the loader fuzzing: an item whose `conversations` key is missing was a KeyError."""
    items = fx.llava_med_items()
    del items[1]["conversatons"]
    root = fx.make_llava_med(tmp_path, items)
    bench = benchmarks.get("llava-med-json")()
    with pytest.raises(BadInput, match=r"record item 1 \(id 1\), field 'conversations': missing field"):
        bench.load("test", root)
    assert len(bench.load("test", root, skip_bad=True)) == 2 and len(bench.skipped) == 1


def test_eval_plan_refuses_the_pixel_bomb_before_any_model_and_takes_max_pixels(tmp_path: Path) -> None:
    from medvqa.evaluate import EvalConfig
    from medvqa.evaluation.plan import make_plan

    root = fx.make_vqa_rad_original(tmp_path / "rad")
    (root / fx.VQA_RAD_IMAGES / "synpic3.jpg").write_bytes(fx.bomb_png(11000, 11000))
    cfg = EvalConfig(model="hf:none", benchmark="vqa-rad", root=str(root), out=str(tmp_path / "out"))
    with pytest.raises(BadInput, match=r"record #5 \(qid 6\), field 'image_name': image of 11000x11000"):
        make_plan(cfg, "hf:none")
    plan = make_plan(EvalConfig(**{**vars(cfg), "max_pixels": 200_000_000}), "hf:none")
    assert len(plan.samples) == 5
    plan = make_plan(EvalConfig(**{**vars(cfg), "skip_bad": True}), "hf:none")
    assert len(plan.samples) == 2 and len(plan.load_skips) == 3
    assert all("pixel cap" in row["error"] for row in plan.load_skips)


def test_lone_surrogates_and_nan_found_by_fuzzing(tmp_path: Path) -> None:
    """JSON may hold `\\ud800` and NaN: neither may become a path, a gold answer or metadata that
    breaks the UTF-8 prediction files written later."""
    root = fx.make_slake(tmp_path / "slake")
    records = fx.slake_records("test")
    records[0]["img_name"] = "\ud800"  # was a UnicodeEncodeError traceback from the path check
    records[1]["question"] = "is \ud800 there?"
    records[2]["modality"] = "\ud800"  # metadata: dropped, not carried into scored rows
    records[3]["location"] = math.nan
    (root / "Slake1.0" / "test.json").write_text(json.dumps(records))  # ensure_ascii: \\ud800 escapes
    bench = benchmarks.get("slake")()
    with pytest.raises(BadInput, match=r"record #0 \(qid 201\), field 'img_name': text is not valid Unicode"):
        bench.load("test", root)
    samples = bench.load("test", root, skip_bad=True)
    assert [r.field for r in bench.skipped] == ["img_name", "question"]
    with pytest.raises(BadInput, match="is not valid text for a file name"):  # parquet path cells come here
        resolve_inside(root, "\ud800.png", path=root / "x.parquet", index="row 0", field="image.path")
    for s in samples:
        json.dumps({"q": s.question, "a": s.answer, "meta": dict(s.meta)}, ensure_ascii=False).encode("utf-8")
    assert "modality" not in samples[0].meta and "organ" not in samples[1].meta

    items = fx.llava_med_items()
    items[0]["conversations"][1]["value"] = math.nan  # was the gold answer "nan"
    items[2]["conversations"][0]["value"] = "\ud800?"
    llava = fx.make_llava_med(tmp_path / "llava")
    (llava / "test.json").write_text(json.dumps(items))
    bench = benchmarks.get("llava-med-json")()
    with pytest.raises(
        BadInput, match=r"record item 0 \(id 0\), field 'conversations\[1\]\.value': missing value"
    ):
        bench.load("test", llava)
    assert len(bench.load("test", llava, skip_bad=True)) == 1 and len(bench.skipped) == 2
