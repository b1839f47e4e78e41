"""`medvqa data phantom|inspect|overlap|convert` end to end on fixture trees (in-process, plus one subprocess)."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from medvqa.cli import main

from tests import real_fixtures as fx


def run(capsys: pytest.CaptureFixture[str], *argv: Any) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: Any) -> dict[str, Any]:
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


# ------------------------------------------------------------------------------------------ inspect


LAYOUTS = {
    # benchmark, builder, extra args, (n, n_open, n_closed, n_images), closed rule contains
    "vqa-rad original": ("vqa-rad", fx.make_vqa_rad_original, [], (5, 2, 3, 2), "dataset answer_type"),
    "vqa-rad parquet": ("vqa-rad", fx.make_vqa_rad_parquet, [], (4, 2, 2, 2), "gold answer is yes/no"),
    "slake en": ("slake", fx.make_slake, [], (4, 2, 2, 2), "non-yes/no"),
    "slake all": ("slake", fx.make_slake, ["--lang", "all"], (6, 3, 3, 2), "non-yes/no"),
    "pathvqa original": ("pathvqa", fx.make_pathvqa_original, [], (5, 3, 2, 3), "gold answer is yes/no"),
    "pathvqa parquet": ("pathvqa", fx.make_pathvqa_parquet, [], (4, 2, 2, 2), "gold answer is yes/no"),
    "llava-med-json": ("llava-med-json", fx.make_llava_med, [], (3, 1, 2, 2), "dataset answer_type"),
}


@pytest.mark.parametrize("case", list(LAYOUTS))
def test_inspect_json_every_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    name, build, extra, expected, rule = LAYOUTS[case]
    root = build(tmp_path / "d")
    out = run_json(capsys, "data", "inspect", name, "--root", root, *extra)
    assert (out["n"], out["n_open"], out["n_closed"], out["n_images"]) == expected
    assert rule in out["closed_rule"]
    assert out["benchmark"] == name and out["benchmark_version"] and out["layout"] and out["split"] == "test"
    assert out["n_skipped"] == 0


def test_inspect_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = fx.make_vqa_rad_parquet(tmp_path)
    code, out, _ = run(capsys, "data", "inspect", "vqa-rad", "--root", root, "--split", "train")
    assert code == 0
    assert "Hugging Face parquet" in out
    assert "questions    3  (OPEN 2, CLOSED 1)" in out
    assert "closed rule  gold answer is yes/no (no answer_type in this layout)" in out
    assert "version 1" in out


def test_inspect_slake_note_and_lang(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = fx.make_slake(tmp_path)
    code, out, _ = run(capsys, "data", "inspect", "slake", "--root", root, "--lang", "zh")
    assert code == 0 and "questions    2  (OPEN 1, CLOSED 1)" in out and "version 1+lang=zh" in out
    out_json = run_json(
        capsys, "data", "inspect", "slake", "--root", root, "-O", "lang=all", "--split", "val"
    )
    assert out_json["n"] == 3 and out_json["split"] == "validate"


# ------------------------------------------------------------------------------------------ errors


def test_errors_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    records = fx.vqa_rad_records()
    records[4]["image_name"] = "missing.jpg"
    root = fx.make_vqa_rad_original(tmp_path / "rad", records)
    code, out, err = run(capsys, "data", "inspect", "vqa-rad", "--root", root)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{root / fx.VQA_RAD_JSON}, record #4 (qid 5), field 'image_name': image not found" in err
    # --skip-bad: skipped and counted
    out_json = run_json(capsys, "data", "inspect", "vqa-rad", "--root", root, "--skip-bad")
    assert out_json["n"] == 4 and out_json["n_skipped"] == 1 and "missing.jpg" in out_json["skipped"][0]
    code, out, _ = run(capsys, "data", "inspect", "vqa-rad", "--root", root, "--skip-bad")
    assert code == 0 and "skipped      1 bad record(s)" in out and "record #4 (qid 5)" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["inspect", "nope", "--root", "."], "unknown benchmark 'nope'; known: "),
        (["inspect", "vqa-rad", "--root", "ROOT", "--lang", "zh"], "--lang applies to slake"),
        (["inspect", "slake", "--root", "ROOT", "-O", "lang"], "--option expects KEY=VALUE"),
        (["inspect", "slake", "--root", "ROOT", "-O", "colour=red"], "unknown option(s) ['colour']"),
        (["inspect", "vqa-rad", "--root", "ROOT"], "no known vqa-rad layout here"),
        (["inspect", "slake", "--root", "ROOT/missing"], "data root does not exist"),
    ],
)
def test_usage_errors_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    argv = [a.replace("ROOT", str(tmp_path)) for a in argv]
    code, _, err = run(capsys, "data", *argv)
    assert code == 2
    assert message in err


def test_malicious_pickle_via_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "created"

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (open, (str(marker), "w"))

    root = fx.make_pathvqa_original(tmp_path / "d", splits=("test",))
    with open(root / "pvqa" / "qas" / "test" / "test_qa.pkl", "wb") as fh:
        pickle.dump([{"image": "test_0000", "question": Payload(), "answer": "yes"}], fh)
    code, _, err = run(capsys, "data", "inspect", "pathvqa", "--root", root)
    assert code == 2 and "pickle refused" in err and "test_qa.pkl" in err
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ overlap


def test_overlap_counts_shared_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = run_json(capsys, "data", "overlap", "vqa-rad", "--root", fx.make_vqa_rad_original(tmp_path / "rad"))
    assert out["n_images"] == {"train": 2, "test": 2}
    assert out["n_shared_images"] == 1 and out["n_test_questions_on_shared_images"] == 2
    assert out["examples"][0]["test"] == "synpic2.jpg" and len(out["examples"][0]["sha256"]) == 64
    out = run_json(capsys, "data", "overlap", "pathvqa", "--root", fx.make_pathvqa_original(tmp_path / "pv"))
    # different file names, same bytes: found by content
    assert out["n_shared_images"] == 1 and out["examples"][0] == {
        "sha256": out["examples"][0]["sha256"],
        "train": "train_0001",
        "test": "test_0001",
    }
    code, text, _ = run(
        capsys, "data", "overlap", "vqa-rad", "--root", fx.make_vqa_rad_parquet(tmp_path / "hf")
    )
    assert (
        code == 0
        and "shared       1 images (50.0% of test images), asked about by 2 of 4 test questions" in text
    )


def test_overlap_none(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = run_json(
        capsys, "data", "overlap", "slake", "--root", fx.make_slake(tmp_path), "--train-split", "validate"
    )
    assert out["n_shared_images"] == 0 and out["examples"] == [] and out["splits"] == ["validate", "test"]


# ------------------------------------------------------------------------------------------ convert


def test_convert_file_layout_relative_and_self_contained(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = fx.make_slake(tmp_path / "data")
    out = tmp_path / "plain" / "test.json"
    code, text, _ = run(capsys, "data", "convert", "slake", "--root", root, "--split", "test", "--out", out)
    assert code == 0 and "wrote 4 items of slake/test" in text
    items = json.loads(out.read_text())
    meta = items[0].pop("meta")  # ours, beside LLaVA-Med's fields (its scripts ignore it)
    assert meta["image_id"] == "xmlab4/source.jpg" and meta["modality"] == "CT"
    assert items[0] == {
        "id": "201",
        "image": "Slake1.0/imgs/xmlab4/source.jpg",
        "answer_type": "CLOSED",
        "conversations": [
            {"from": "human", "value": "<image>\nWhich organ is bigger, liver or kidney?"},
            {"from": "gpt", "value": "Liver"},
        ],
    }
    assert not (tmp_path / "plain" / "images").exists()
    out2 = tmp_path / "packed" / "test.json"
    assert run(capsys, "data", "convert", "slake", "--root", root, "--out", out2, "--copy-images")[0] == 0
    back = run_json(capsys, "data", "inspect", "llava-med-json", "--root", out2.parent)
    assert (back["n"], back["n_open"], back["n_closed"], back["n_images"]) == (4, 2, 2, 2)


# ------------------------------------------------------------------------------------------ phantom


def test_phantom_flags_come_from_the_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from medvqa.benchmarks.phantom import PhantomConfig

    parser_help = subprocess.run(
        [sys.executable, "-m", "medvqa.cli", "data", "phantom", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for f in PhantomConfig.__dataclass_fields__:
        assert "--" + f.replace("_", "-") in parser_help
    out = run_json(
        capsys,
        "data",
        "phantom",
        "--out",
        tmp_path / "ph",
        "--train-images",
        3,
        "--test-images",
        2,
        "--size",
        16,
        "--seed",
        7,
    )
    assert out["seed"] == 7 and out["size"] == 16
    assert out["splits"]["train"]["images"] == 3 and out["splits"]["test"]["images"] == 2
    back = run_json(capsys, "data", "inspect", "phantom", "--root", tmp_path / "ph")
    assert back["n"] == out["splits"]["test"]["samples"] and back["n_images"] == 2
    code, text, _ = run(
        capsys,
        "data",
        "phantom",
        "--out",
        tmp_path / "ph2",
        "--train-images",
        2,
        "--test-images",
        1,
        "--size",
        16,
    )
    assert code == 0 and "wrote Phantom" in text and "train  2 images" in text


def test_data_help_is_light_and_teaches() -> None:
    code = (
        "import sys\n"
        "from medvqa.cli import main\n"
        "try:\n    main(['data', '--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'pandas', 'pyarrow', 'PIL', 'datasets') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in res.stdout
    assert (
        "examples:" in res.stdout
        and "medvqa data inspect" in res.stdout
        and "VQA_RAD Dataset Public.json" in res.stdout
    )
