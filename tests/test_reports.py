"""Reports on fabricated run folders: results.csv, the data-efficiency table, its tests, the plot."""

from __future__ import annotations

import csv
import io
import json
import random
import shutil
from pathlib import Path

import pytest
from medvqa.cli import main
from medvqa.errors import BadInput
from medvqa.reports.results import COLUMNS, collect, fraction_dirname
from medvqa.reports.stats import (
    mcnemar,
    paired_bootstrap,
    paired_test,
    seed_mean_ci,
    seed_paired_t,
    t_quantile,
    t_two_sided_p,
)
from medvqa.reports.tables import build_table, to_csv, to_markdown
from medvqa.scoring import metric_names

N_IMAGES = 60  # 2 closed + 2 open questions per image


def _write_eval(
    eval_dir: Path, bench: str, p_closed: float, p_open: float, rng: random.Random, fp: str
) -> None:
    """An eval folder whose scored.jsonl and scores.json come from the real scorer
    (`medvqa.scoring.score_samples`), not a hand-written schema: a closed answer is right with
    probability `p_closed`; an open one is the gold with probability `p_open`, else half of it or
    a miss. Only the run's descriptive fields (model, versions, ...) are written here."""
    from medvqa.scoring import score_samples
    from medvqa.types import VQASample

    samples, predictions = [], {}
    for img in range(N_IMAGES):
        for q in range(4):
            qid = f"{bench}-{img}-{q}"
            if q < 2:
                gold = "yes" if (img + q) % 2 else "no"
                wrong = "no" if gold == "yes" else "yes"
                pred = gold if rng.random() < p_closed else wrong
                kind = "CLOSED"
            else:
                gold = "left upper"
                pred = gold if rng.random() < p_open else ("left" if rng.random() < 0.3 else "x")
                kind = "OPEN"
            meta = {"image_id": f"img{img}"}
            samples.append(
                VQASample(qid, f"images/img{img}.png", f"question {q}?", gold, kind, bench, "test", meta)
            )
            predictions[qid] = pred
    result = score_samples(samples, predictions, n_boot=200, seed=0)
    eval_dir.mkdir(parents=True, exist_ok=True)
    (eval_dir / "scored.jsonl").write_text("".join(json.dumps(r) + "\n" for r in result.rows))
    summary = result.to_json()
    scores = {
        "benchmark": bench,
        "benchmark_version": "1.0",
        "split": "test",
        "closed_rule": "dataset answer_type",
        "prompt_policy": "short-answer",
        "model": {"spec": "hf:x", "fingerprint": fp},
        "generation": {"max_new_tokens": 8, "do_sample": False},
        "versions": {"torch": "2.13", "trl": "1.16"},
        "n": summary["n"],
        "n_open": summary["n_open"],
        "n_closed": summary["n_closed"],
        "ci": summary["ci"],
        "scorers": summary["scorers"],
    }
    (eval_dir / "scores.json").write_text(json.dumps(scores))


# trainer, fraction -> (p_closed, p_open, n_labeled, n_pairs, loss)
GRID = {
    ("sft", 0.09): (0.62, 0.55, 180, 0, "sft"),
    ("sft", 0.25): (0.78, 0.70, 500, 0, "sft"),
    ("sft", 1.0): (0.93, 0.90, 2000, 0, "sft"),
    ("stllava-med", 0.09): (0.72, 0.56, 180, 2600, "sigmoid+sft"),
}


def fabricate(run: Path, seeds=(0, 1), benches=("phantom", "vqa-rad"), references=True) -> Path:
    for (trainer, frac), (pc, po, n_lab, n_pairs, loss) in GRID.items():
        for seed in seeds:
            job = run / trainer / fraction_dirname(frac) / f"s{seed}"
            (job / "checkpoint").mkdir(parents=True, exist_ok=True)
            (job / "checkpoint" / "checkpoint.json").write_text(
                json.dumps(
                    {
                        "trainer": trainer,
                        "fraction": frac,
                        "seed": seed,
                        "manifest_hash": f"m{frac}{seed}",
                        "n_labeled": n_lab + seed,
                        "n_pairs": n_pairs,
                        "loss": loss,
                        "base_model": "hf:tiny",
                    }
                )
            )
            for b in benches:
                _write_eval(
                    job / "eval" / b,
                    b,
                    pc,
                    po,
                    random.Random(f"{trainer}{frac}{seed}{b}"),
                    f"fp-{trainer}{frac}{seed}",
                )
    if references:
        ref = run / "reference" / "llava-med-v1.5"
        for b in benches:
            _write_eval(ref / "eval" / b, b, 0.85, 0.6, random.Random(f"ref{b}"), "fp-ref")
        (ref / "reference.json").write_text(
            json.dumps(
                {
                    "name": "LLaVA-Med v1.5",
                    "kind": "reference",
                    "data_used": 530000,
                    "data_label": "530K medical samples",
                }
            )
        )
        base = run / "reference" / "base"
        for b in benches:
            _write_eval(base / "eval" / b, b, 0.5, 0.1, random.Random(f"base{b}"), "fp-base")
        (base / "reference.json").write_text(
            json.dumps({"name": "base model (no medical QA)", "kind": "base", "data_used": 0})
        )
    return run


