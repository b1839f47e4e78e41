"""`medvqa train` refuses out-of-range settings with one line, before it loads data or a model."""

from __future__ import annotations

import pytest
from medvqa.cli import main


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--seed", "-1", "--seed must be an integer in [0, 2^32), got -1"),
        ("--seed", str(2**32), "--seed must be an integer in [0, 2^32)"),
        ("--fraction", "7", "--fraction must be a number in (0, 1], got 7.0"),
        ("--fraction", "0", "--fraction must be a number in (0, 1], got 0.0"),
    ],
)
def test_out_of_range_seed_and_fraction_are_one_line(tmp_path, capsys, flag, value, message) -> None:
    argv = ["train", "--trainer", "sft", "--model", f"hf:{tmp_path / 'no-model'}", "--benchmark", "phantom"]
    argv += ["--root", str(tmp_path / "no-data"), "--out", str(tmp_path / "out"), flag, value]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]  # named before the missing data or model is noticed
    assert not (tmp_path / "out").exists()


def test_stllava_steps_refuse_a_negative_seed(tmp_path, capsys) -> None:
    argv = ["stllava", "questions", "--model", f"hf:{tmp_path / 'no-model'}", "--benchmark", "phantom"]
    argv += ["--root", str(tmp_path / "no-data"), "--out", str(tmp_path / "q.jsonl"), "--seed", "-1"]
    assert main(argv) == 2
    assert "--seed must be an integer in [0, 2^32), got -1" in capsys.readouterr().err
    assert not (tmp_path / "q.jsonl").exists()
