"""The run folder's names are written and read back by one module (medvqa.layout)."""

from __future__ import annotations

import random

import pytest
from medvqa.layout import fraction_dirname, parse_fraction_dirname, parse_seed_dirname, seed_dirname
from medvqa.reports.results import collect


@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.25, 0.09, 0.001, 5e-05, 1e-07, 1 / 3])
def test_every_fraction_the_sweep_accepts_reads_back(fraction: float) -> None:
    assert parse_fraction_dirname(fraction_dirname(fraction)) == fraction


def test_names_that_are_not_fractions_or_seeds() -> None:
    assert parse_fraction_dirname("f1") == 1.0 and parse_fraction_dirname("f0.50") == 0.5  # hand-made
    for name in ("fnan", "finf", "f-0.5", "f2e+00", "x0.5", "f", "f0.5x"):
        assert parse_fraction_dirname(name) is None, name
    assert [parse_seed_dirname(seed_dirname(s)) for s in (0, 3, -1)] == [0, 3, -1]
    assert parse_seed_dirname("seed0") is None and parse_seed_dirname("s1.5") is None


def test_the_report_reads_a_small_fraction_the_sweep_wrote(tmp_path) -> None:
    """A sweep fraction of 5e-05 is the folder f5e-05: the report must not drop that line."""
    from tests.test_reports import _write_eval

    job = tmp_path / "run" / "sft" / fraction_dirname(5e-05) / seed_dirname(0)
    assert job.parent.name == "f5e-05"
    _write_eval(job / "eval" / "phantom", "phantom", 0.6, 0.5, random.Random(0), "fp")
    rows = collect(tmp_path / "run")
    assert rows and {r["fraction"] for r in rows} == {"5e-05"} and {r["seed"] for r in rows} == {"0"}