def test_mcnemar_exact_and_chi2():
    # 10 discordant pairs, all favouring A: exact two-sided p = 2 / 2**10
    a = [True] * 10 + [True] * 50
    b = [False] * 10 + [True] * 50
    r = mcnemar(a, b)
    assert r.test == "mcnemar-exact" and r.p == pytest.approx(2 / 1024)
    # balanced discordance: p = 1
    assert mcnemar([True, False] * 20, [False, True] * 20).p == pytest.approx(1.0, abs=0.2)
    # many discordant pairs: chi-square with continuity correction, (|40-10|-1)^2/50 = 16.82
    a = [True] * 40 + [False] * 10
    b = [False] * 40 + [True] * 10
    r = mcnemar(a, b)
    assert r.test == "mcnemar-chi2" and r.p == pytest.approx(4.1e-05, rel=0.05)
    assert r.diff == pytest.approx(60.0)


def test_paired_bootstrap_detects_shift_and_null():
    rng = random.Random(0)
    base = [rng.random() * 100 for _ in range(300)]
    shifted = [x + 10 for x in base]
    assert paired_bootstrap(shifted, base).p < 0.01
    noisy = [x + rng.gauss(0, 5) for x in base]
    r = paired_bootstrap(noisy, base, [str(i // 3) for i in range(300)], seed=1)
    assert r.p > 0.01 and abs(r.diff) < 2


def test_seed_mean_ci():
    s = seed_mean_ci([70.0, 74.0])
    assert s.mean == 72.0 and s.n_seeds == 2 and s.method.startswith("t-interval")
    assert s.ci_high - s.mean == pytest.approx(12.706 * 2.0, rel=1e-3)  # sd 2.83 / sqrt(2) = 2
    one = seed_mean_ci([70.0], (65.0, 75.0))
    assert (one.ci_low, one.ci_high, one.n_seeds) == (65.0, 75.0, 1) and "1 seed" in one.method


def test_t_two_sided_p_known_values():
    assert t_two_sided_p(1.0, 1) == pytest.approx(0.5)  # df 1 is Cauchy: P(|T| > 1) = 1/2
    for t in (0.5, 3.136, 10.0):  # df 2 has a closed form: p = 1 − t / sqrt(2 + t²)
        assert t_two_sided_p(t, 2) == pytest.approx(1 - t / (2 + t * t) ** 0.5, rel=1e-9)
    for df in (1, 2, 4, 30):
        assert t_two_sided_p(t_quantile(df), df) == pytest.approx(0.05, rel=1e-9)
        assert t_two_sided_p(-2.5, df) == t_two_sided_p(2.5, df)
    assert t_two_sided_p(0.0, 3) == 1.0


def test_seed_paired_t_by_hand():
    # docs/trainers.md: STLLaVA-Med@9% and SFT@9% closed accuracy on seeds 0, 1, 2 (and a seed 3
    # only one side has, which must not be paired with anything)
    a = {0: 79.0, 1: 85.7, 2: 79.7, 3: 90.0}
    b = {2: 73.2, 0: 69.8, 1: 67.2}
    r = seed_paired_t(a, b)
    assert [s for s, _ in r.diffs] == [0, 1, 2] and r.n == 3
    assert [d for _, d in r.diffs] == pytest.approx([9.2, 18.5, 6.5])
    # mean 11.4; sd = sqrt((2.2² + 7.1² + 4.9²) / 2) = 6.2952; se = 3.6346; t = 3.1365
    assert r.mean == pytest.approx(11.4)
    assert r.t == pytest.approx(3.1365, abs=1e-4)
    assert r.p == pytest.approx(0.0884, abs=1e-4)  # 1 − t / sqrt(2 + t²), df 2
    half = 4.302653 * 3.634556  # t_{0.975, 2} · se
    assert (r.ci_low, r.ci_high) == pytest.approx((11.4 - half, 11.4 + half), abs=1e-4)
    assert r.note == ""
    # one paired seed: a difference but no test, and it says so
    one = seed_paired_t({0: 80.0, 1: 70.0}, {0: 70.0})
    assert one.n == 1 and one.mean == pytest.approx(10.0) and one.p is None and one.ci_low is None
    assert "1 paired seed, a seed-level test needs 2" in one.note
    assert seed_paired_t({}, {0: 1.0}).mean is None
    # the same difference on every seed: no spread, so no t (not p = 0)
    flat = seed_paired_t({0: 75.0, 1: 80.0}, {0: 70.0, 1: 75.0})
    assert flat.mean == pytest.approx(5.0) and flat.p is None and "no spread" in flat.note


def test_paired_test_matches_by_id_not_order():
    rows_a = [{"id": f"q{i}", "image_id": "i", "llava-med": {"closed_accuracy": 100.0}} for i in range(30)]
    rows_b = [
        {"id": f"q{i}", "image_id": "i", "llava-med": {"closed_accuracy": 100.0 if i < 15 else 0.0}}
        for i in reversed(range(30))
    ]
    r = paired_test({0: rows_a}, {0: rows_b}, "llava-med", "closed_accuracy")
    assert r.n == 30 and r.diff == pytest.approx(50.0) and r.p < 0.001


def test_results_csv_tidy(tmp_path):
    run = fabricate(tmp_path / "myrun")
    rows = collect(run)
    # 4 lines x 2 seeds x 2 benchmarks + 2 references x 2 benchmarks; every metric of both scorers
    n_metrics = len(metric_names("llava-med")) + len(metric_names("strict"))
    assert len(rows) == (4 * 2 * 2 + 2 * 2) * n_metrics
    assert set(rows[0]) == set(COLUMNS)
    r = next(
        r
        for r in rows
        if r["trainer"] == "stllava-med"
        and r["seed"] == "1"
        and r["benchmark"] == "vqa-rad"
        and r["scorer"] == "strict"
        and r["metric"] == "closed_accuracy"
    )
    assert r["run"] == "myrun" and r["fraction"] == "0.09" and r["loss"] == "sigmoid+sft"
    assert r["n_labeled"] == "181" and r["n_pairs"] == "2600" and r["data_used"] == "2781"
    assert r["checkpoint_fingerprint"] == "fp-stllava-med0.091" and r["prompt_policy"] == "short-answer"
    assert "torch=2.13" in r["versions"] and r["benchmark_version"] == "1.0"
    assert r["eval_dir"] == "stllava-med/f0.09/s1/eval/vqa-rad"
    ref = [r for r in rows if r["kind"] == "reference"]
    assert ref and ref[0]["label"] == "LLaVA-Med v1.5" and ref[0]["data_used"] == "530000"


def test_table_values_tests_and_markdown(tmp_path):
    run = fabricate(tmp_path / "r")
    table = build_table(run, n_boot=500)
    names = [ln.name for ln in table.lines]
    assert names == [
        "base model (no medical QA)",
        "sft@0.09",
        "sft@0.25",
        "sft@1.0",
        "stllava-med@0.09",
        "LLaVA-Med v1.5",
    ]
    sft9, sft100 = table.lines[1], table.lines[3]
    c9 = sft9.cells[("phantom", "closed_accuracy")]
    c100 = sft100.cells[("phantom", "closed_accuracy")]
    assert c9.summaries["llava-med"].n_seeds == 2 and c9.summaries["llava-med"].method.startswith(
        "t-interval"
    )
    assert c100.summaries["llava-med"].mean > c9.summaries["llava-med"].mean + 20
    assert c9.test.test.startswith("mcnemar") and c9.test.p < 0.001 and c9.test.diff < 0
    assert c100.test is None  # the baseline is not tested against itself
    o9 = sft9.cells[("phantom", "open_recall")]
    assert o9.test.test == "paired-bootstrap" and o9.test.p < 0.01
    assert sft9.data_used == pytest.approx(180.5) and table.n_full == 2000
    st = table.lines[4]
    assert st.data_used == pytest.approx(180.5 + 2600) and st.loss == "sigmoid+sft"
    assert st.pct_full == pytest.approx(100 * 2780.5 / 2000)
    md = to_markdown(table)
    lines = md.splitlines()
    assert lines[0].startswith("| model | loss | labeled QA | pairs | data used (% of full SFT) | seeds |")
    assert "| phantom closed acc | strict | p vs sft@100% |" in lines[0]
    assert any(ln.startswith("| sft@1.0 |") and "(baseline)" in ln for ln in lines)
    assert any(ln.startswith("| LLaVA-Med v1.5 |") and "530K medical samples" in ln for ln in lines)
    assert "McNemar" in md
    assert st.cells[("vqa-rad", "closed_accuracy")].same_fraction_test.p < 0.05  # 72% vs 62% on 240 questions
    assert "stllava-med@0.09 vs sft@0.09 (same labeled data): phantom closed acc +" in md
    wide = list(csv.DictReader(io.StringIO(to_csv(table))))
    assert wide[1]["model"] == "sft@0.09" and float(wide[1]["phantom/closed_accuracy/p_vs_baseline"]) < 0.001


def test_single_seed_shows_bootstrap_ci(tmp_path):
    run = fabricate(tmp_path / "r", seeds=(0,), benches=("phantom",), references=False)
    table = build_table(run, n_boot=200)
    line = table.lines[0]
    s = line.cells[("phantom", "closed_accuracy")].summaries["llava-med"]
    job = run / line.trainer / fraction_dirname(line.fraction) / f"s{line.seeds[0]}"
    stored = json.loads((job / "eval" / "phantom" / "scores.json").read_text())["scorers"]["llava-med"]
    ci = stored["closed_accuracy"]  # the scorer's own clustered bootstrap, shown as stored
    assert s.n_seeds == 1 and (s.ci_low, s.ci_high) == (ci["ci_low"], ci["ci_high"])
    assert f"± {(ci['ci_high'] - ci['ci_low']) / 2:.1f}†" in to_markdown(table)


def test_report_command_writes_all_and_plot(tmp_path, capsys):
    run = fabricate(tmp_path / "r")
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "| sft@0.09 |" in out
    rep = run / "report"
    for name in ("results.csv", "data_efficiency.md", "data_efficiency.csv", "data_efficiency.png"):
        assert (rep / name).stat().st_size > 100
    from PIL import Image

    with Image.open(rep / "data_efficiency.png") as im:
        w, h = im.size
        assert w > 1000 and h > 900  # 2 benchmarks x 2 metrics
        colors = im.convert("RGB").getcolors(maxcolors=1 << 20)
        assert len(colors) > 50  # not a blank canvas
    before = (rep / "results.csv").read_bytes()
    assert main(["report", str(run), "--format", "csv", "--quiet"]) == 0
    assert (rep / "results.csv").read_bytes() == before  # deterministic


def test_report_bad_input(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no scores found" in capsys.readouterr().err
    run = fabricate(tmp_path / "r", seeds=(0,), benches=("phantom",), references=False)
    assert main(["report", str(run), "--format", "pdf"]) == 2
    bad = run / "sft" / "f1.0" / "s0" / "eval" / "phantom" / "scores.json"
    bad.write_text('{"scorers": {"llava-med": {"closed_accuracy": {"n": 3}}}}')
    with pytest.raises(BadInput, match=r"scores\.json.*llava-med\.closed_accuracy"):
        collect(run)


# --- a report never degrades silently (issue 11, items 8 and 10) and corrects for many tests (issue 13) ---


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("medvqa: error: ") and len(err.splitlines()) == 1, err
    return err


def test_null_fields_in_checkpoint_json_fall_back_to_the_folder_names(tmp_path):
    run = fabricate(tmp_path / "r", seeds=(0,), benches=("phantom",), references=False)
    ckpt = run / "sft" / "f0.25" / "s0" / "checkpoint" / "checkpoint.json"
    ckpt.write_text(
        json.dumps({**json.loads(ckpt.read_text()), "seed": None, "fraction": None, "trainer": None})
    )
    line = next(ln for ln in build_table(run, n_boot=50).lines if ln.name == "sft@0.25")
    assert line.seeds == [0] and line.trainer == "sft"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("fraction", "abc", "expected a finite number"),
        ("fraction", 7.0, "must be in (0, 1]"),
        ("seed", "1", "expected an integer"),
        ("n_labeled", "many", "expected a number >= 0"),
        ("n_pairs", -3, "expected a number >= 0"),
        ("trainer", ["sft"], "expected text"),
    ],
)
def test_wrong_types_in_checkpoint_json_are_one_line(tmp_path, capsys, field, value, message):
    run = fabricate(tmp_path / "r", seeds=(0,), benches=("phantom",), references=False)
    ckpt = run / "sft" / "f0.25" / "s0" / "checkpoint" / "checkpoint.json"
    data = json.loads(ckpt.read_text())
    data[field] = value
    ckpt.write_text(json.dumps(data))
    assert main(["report", str(run), "--quiet"]) == 2
    err = _err_line(capsys)
    assert str(ckpt) in err and f"field {field!r}" in err and message in err


@pytest.mark.parametrize(
    ("edit", "field", "message"),
    [
        (
            lambda s: s["scorers"]["llava-med"]["closed_accuracy"].update(value="high"),
            "value",
            "finite number",
        ),
        (lambda s: s["scorers"]["llava-med"]["closed_accuracy"].update(value=float("nan")), "value", "nan"),
        (lambda s: s["scorers"]["strict"]["open_recall"].update(ci_low=float("inf")), "ci_low", "inf"),
        (lambda s: s["scorers"]["llava-med"]["open_recall"].update(n=2.5), "n", "whole number"),
        (lambda s: s["scorers"].update({"strict": [1, 2]}), "scorers.strict", "expected an object"),
        (lambda s: s.update(model=["hf:x"]), "model", "expected an object"),
    ],
)
def test_wrong_types_and_nan_in_scores_json_are_one_line(tmp_path, capsys, edit, field, message):
    run = fabricate(tmp_path / "r", seeds=(0,), benches=("phantom",), references=False)
    path = run / "sft" / "f0.25" / "s0" / "eval" / "phantom" / "scores.json"
    scores = json.loads(path.read_text())
    edit(scores)
    path.write_text(json.dumps(scores))  # json writes NaN / Infinity as Python reads them back
    assert main(["report", str(run), "--quiet"]) == 2
    err = _err_line(capsys)
    assert str(path) in err and field in err and message in err.lower()


def test_a_missing_scores_json_is_reported_per_line_not_dropped(tmp_path, capsys):
    run = fabricate(tmp_path / "r", benches=("phantom", "vqa-rad"), references=False)
    (run / "stllava-med" / "f0.09" / "s1" / "eval" / "vqa-rad" / "scores.json").unlink()
    for seed in (0, 1):  # every eval of sft@0.25 lost its scores: the line must still be there
        for b in ("phantom", "vqa-rad"):
            (run / "sft" / "f0.25" / f"s{seed}" / "eval" / b / "scores.json").unlink()
    shutil.rmtree(run / "sft" / "f0.09" / "s1" / "eval")
    assert main(["report", str(run), "--format", "md,csv"]) == 0
    md = (run / "report" / "data_efficiency.md").read_text()
    assert "| sft@0.25 ⚠ |" in md and "| stllava-med@0.09 ⚠ |" in md and "| sft@1.0 |" in md
    assert "- stllava-med@0.09: seed 1 vqa-rad: no scores.json" in md
    assert "- sft@0.25: seed 0 phantom: no scores.json" in md
    assert "- sft@0.09: seed 1: trained, not evaluated" in md
    wide = {
        r["model"]: r
        for r in csv.DictReader(io.StringIO((run / "report" / "data_efficiency.csv").read_text()))
    }
    assert "seed 1 vqa-rad: no scores.json" in wide["stllava-med@0.09"]["missing"]
    assert wide["sft@0.25"]["phantom/closed_accuracy/llava-med/mean"] == ""


def test_no_baseline_means_no_p_column_and_no_claimed_test(tmp_path):
    run = fabricate(tmp_path / "r", seeds=(0,), benches=("phantom",), references=False)
    md = to_markdown(build_table(run, baseline="sft@0.5", n_boot=100))
    assert "p vs" not in md and "test against" not in md
    assert "No p-values against the baseline sft@0.5: it has no scores in this run" in md
    # what did run (stllava-med@0.09 vs sft@0.09) is still described
    assert "stllava-med@0.09 vs sft@0.09 (same labeled data)" in md and "McNemar" in md


def test_a_missing_scored_jsonl_says_so_instead_of_a_blank_p(tmp_path):
    run = fabricate(tmp_path / "r", seeds=(0, 1), benches=("phantom",), references=False)
    for seed in (0, 1):
        (run / "stllava-med" / "f0.09" / f"s{seed}" / "eval" / "phantom" / "scored.jsonl").unlink()
    (run / "sft" / "f0.25" / "s1" / "eval" / "phantom" / "scored.jsonl").unlink()
    md = to_markdown(build_table(run, n_boot=100))
    row = next(ln for ln in md.splitlines() if ln.startswith("| stllava-med@0.09"))
    assert row.count("n/a‡") == 2  # closed and open
    assert "‡ no test: stllava-med@0.09 phantom closed acc: no scored.jsonl" in md
    assert "- sft@0.25: seed 1 phantom: no scored.jsonl" in md  # the test used seed 0 only
    # no same-fraction test over questions, but the seed-level one needs only scores.json
    assert (
        "stllava-med@0.09 vs sft@0.09 (same labeled data): phantom closed acc "
        "(no test over questions: no scored.jsonl; seeds: "
    ) in md
    assert "McNemar" in md  # the other lines were tested


def _stored(run: Path, trainer: str, fraction: float, seed: int, metric: str) -> float:
    path = run / trainer / fraction_dirname(fraction) / f"s{seed}" / "eval" / "phantom" / "scores.json"
    return json.loads(path.read_text())["scorers"]["llava-med"][metric]["value"]


def test_same_fraction_comparison_has_the_seed_level_test_and_the_gap_recovered(tmp_path):
    seeds = (0, 1, 2)
    run = fabricate(tmp_path / "r", seeds=seeds, benches=("phantom",), references=False)
    table = build_table(run, n_boot=200)
    md = to_markdown(table)
    wide = {r["model"]: r for r in csv.DictReader(io.StringIO(to_csv(table)))}
    st = wide["stllava-med@0.09"]
    for metric, label in (("closed_accuracy", "closed acc"), ("open_recall", "open recall")):
        # per seed, from each run's own scores.json: STLLaVA-Med@9% minus SFT@9% on that seed
        line = {s: _stored(run, "stllava-med", 0.09, s, metric) for s in seeds}
        peer = {s: _stored(run, "sft", 0.09, s, metric) for s in seeds}
        full = {s: _stored(run, "sft", 1.0, s, metric) for s in seeds}
        diffs = [line[s] - peer[s] for s in seeds]
        expected = seed_paired_t(line, peer)
        assert [d for _, d in expected.diffs] == pytest.approx(diffs) and expected.p is not None
        cell = (
            f"seeds: {expected.mean:+.1f} [{expected.ci_low:.1f}, {expected.ci_high:.1f}], p {expected.p:.3f}"
        )
        mean = sum(line.values()) / 3
        peer_mean, full_mean = sum(peer.values()) / 3, sum(full.values()) / 3
        gap = 100 * (mean - peer_mean) / (full_mean - peer_mean)
        assert (
            f"phantom {label} " in md and f"{cell}, n 3; {gap:.0f}% of the gap to sft@100% recovered)" in md
        )
        pre = f"phantom/{metric}/"
        assert float(st[pre + "seed_diff_vs_same_fraction"]) == pytest.approx(sum(diffs) / 3, abs=1e-4)
        assert float(st[pre + "seed_p_vs_same_fraction"]) == pytest.approx(expected.p, rel=1e-5)
        assert float(st[pre + "seed_t_vs_same_fraction"]) == pytest.approx(expected.t, abs=1e-4)
        assert float(st[pre + "seed_ci_low_vs_same_fraction"]) == pytest.approx(expected.ci_low, abs=1e-4)
        assert st[pre + "seed_n_vs_same_fraction"] == "3" and st[pre + "seed_no_test_reason"] == ""
        assert st[pre + "seed_diffs_vs_same_fraction"] == ";".join(
            f"{s}:{d:.4f}" for s, d in zip(seeds, diffs)
        )
        assert float(st[pre + "seed_p_holm_vs_same_fraction"]) >= expected.p
        assert float(st[pre + "gap_recovered_pct_vs_baseline"]) == pytest.approx(gap, abs=0.01)
        # the SFT lines are the comparators, not compared
        assert wide["sft@0.09"][pre + "seed_p_vs_same_fraction"] == ""
        assert wide["sft@0.09"][pre + "gap_recovered_pct_vs_baseline"] == ""
    assert "seeds: paired t-test over seeds, the unit of replication" in md
    assert "p: paired test over questions against sft@100%" in md
    assert "Gap recovered: (line − sft@f) / (sft@100% − sft@f)" in md
    # the seed-level p-values enter the one Holm correction
    n_p = sum(1 for ln in table.lines for c in ln.cells.values() for t in (c.test, c.same_fraction_test) if t)
    assert f"Holm's correction over all {n_p + 2} p-values" in md
    # the new columns sit with their benchmark and metric, after the existing same-fraction ones
    header = next(csv.reader(io.StringIO(to_csv(table))))
    at = header.index("phantom/closed_accuracy/p_holm_vs_same_fraction")
    assert header[at + 1 : at + 3] == [
        "phantom/closed_accuracy/seed_diff_vs_same_fraction",
        "phantom/closed_accuracy/seed_ci_low_vs_same_fraction",
    ]
    assert header[at + 10] == "phantom/closed_accuracy/gap_recovered_pct_vs_baseline"
    assert header[at + 11] == "phantom/open_recall/llava-med/mean"


def test_fewer_than_two_paired_seeds_means_no_seed_level_test_said_so(tmp_path):
    run = fabricate(tmp_path / "r", seeds=(0,), benches=("phantom",), references=False)
    table = build_table(run, n_boot=100)
    md = to_markdown(table)
    diff = _stored(run, "stllava-med", 0.09, 0, "closed_accuracy") - _stored(
        run, "sft", 0.09, 0, "closed_accuracy"
    )
    assert f"seeds: {diff:+.1f}, n 1, no test (1 paired seed, a seed-level test needs 2)" in md
    st = next(r for r in csv.DictReader(io.StringIO(to_csv(table))) if r["model"] == "stllava-med@0.09")
    assert st["phantom/closed_accuracy/seed_p_vs_same_fraction"] == ""
    assert st["phantom/closed_accuracy/seed_n_vs_same_fraction"] == "1"
    assert "needs 2" in st["phantom/closed_accuracy/seed_no_test_reason"]


def test_holm_adjustment():
    from medvqa.reports.stats import holm

    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    assert holm([]) == []


def test_minimum_detectable_effect():
    from medvqa.reports.stats import min_detectable_effect

    # (1.96 + 0.8416) · 50 · sqrt(2 / 100) = 19.81 points
    assert min_detectable_effect(100, 50.0) == pytest.approx(19.81, abs=0.01)
    assert min_detectable_effect(400, 50.0) == pytest.approx(19.81 / 2, abs=0.01)
    assert min_detectable_effect(0, 50.0) is None


def test_table_marks_what_survives_holm_and_states_the_mde(tmp_path):
    run = fabricate(tmp_path / "r", seeds=(0,), benches=("phantom",), references=False)
    table = build_table(run, n_boot=300)
    cells = [c for ln in table.lines for c in ln.cells.values() if c.test]
    assert cells and all(c.p_holm >= c.test.p for c in cells)
    md = to_markdown(table)
    n_p = sum(
        1
        for ln in table.lines
        for c in ln.cells.values()
        for t in (c.test, c.same_fraction_test, c.seed_test)
        if t and t.p is not None
    )
    assert f"Holm's correction over all {n_p} p-values" in md
    sft9 = next(ln for ln in md.splitlines() if ln.startswith("| sft@0.09"))
    assert "<0.001*" in sft9  # 62% vs 93% on 120 closed questions survives any correction
    effect, n, basis = table.mde[("phantom", "closed_accuracy")]
    assert n == 120 and "sft@1.0" in basis and 5 < effect < 20
    assert "Minimum detectable effect" in md and f"phantom closed acc {effect:.1f} points (n 120" in md


# --- accuracy by question category (issue 10, item 6) and the link to the sample viewer (issue 13) ---


def _with_slots(run: Path) -> None:
    """Give every scored row a category (as eval now writes the sample's meta into scored.jsonl)."""
    for f in run.rglob("scored.jsonl"):
        rows = [json.loads(line) for line in f.read_text().splitlines()]
        for r in rows:
            img = int(r["image_id"][3:])
            r["meta"] = {"slot": "organ" if img % 2 else "presence", "n_lesions": img}  # n_lesions: 60 values
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_accuracy_by_category_from_the_scored_meta(tmp_path):
    from medvqa.reports import categories

    run = fabricate(tmp_path / "r", seeds=(0, 1), benches=("phantom",), references=False)
    _with_slots(run)
    table = build_table(run, n_boot=50)
    tables = categories.category_tables(table)
    assert [(t.benchmark, t.field) for t in tables] == [("phantom", "slot")]  # n_lesions: too many values
    t = tables[0]
    assert t.columns == ["sft@0.09", "sft@0.25", "sft@1.0", "stllava-med@0.09"]
    assert t.deltas == [("stllava-med@0.09", "sft@0.09")]
    by_key = {(r.value, r.answer_type): r for r in t.rows}
    assert set(by_key) == {
        ("organ", "CLOSED"),
        ("organ", "OPEN"),
        ("presence", "CLOSED"),
        ("presence", "OPEN"),
    }
    expected = []
    for seed in (0, 1):
        rows = [
            json.loads(x)
            for x in (run / "sft" / "f0.09" / f"s{seed}" / "eval" / "phantom" / "scored.jsonl").open()
        ]
        vals = [
            r["llava-med"]["closed_accuracy"]
            for r in rows
            if r["meta"]["slot"] == "organ" and r["answer_type"] == "CLOSED"
        ]
        expected.append(sum(vals) / len(vals))
    organ = by_key[("organ", "CLOSED")]
    assert organ.n == 60 and organ.means["sft@0.09"] == pytest.approx(sum(expected) / 2)
    md = categories.to_markdown(tables, "llava-med")
    delta = organ.means["stllava-med@0.09"] - organ.means["sft@0.09"]
    assert "**phantom** by `slot`" in md and "Δ stllava-med@0.09 − sft@0.09" in md
    assert f"| organ | closed | 60 | {organ.means['sft@0.09']:.1f} |" in md and f"{delta:+.1f} |" in md
    long = list(csv.DictReader(io.StringIO(categories.to_csv(tables, "llava-med"))))
    assert len(long) == 4 * 4 and {r["metric"] for r in long} == {"closed_accuracy", "open_recall"}


def test_report_has_the_breakdown_and_links_the_sample_viewer(tmp_path, capsys):
    run = fabricate(tmp_path / "r", seeds=(0,), benches=("phantom",), references=False)
    _with_slots(run)
    assert main(["report", str(run), "--format", "md,csv,html", "--quiet"]) == 0
    rep = run / "report"
    md = (rep / "data_efficiency.md").read_text()
    assert "## Accuracy by question category" in md and (rep / "by_category.csv").is_file()
    assert "Samples: [samples.html](samples.html) — stllava-med@0.09 beside sft@0.09 (seed 0)" in md
    page = (rep / "samples.html").read_text()
    assert "medvqa samples: stllava-med@0.09 vs sft@0.09" in page and page.count("<script") == 2
    data = json.loads(page.split('id="medvqa-data">', 1)[1].split("</script>", 1)[0])
    assert (
        data["sides"] == ["stllava-med@0.09 (seed 0)", "sft@0.09 (seed 0)"]
        and len(data["items"]) == N_IMAGES * 4
    )
    assert data["categories"]["slot"] == ["organ", "presence"]


def test_no_category_metadata_is_said_not_hidden(tmp_path):
    from medvqa.reports import categories

    run = fabricate(tmp_path / "r", seeds=(0,), benches=("phantom",), references=False)
    table = build_table(run, n_boot=50)
    assert categories.category_tables(table) == []
    assert "No per-category breakdown" in categories.to_markdown([], "llava-med")


def test_mde_of_a_baseline_without_spread_uses_the_pooled_spread(tmp_path):
    run = fabricate(tmp_path / "r", seeds=(0,), benches=("phantom",), references=False)
    scored = run / "sft" / "f1.0" / "s0" / "eval" / "phantom" / "scored.jsonl"
    rows = [json.loads(x) for x in scored.read_text().splitlines()]
    for r in rows:
        if "open_recall" in r["llava-med"]:
            r["llava-med"]["open_recall"] = 0.0  # every open question alike: sd 0
    scored.write_text("".join(json.dumps(r) + "\n" for r in rows))
    effect, _n, basis = build_table(run, n_boot=50).mde[("phantom", "open_recall")]
    assert "pooled over the lines" in basis and effect > 1


@pytest.mark.parametrize(
    ("line", "field"),
    [('{"id": [1], "llava-med": {}}', "id"), ("[1, 2]", None), ('{"id": "q", "meta": "CT"}', "meta")],
)
def test_a_hostile_scored_row_is_one_line(tmp_path, capsys, line, field):
    run = fabricate(tmp_path / "r", seeds=(0,), benches=("phantom",), references=False)
    scored = run / "sft" / "f1.0" / "s0" / "eval" / "phantom" / "scored.jsonl"
    scored.write_text(scored.read_text() + line + "\n")
    assert main(["report", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(scored) in err and f"line {N_IMAGES * 4 + 1}" in err
    assert field is None or f"field {field!r}" in err


def test_slake_categories_flow_from_the_loader_to_the_report(tmp_path):
    """SLAKE's own content_type and modality reach scored.jsonl through score_samples, and the report."""
    from medvqa.io import atomic_write_json, atomic_write_jsonl
    from medvqa.registry import benchmarks
    from medvqa.reports import categories
    from medvqa.scoring import score_samples

    from tests import real_fixtures as fx

    root = fx.make_slake(tmp_path / "data")
    recs = fx.slake_records("test")
    for i, r in enumerate(recs):
        r["content_type"] = ("Organ", "Modality", "Position")[i % 3]
        r["modality"] = ("CT", "MRI")[i % 2]
    fx.write_json(root / "Slake1.0" / "test.json", recs)
    samples = benchmarks.get("slake")().load("test", root)
    assert {s.meta["content_type"] for s in samples} == {"Organ", "Modality", "Position"}
    for trainer, frac, right in (("sft", 1.0, True), ("sft", 0.09, False), ("stllava-med", 0.09, True)):
        ev = tmp_path / "run" / trainer / f"f{frac!r}" / "s0" / "eval" / "slake"
        result = score_samples(samples, [s.answer if right else "nothing" for s in samples], n_boot=0)
        atomic_write_jsonl(ev / "scored.jsonl", result.rows)
        atomic_write_json(ev / "scores.json", {"benchmark": "slake", **result.to_json()})
    tables = categories.category_tables(build_table(tmp_path / "run", n_boot=20))
    assert [t.field for t in tables] == ["content_type", "modality"]
    organ = next(r for r in tables[0].rows if r.value == "Organ")
    assert organ.means == {"sft@0.09": 0.0, "sft@1.0": 100.0, "stllava-med@0.09": 100.0}


@pytest.mark.parametrize("spec", ["sft@abc", "sft@7", "@1.0", "sft@nan"])
def test_a_bad_baseline_is_one_line(tmp_path, capsys, spec):
    run = fabricate(tmp_path / "r", seeds=(0,), benches=("phantom",), references=False)
    assert main(["report", str(run), "--baseline", spec, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--baseline" in err


def test_a_sweep_json_that_is_not_an_object_does_not_break_the_report(tmp_path):
    run = fabricate(tmp_path / "r", seeds=(0,), benches=("phantom",), references=False)
    (run / "sweep.json").write_text("[1, 2]")
    assert main(["report", str(run), "--format", "md", "--quiet"]) == 0


def test_evals_a_sweep_moved_aside_are_not_results(tmp_path):
    """A rerun with other settings moves the old eval to `<name>.stale-<key>` (sweeps.state): the
    report and the viewer read only the current one, not both as two evals of one benchmark."""
    import shutil

    from medvqa.layout import stale_name
    from medvqa.reports.viewer import find_evals

    run = fabricate(tmp_path / "myrun")
    before = collect(run)
    seed_dir = run / "stllava-med" / "f0.09" / "s1"
    current = seed_dir / "eval" / "vqa-rad"
    shutil.copytree(current, current.with_name(stale_name("vqa-rad", "0123abcd")))
    assert collect(run) == before
    evals = find_evals(seed_dir)
    assert current in evals and not any(".stale-" in p.name for p in evals)


def test_the_legend_has_as_many_columns_as_fit_the_figure():
    """The demo's six entries (up to 49 characters) made four columns wider than the figure, cut at
    both edges; the legend now takes as many as fit."""
    from medvqa.reports.plots import _legend_columns

    demo = ["sft", "stllava-med (loss: sigmoid+sft)", "stllava-med-model-judge (loss: sigmoid+sft)",
            "sft-compute-control (loss: nll (completion only))", "base model (align), no medical QA"]  # fmt: skip
    assert _legend_columns(demo, 10.4) == 2
    assert _legend_columns(["sft", "stllava-med", "base"], 10.4) == 3
    assert _legend_columns(["a", "b", "c", "d", "e"], 10.4) == 4
    assert _legend_columns(demo, 2.0) == 1


def test_two_lines_at_the_same_data_share_one_fraction_label(tmp_path, monkeypatch):
    """A line at the same data as another (the demo's compute control beside SFT@9%) does not
    print its "9%" over the other's: one fraction label per point of an axis."""
    import shutil

    from matplotlib.axes import Axes

    run = fabricate(tmp_path / "r", seeds=(0,), benches=("phantom",), references=False)
    shutil.copytree(run / "sft" / fraction_dirname(0.09), run / "sft-control" / fraction_dirname(0.09))
    seen: list[tuple[int, str, tuple]] = []
    real = Axes.annotate

    def spy(self, text, xy, *args, **kwargs):
        seen.append((id(self), text, tuple(xy)))
        return real(self, text, xy, *args, **kwargs)

    monkeypatch.setattr(Axes, "annotate", spy)
    assert main(["report", str(run), "--format", "png", "--quiet"]) == 0
    per_axis = [(axis, text, xy[0]) for axis, text, xy in seen]
    assert seen and len(per_axis) == len(set(per_axis))  # before: each axis had its "9%" twice there
