"""`medvqa train` refuses out-of-range settings with one line, before it loads data or a model, and
keeps a finished checkpoint only for the settings and data it was trained with."""

from __future__ import annotations

import json

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


@pytest.mark.slow
def test_a_finished_checkpoint_is_kept_only_for_the_settings_it_was_trained_with(
    tiny_model_dir, phantom_root, tmp_path, capsys
) -> None:
    """Rerunning `medvqa train` on a finished folder skips it only if trainer, seed, fraction, base
    model and config are the ones recorded; other settings are refused (exit 2, each change named),
    never silently answered with the old model."""
    out = tmp_path / "out"
    argv = ["train", "--trainer", "sft", "--model", f"hf:{tiny_model_dir}", "--benchmark", "phantom",
            "--root", str(phantom_root), "--fraction", "0.5", "--out", str(out), "--max-steps", "2",
            "--per-device-train-batch-size", "4"]  # fmt: skip
    assert main(argv) == 0
    finished = (out / "checkpoint.json").read_bytes()
    capsys.readouterr()
    assert main(argv) == 0
    assert "already holds a finished checkpoint of these settings" in capsys.readouterr().out
    for extra, change in [
        (["--learning-rate", "5e-4"], "learning_rate: 2e-05 → 0.0005"),
        (["--seed", "1"], "seed: 0 → 1"),
        (["--fraction", "1.0"], "fraction: 0.5 → 1.0"),
    ]:
        assert main([*argv, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(out) in err[0] and change in err[0] and "--force" in err[0]
    assert (out / "checkpoint.json").read_bytes() == finished
    meta = json.loads(finished)  # the same settings, but trained on another labeled fraction's data
    (out / "checkpoint.json").write_text(json.dumps({**meta, "manifest_hash": "0" * 16}))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"manifest_hash: '{'0' * 16}' → '{meta['manifest_hash']}'" in err and "--force" in err
