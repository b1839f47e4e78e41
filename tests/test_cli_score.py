"""`medvqa score` end to end: table, JSON, per-item file, exit codes, no heavy imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from medvqa.cli import main

DATA = Path(__file__).parent / "data"
GT, PRED = str(DATA / "test.json"), str(DATA / "answers.jsonl")
REPO = Path(__file__).resolve().parents[1]


def test_score_prints_a_table(capsys):
    assert main(["score", "--gt", GT, "--pred", PRED]) == 0
    out = capsys.readouterr().out
    assert "12 items: 6 closed, 6 open" in out
    lines = {
        tuple(line.split()[:2]): line for line in out.splitlines() if line.startswith(("llava-med", "strict"))
    }
    assert "83.33" in lines[("llava-med", "closed_accuracy")]  # "no" found in "normal", "yes" in "yes and no"
    assert "50.00" in lines[("strict", "closed_accuracy")]
    assert "80.00" in lines[("llava-med", "open_recall")]
    assert "[" in lines[("llava-med", "open_recall")]  # a CI is shown


def test_score_json_has_every_metric_in_percent_with_cis(capsys):
    assert main(["score", "--gt", GT, "--pred", PRED, "--json", "--seed", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["n"], out["n_open"], out["n_closed"]) == (12, 6, 6)
    llava, strict = out["scorers"]["llava-med"], out["scorers"]["strict"]
    assert llava["closed_accuracy"]["value"] == pytest.approx(500 / 6)
    assert strict["closed_accuracy"]["value"] == pytest.approx(50.0)
    assert llava["open_recall"]["value"] == pytest.approx(80.0)
    for scorer in (llava, strict):
        assert (scorer["n_open"], scorer["n_closed"]) == (6, 6)
        for metric in ("closed_accuracy", "open_recall", "open_precision", "open_f1", "open_exact_match"):
            assert 0 <= scorer[metric]["value"] <= 100 and scorer[metric]["n"] == 6
        for metric in ("closed_accuracy", "open_recall"):
            assert scorer[metric]["ci_low"] <= scorer[metric]["value"] <= scorer[metric]["ci_high"]
    assert "open_bleu" in llava and "open_bleu" not in strict


def test_score_one_scorer_and_the_per_item_file(tmp_path, capsys):
    scored = tmp_path / "out" / "scored.jsonl"
    assert (
        main(
            ["score", "--gt", GT, "--pred", PRED, "--scorer", "strict", "--json", "--out-scored", str(scored)]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert list(out["scorers"]) == ["strict"]
    rows = [json.loads(line) for line in scored.read_text().splitlines()]
    assert len(rows) == 12
    by_id = {r["id"]: r for r in rows}
    assert by_id["6"]["gold"] == "no" and by_id["6"]["prediction"] == "The heart size is normal."
    assert by_id["6"]["strict"] == {"closed_accuracy": 0.0} and "llava-med" not in by_id["6"]
    assert by_id["4"]["gold"] == "2" and by_id["4"]["strict"]["open_exact_match"] == 100.0
    assert set(by_id["3"]) == {
        "id",
        "image_id",
        "answer_type",
        "question",
        "gold",
        "prediction",
        "image",
        "meta",
        "strict",
    }
    assert by_id["6"]["question"] and by_id["6"]["image"].endswith(".jpg")  # what `medvqa show` shows


def _write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(
    ("gt_text", "pred_text", "message"),
    [
        (None, '{"question_id": 1, "text": "yes"}\n{"question_id": 2,', "malformed JSON at line 2"),
        (None, "", "file is empty"),
        (
            None,
            '{"question_id": "a", "text": "x"}\n',
            "no id in common: is this the prediction file for another GT?",
        ),
        (
            '[{"id": 1, "answer_type": "BOTH", "conversations": [{"value": "q"}, {"value": "a"}]}]',
            None,
            "answer_type",
        ),
        (
            '[{"id": 1, "answer_type": "OPEN", "conversations": [{"value": "q"}, {"value": null}]}]',
            None,
            "value",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, gt_text, pred_text, message):
    gt = GT if gt_text is None else _write(tmp_path / "gt.json", gt_text)
    pred = PRED if pred_text is None else _write(tmp_path / "pred.jsonl", pred_text)
    assert main(["score", "--gt", gt, "--pred", pred]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("medvqa: error: ") and message in err and len(err.splitlines()) == 1
    assert (gt if gt_text is not None else pred) in err  # names the file


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    pred = _write(tmp_path / "pred.jsonl", '{"question_id": 1, "text": "yes"}\n')
    proc = subprocess.run(
        [sys.executable, "-m", "medvqa.cli", "score", "--gt", GT, "--pred", pred],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "11 of 12 GT ids have no prediction" in proc.stderr


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["score", "--gt", GT])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["score", "--gt", GT, "--pred", PRED, "--scorer", "bleu"])
    assert info.value.code == 2
    assert "invalid choice: 'bleu'" in capsys.readouterr().err


def test_help_teaches_with_an_example(capsys):
    with pytest.raises(SystemExit):
        main(["score", "--help"])
    out = capsys.readouterr().out
    assert "medvqa score --gt tests/data/test.json --pred tests/data/answers.jsonl" in out
    assert "llava-med" in out and "strict" in out and "normal" in out


def test_score_never_imports_torch_or_transformers():
    code = (
        "import sys\n"
        "from medvqa.cli import main\n"
        f"rc = main(['score', '--gt', {GT!r}, '--pred', {PRED!r}, '--json'])\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'trl', 'peft', 'datasets', 'pandas', 'matplotlib')"
        " if m in sys.modules)\n"
        "assert rc == 0, rc\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr


# --- hostile but parseable input (issue 11, items 8 and 11): one line, exit 2, never a traceback ---


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("medvqa: error: ") and len(err.splitlines()) == 1, err
    return err


def test_a_5000_digit_integer_in_the_answer_file_is_refused(tmp_path, capsys):
    pred = _write(tmp_path / "pred.jsonl", '{"question_id": 1, "text": ' + "9" * 5000 + "}\n")
    assert main(["score", "--gt", GT, "--pred", pred]) == 2
    err = _one_line_error(capsys)
    assert pred in err and "line 1" in err and "4300 digits" in err


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_100k_deep_nesting_is_refused(tmp_path, capsys, suffix):
    deep = _write(tmp_path / f"gt{suffix}", "[" * 100_000 + "]" * 100_000 + "\n")
    assert main(["score", "--gt", deep, "--pred", PRED]) == 2
    err = _one_line_error(capsys)
    assert deep in err and "nested too deeply" in err


@pytest.mark.parametrize("n_boot", ["1e9", "1000000000", "-1", "1.5", "abc", "inf"])
def test_n_boot_out_of_range_is_refused_before_reading(capsys, n_boot):
    assert main(["score", "--gt", GT, "--pred", PRED, "--n-boot", n_boot]) == 2
    assert "--n-boot" in _one_line_error(capsys)


def test_n_boot_in_scientific_notation_is_a_count(capsys):
    assert main(["score", "--gt", GT, "--pred", PRED, "--n-boot", "2e2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ci"]["n_boot"] == 200


@pytest.mark.parametrize(
    "gt_text",
    [
        '[{"id": 1, "answer_type": "CLOSED", "conversations": [{"value": "q"}, {"value": "  "}]}]',
        '{"id": "1", "question": "q", "answer": "", "answer_type": "OPEN"}\n',
    ],
)
def test_an_empty_gold_answer_is_refused(tmp_path, capsys, gt_text):
    gt = _write(tmp_path / "gt.json", gt_text)
    pred = _write(tmp_path / "pred.jsonl", '{"question_id": 1, "text": "yes"}\n')
    assert main(["score", "--gt", gt, "--pred", pred]) == 2
    err = _one_line_error(capsys)
    assert gt in err and "empty gold answer" in err and "id 1" in err
