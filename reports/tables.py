"""The data-efficiency table: how much medical data each method needs, with uncertainty and tests.

One line per trainer@fraction (seeds pooled), plus reference lines (external checkpoints with a
user-stated data amount, the base model with none). Columns: the medical data used (labeled QA +
preference pairs, and its share of the full SFT set), then for each benchmark closed accuracy and
open recall — mean ± 95% CI over seeds under the `llava-med` scorer, the `strict` scorer beside it —
and a paired test of the line against SFT@100% (McNemar on closed questions, paired bootstrap on
open ones, questions matched by id), and the loss that produced the line. A trainer line is also
compared with the baseline trainer at its own fraction (same labeled data): the same item-level
test, a paired t-test over seeds (the seed, one training run, is the unit of replication: a
method comparison claims nothing from one run's questions alone), and the share of the gap
between the two baseline-trainer lines that it recovers.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medvqa.errors import BadInput
from medvqa.io import atomic_write_text, read_json
from medvqa.reports.results import EvalRecord, Gap, collect_run
from medvqa.reports.stats import (
    MIN_PAIRED_SEEDS,
    SeedSummary,
    SeedTest,
    TestResult,
    format_p,
    holm,
    load_scored,
    min_detectable_effect,
    paired_test,
    seed_mean_ci,
    seed_paired_t,
)

METRICS: tuple[str, ...] = ("closed_accuracy", "open_recall")
METRIC_LABELS = {
    "closed_accuracy": "closed acc",
    "open_recall": "open recall",
    "open_f1": "open F1",
    "open_exact_match": "open EM",
    "open_precision": "open precision",
}


ALPHA = 0.05
# per benchmark and metric, after the same-fraction item-level columns: the paired t over seeds
# against the same-fraction line (mean difference, its CI, t, p, Holm p, n, each seed's difference,
# why no test) and the gap recovered toward the baseline
SEED_COLUMNS: tuple[str, ...] = (
    "seed_diff_vs_same_fraction",
    "seed_ci_low_vs_same_fraction",
    "seed_ci_high_vs_same_fraction",
    "seed_t_vs_same_fraction",
    "seed_p_vs_same_fraction",
    "seed_p_holm_vs_same_fraction",
    "seed_n_vs_same_fraction",
    "seed_diffs_vs_same_fraction",
    "seed_no_test_reason",
    "gap_recovered_pct_vs_baseline",
)


@dataclass
class Cell:
    summaries: dict[str, SeedSummary] = field(default_factory=dict)  # scorer -> mean/CI over seeds
    test: TestResult | None = None  # against the baseline (SFT@100%)
    same_fraction_test: TestResult | None = None  # against the baseline trainer at this line's fraction
    test_note: str = ""  # why there is no test against the baseline (when the baseline is there)
    same_fraction_note: str = ""  # why there is no item-level same-fraction test (when the peer is there)
    seed_test: SeedTest | None = None  # paired t over seeds against the same-fraction line
    p_holm: float | None = None  # Holm-adjusted over every p-value of the table
    same_fraction_p_holm: float | None = None
    seed_p_holm: float | None = None
    gap_recovered: float | None = None  # % of (baseline − same-fraction line) this line recovers
    gap_note: str = ""  # why there is no gap recovered (when both comparators are there)


@dataclass
class Line:
    kind: str
    label: str
    trainer: str
    fraction: float | None
    seeds: list[int]
    records: list[EvalRecord]
    n_labeled: float | None = None
    n_pairs: float | None = None
    data_used: float | None = None
    data_label: str = ""
    pct_full: float | None = None
    loss: str = ""
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)  # (benchmark, metric)
    missing: list[str] = field(default_factory=list)  # what this line lacks, one phrase each

    @property
    def name(self) -> str:
        if self.kind == "sweep":
            return f"{self.label}@{float(self.fraction)!r}"
        return self.label


@dataclass
class Table:
    lines: list[Line]
    benchmarks: list[str]
    metrics: tuple[str, ...]
    scorer: str
    side_scorer: str | None
    baseline: str
    n_full: int | None
    baseline_present: bool = True
    mde: dict[tuple[str, str], tuple[float, int, str]] = field(default_factory=dict)  # (bench, metric)
    scored: dict[Path, list[dict[str, Any]]] = field(default_factory=dict, repr=False)  # eval dir -> rows
    run_dir: Path | None = None


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _trainer_order(run_dir: Path) -> list[str]:
    meta = run_dir / "sweep.json"
    if meta.is_file():
        try:
            return [t.get("label") or t.get("name") for t in read_json(meta).get("trainers", [])]
        except Exception:  # a report never fails on optional metadata
            return []
    return []


def _n_full(run_dir: Path, records: list[EvalRecord], baseline: tuple[str, float]) -> int | None:
    for r in records:
        if r.kind == "sweep" and r.label == baseline[0] and r.fraction == baseline[1] and r.n_labeled:
            return r.n_labeled
    meta = run_dir / "sweep.json"
    if meta.is_file():
        data = read_json(meta)
        n = data.get("n_train_full") if isinstance(data, dict) else None
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n
    return None


def parse_baseline(spec: str) -> tuple[str, float]:
    """`sft@1.0` → ("sft", 1.0); `sft` means `sft@1.0`."""
    label, _, frac = spec.partition("@")
    try:
        fraction = float(frac or 1.0)
    except ValueError:
        fraction = math.nan
    if not label or not 0 < fraction <= 1:
        raise BadInput(
            f"--baseline {spec!r}: expected LABEL@FRACTION with a fraction in (0, 1], e.g. sft@1.0"
        )
    return label, fraction


def build_table(
    run_dir: str | Path,
    *,
    scorer: str = "llava-med",
    side_scorer: str | None = "strict",
    baseline: str = "sft@1.0",
    metrics: tuple[str, ...] = METRICS,
    n_boot: int = 2000,
) -> Table:
    run_dir = Path(run_dir)
    records, gaps = collect_run(run_dir)
    base_key = parse_baseline(baseline)
    n_full = _n_full(run_dir, records, base_key)

    groups: dict[tuple[str, str, float | None], list[EvalRecord]] = defaultdict(list)
    for r in records:
        groups[r.group].append(r)
    gaps_of: dict[tuple[str, str, float | None], list[Gap]] = defaultdict(list)
    for g in gaps:
        gaps_of[g.group].append(g)

    order = _trainer_order(run_dir)
    kind_rank = {"base": 0, "sweep": 1, "reference": 2}

    def sort_key(key: tuple[str, str, float | None]) -> tuple[Any, ...]:
        kind, label, fraction = key
        t_rank = order.index(label) if label in order else len(order)
        return (kind_rank.get(kind, 3), t_rank, label, fraction if fraction is not None else -1.0)

    benchmarks = sorted({r.benchmark for r in records})
    scored_cache: dict[Path, list[dict[str, Any]]] = {}

    def scored_by_seed(recs: list[EvalRecord], bench: str) -> dict[Any, list[dict[str, Any]]]:
        """Rows per seed, for the seeds whose eval kept its scored.jsonl."""
        out = {}
        for r in recs:
            if r.benchmark != bench:
                continue
            if r.eval_dir not in scored_cache:
                scored_cache[r.eval_dir] = load_scored(r.eval_dir)
            if scored_cache[r.eval_dir]:
                out[r.seed if r.seed is not None else 0] = scored_cache[r.eval_dir]
        return out

    def no_test_reason(
        a_recs: list[EvalRecord], bench: str, b_recs: list[EvalRecord], b_name: str = "the baseline"
    ) -> str:
        if not scored_by_seed(a_recs, bench):
            return "no scored.jsonl"
        if not scored_by_seed(b_recs, bench):
            return f"{b_name} has no scored.jsonl for {bench}"
        return f"no question in common with {b_name}"

    base_records = groups.get(("sweep", base_key[0], base_key[1]), [])
    for key in list(gaps_of):  # a line whose every eval is missing is still a line
        if key not in groups:
            groups[key] = []
    lines: list[Line] = []
    for key in sorted(groups, key=sort_key):
        recs = groups[key]
        kind, label, fraction = key
        if not recs:
            gs = gaps_of[key]
            seeds = sorted({g.seed for g in gs if g.seed is not None})
            line = Line(kind=kind, label=label, trainer=label, fraction=fraction, seeds=seeds, records=[])
            line.missing = [_gap_text(g) for g in gs]
            lines.append(line)
            continue
        first = recs[0]
        seeds = sorted(
            {r.seed for r in recs if r.seed is not None}
            | {g.seed for g in gaps_of[key] if g.seed is not None}
        )
        # one value per seed (checkpoint.json is per seed; each seed has one checkpoint)
        per_seed = {r.seed: r for r in recs}
        n_lab = _mean([r.n_labeled for r in per_seed.values() if r.n_labeled is not None])
        n_pairs = _mean([r.n_pairs for r in per_seed.values() if r.n_pairs is not None])
        if kind == "sweep":
            data_used = (n_lab or 0) + (n_pairs or 0) if n_lab is not None else None
        else:
            data_used = first.data_used
        line = Line(
            kind=kind,
            label=label,
            trainer=first.trainer,
            fraction=fraction,
            seeds=seeds,
            records=recs,
            n_labeled=n_lab,
            n_pairs=n_pairs if kind == "sweep" else None,
            data_used=data_used,
            data_label=first.data_label,
            loss=" / ".join(sorted({r.loss for r in recs if r.loss})),
        )
        if data_used is not None and n_full:
            line.pct_full = 100.0 * data_used / n_full
        line.missing = [_gap_text(g) for g in gaps_of[key]]
        for r in recs:
            if not (r.eval_dir / "scored.jsonl").is_file():
                seed = f"seed {r.seed} " if r.seed is not None else ""
                line.missing.append(f"{seed}{r.benchmark}: no scored.jsonl (no paired test from this eval)")
        for bench in benchmarks:
            brecs = [r for r in recs if r.benchmark == bench]
            if not brecs:
                continue
            for metric in metrics:
                cell = Cell()
                for sc in (scorer, side_scorer):
                    if sc is None:
                        continue
                    vals, ci = [], (None, None)
                    for r in brecs:
                        mv = (r.scores["scorers"].get(sc) or {}).get(metric)
                        if isinstance(mv, dict) and mv.get("value") is not None:
                            vals.append(float(mv["value"]))
                            ci = (mv.get("ci_low"), mv.get("ci_high"))
                    if vals:
                        cell.summaries[sc] = seed_mean_ci(vals, ci if len(vals) == 1 else (None, None))
                if (
                    scorer in cell.summaries
                    and base_records
                    and not (kind == "sweep" and (label, fraction) == base_key)
                ):
                    cell.test = paired_test(
                        scored_by_seed(brecs, bench),
                        scored_by_seed(base_records, bench),
                        scorer,
                        metric,
                        n_boot=n_boot,
                    )
                    if cell.test is None:
                        cell.test_note = no_test_reason(brecs, bench, base_records)
                peer = groups.get(("sweep", base_key[0], fraction))
                if kind == "sweep" and label != base_key[0] and peer and scorer in cell.summaries:
                    cell.same_fraction_test = paired_test(
                        scored_by_seed(brecs, bench),
                        scored_by_seed(peer, bench),
                        scorer,
                        metric,
                        n_boot=n_boot,
                    )
                    if cell.same_fraction_test is None:
                        cell.same_fraction_note = no_test_reason(
                            brecs, bench, peer, f"{base_key[0]}@{float(fraction)!r}"
                        )
                    cell.seed_test = seed_paired_t(
                        _seed_values(brecs, bench, scorer, metric), _seed_values(peer, bench, scorer, metric)
                    )
                if cell.summaries:
                    line.cells[(bench, metric)] = cell
        lines.append(line)
    table = Table(lines, benchmarks, metrics, scorer, side_scorer, baseline, n_full)
    table.baseline_present = bool(base_records)
    table.scored = scored_cache
    table.run_dir = run_dir
    _gap_recovered(table)
    _adjust_holm(table)
    table.mde = _mde(table, base_records, scored_by_seed)
    return table


def _seed_values(recs: list[EvalRecord], bench: str, scorer: str, metric: str) -> dict[int, float]:
    """The stored value of `metric` on `bench` per seed (each run's own score, from scores.json)."""
    out = {}
    for r in recs:
        if r.benchmark != bench:
            continue
        mv = (r.scores["scorers"].get(scorer) or {}).get(metric)
        if isinstance(mv, dict) and mv.get("value") is not None:
            out[r.seed if r.seed is not None else 0] = float(mv["value"])
    return out


def _gap_recovered(table: Table) -> None:
    """Per trainer line and cell: (line − baseline trainer at its fraction) / (baseline − that line),
    in percent, from the seed means: how much of what the missing labeled data costs the line wins back."""
    base_label, base_fraction = parse_baseline(table.baseline)
    by_key = {(ln.kind, ln.label, ln.fraction): ln for ln in table.lines}
    base = by_key.get(("sweep", base_label, base_fraction))
    if base is None:
        return
    for line in table.lines:
        peer = by_key.get(("sweep", base_label, line.fraction))
        if line.kind != "sweep" or line.label == base_label or peer is None or peer is base:
            continue
        for key, cell in line.cells.items():
            means = [
                c.summaries[table.scorer].mean if c and table.scorer in c.summaries else None
                for c in (cell, peer.cells.get(key), base.cells.get(key))
            ]
            a, p, b = means
            if a is None or p is None or b is None:
                continue
            if b - p <= 0:
                cell.gap_note = f"{peer.name} is not below {base.name}: no gap to recover"
                continue
            cell.gap_recovered = 100.0 * (a - p) / (b - p)


def _gap_text(g: Gap) -> str:
    where = " ".join(x for x in (f"seed {g.seed}" if g.seed is not None else "", g.benchmark or "") if x)
    return f"{where}: {g.what}" if where else g.what


def _adjust_holm(table: Table) -> None:
    """Holm over every p-value the table shows (tests against the baseline, same-fraction tests over
    questions and over seeds)."""
    slots = []
    for line in table.lines:
        for cell in line.cells.values():
            if cell.test is not None:
                slots.append((cell, "p_holm", cell.test.p))
            if cell.same_fraction_test is not None:
                slots.append((cell, "same_fraction_p_holm", cell.same_fraction_test.p))
            if cell.seed_test is not None and cell.seed_test.p is not None:
                slots.append((cell, "seed_p_holm", cell.seed_test.p))
    for (cell, attr, _), adjusted in zip(slots, holm([p for _, _, p in slots])):
        setattr(cell, attr, adjusted)


def _mde(
    table: Table, base_records: list[EvalRecord], scored_by_seed: Any
) -> dict[tuple[str, str], tuple[float, int, str]]:
    """Per benchmark and metric: (minimum detectable effect in points, n, where the spread came from)."""
    out = {}
    base_name = table.baseline
    for bench in table.benchmarks:
        for metric in table.metrics:
            ns = [
                int(mv["n"])
                for ln in table.lines
                for r in ln.records
                if r.benchmark == bench
                and isinstance(mv := (r.scores["scorers"].get(table.scorer) or {}).get(metric), dict)
                and mv.get("n")
            ]
            if not ns:
                continue
            n = max(ns)
            # the spread of per-question scores: the baseline's, else pooled over every line (a
            # baseline that scores every question alike has no spread to plan with), else the bound
            sd, basis = 0.0, ""
            pooled = [r for ln in table.lines for r in ln.records]
            for recs, where in ((base_records, f"from {base_name}"), (pooled, "pooled over the lines")):
                vals = [
                    float(v)
                    for rows in scored_by_seed(recs, bench).values()
                    for row in rows
                    if isinstance(row.get(table.scorer), dict)
                    and isinstance(v := row[table.scorer].get(metric), int | float)
                ]
                if len(vals) > 1:
                    mean = sum(vals) / len(vals)
                    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
                    if sd > 0:
                        basis = f"sd {sd:.0f} {where}"
                        break
            if sd <= 0:
                sd, basis = 50.0, "sd 50, the most a 0-100 score can have"
            effect = min_detectable_effect(n, sd)
            if effect is not None:
                out[(bench, metric)] = (effect, n, basis)
    return out


def _num(x: float | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return f"{x:.{digits}f}"


def _count(x: float | None) -> str:
    if x is None:
        return ""
    return f"{round(x):,}"


def _data_cell(line: Line) -> str:
    if line.data_label:
        return line.data_label
    if line.data_used is None:
        return ""
    pct = f" ({line.pct_full:.0f}%)" if line.pct_full is not None else ""
    if line.pct_full is not None and line.pct_full < 10:
        pct = f" ({line.pct_full:.1f}%)"
    return f"{_count(line.data_used)}{pct}"


def _value_cell(s: SeedSummary | None) -> str:
    if s is None:
        return ""
    if s.ci_low is None or s.ci_high is None:
        return _num(s.mean)
    half = (float(s.ci_high) - float(s.ci_low)) / 2
    mark = "†" if s.n_seeds == 1 else ""
    return f"{_num(s.mean)} ± {_num(half)}{mark}"


def _p_cell(p: float, adjusted: float | None) -> str:
    return format_p(p) + ("*" if adjusted is not None and adjusted < ALPHA else "")


def to_markdown(table: Table) -> str:
    base_name = table.baseline.replace("@1.0", "@100%")
    base_key = parse_baseline(table.baseline)
    tested = table.baseline_present
    head = ["model", "loss", "labeled QA", "pairs", "data used (% of full SFT)", "seeds"]
    for bench in table.benchmarks:
        for metric in table.metrics:
            head.append(f"{bench} {METRIC_LABELS.get(metric, metric)}")
            if table.side_scorer:
                head.append(table.side_scorer)
            if tested:
                head.append(f"p vs {base_name}")
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["--:"] * (len(head) - 1)) + "|"]
    untested: list[str] = []
    for line in table.lines:
        cells = [
            line.name + (" ⚠" if line.missing else ""),
            line.loss,
            _count(line.n_labeled),
            _count(line.n_pairs),
            _data_cell(line),
            str(len(line.seeds) or 1),
        ]
        for bench in table.benchmarks:
            for metric in table.metrics:
                cell = line.cells.get((bench, metric))
                cells.append(_value_cell(cell.summaries.get(table.scorer)) if cell else "—")
                if table.side_scorer:
                    side = cell.summaries.get(table.side_scorer) if cell else None
                    cells.append(_num(side.mean) if side else "—")
                if not tested:
                    continue
                if line.kind == "sweep" and (line.label, line.fraction) == base_key:
                    cells.append("(baseline)")
                elif cell and cell.test:
                    cells.append(_p_cell(cell.test.p, cell.p_holm))
                elif cell and cell.test_note:
                    cells.append("n/a‡")
                    untested.append(
                        f"{line.name} {bench} {METRIC_LABELS.get(metric, metric)}: {cell.test_note}"
                    )
                else:
                    cells.append("—")
        out.append("| " + " | ".join(cells) + " |")
    tests = [
        (line, bench, metric, cell)
        for line in table.lines
        for (bench, metric), cell in line.cells.items()
        if cell.test is not None or cell.same_fraction_test is not None or _seed_p(cell) is not None
    ]
    n_items = sum((c.test is not None) + (c.same_fraction_test is not None) for *_, c in tests)
    n_p = n_items + sum(_seed_p(c) is not None for *_, c in tests)
    base_label = base_key[0]
    singles = any(
        s.n_seeds == 1 for ln in table.lines for c in ln.cells.values() for s in c.summaries.values()
    )
    notes = [
        "",
        f"Scores in percent, `{table.scorer}` scorer (LLaVA-Med's published convention)"
        + (f"; `{table.side_scorer}` scorer beside it." if table.side_scorer else "."),
        "Value ± half-width of the 95% CI: Student-t over seeds"
        + ("; † one seed, so the 95% bootstrap CI over images of that run." if singles else "."),
    ]
    if not tested:
        notes.append(
            f"No p-values against the baseline {table.baseline}: it has no scores in this run "
            "(name another line with --baseline)."
        )
    if n_items:
        notes.append(
            "p: paired test over questions"
            + (f" against {base_name}" if tested else "")
            + " and of each same-fraction comparison, on the same questions (McNemar for closed "
            "accuracy, exact binomial below 25 discordant pairs; paired bootstrap over images for "
            "open recall), seeds paired with seeds: does the difference hold over these runs' questions."
        )
    if any(c.seed_test is not None for ln in table.lines for c in ln.cells.values()):
        notes.append(
            f"seeds: paired t-test over seeds, the unit of replication (per seed the line's score minus "
            f"{base_label}'s at the same fraction, same seed, benchmark and metric): mean difference "
            f"[95% Student-t CI, df = n − 1], two-sided p, n paired seeds, no test below "
            f"{MIN_PAIRED_SEEDS}: does the difference hold over training runs."
        )
    if any(c.gap_recovered is not None or c.gap_note for ln in table.lines for c in ln.cells.values()):
        notes.append(
            f"Gap recovered: (line − {base_label}@f) / ({base_name} − {base_label}@f) from the seed means, "
            f"the share of what {base_label} loses by training on fraction f alone that the line wins back."
        )
    if n_p:
        flagged = [
            (
                f"{line.name} {bench} {METRIC_LABELS.get(metric, metric)}" + which,
                p,
                adj,
            )
            for line, bench, metric, cell in tests
            for which, t, adj in (
                ("", cell.test, cell.p_holm),
                (" (same fraction)", cell.same_fraction_test, cell.same_fraction_p_holm),
                (" (same fraction, seeds)", cell.seed_test, cell.seed_p_holm),
            )
            if t is not None and (p := t.p) is not None and adj is not None
        ]
        kept = sum(adj < ALPHA for _, _, adj in flagged)
        lost = [name for name, p, adj in flagged if p < ALPHA <= adj]
        notes.append(
            f"\\* still significant at α = {ALPHA} after Holm's correction over all {n_p} p-values of this "
            f"report: {kept} of {n_p}; "
            + (f"significant only before the correction: {', '.join(lost)}." if lost else "none lost by it.")
        )
    if untested:
        notes.append("‡ no test: " + "; ".join(untested) + ".")
    notes += _same_fraction_notes(table)
    if table.mde:
        parts = []
        for bench in table.benchmarks:
            for metric in table.metrics:
                if (bench, metric) in table.mde:
                    effect, n, basis = table.mde[(bench, metric)]
                    parts.append(
                        f"{bench} {METRIC_LABELS.get(metric, metric)} {effect:.1f} points (n {n:,}, {basis})"
                    )
        notes.append(
            "Minimum detectable effect (two-sided α = 0.05, 80% power, two independent runs of n questions; "
            "paired tests on the same questions detect less, clustering by image needs more): "
            + "; ".join(parts)
            + "."
        )
    notes.append(
        "Data used = labeled QA + preference pairs"
        + (f"; % of the full SFT set ({table.n_full:,} labeled QA)." if table.n_full else ".")
    )
    missing = [(line.name, m) for line in table.lines for m in line.missing]
    if missing:
        notes += ["", "⚠ Missing (a line's means use only what is there):"]
        notes += [f"- {name}: {m}" for name, m in missing]
    return "\n".join(out + notes) + "\n"


def _seed_p(cell: Cell) -> float | None:
    return cell.seed_test.p if cell.seed_test is not None else None


def _seed_part(t: SeedTest, adjusted: float | None) -> str:
    """`seeds: +11.4 [-4.2, 27.0], p 0.089, n 3`, or what there is and why there is no test."""
    if t.p is None or t.ci_low is None or t.ci_high is None:
        mean = f"{t.mean:+.1f}, " if t.mean is not None else ""
        return f"seeds: {mean}n {t.n}, no test ({t.note})"
    return f"seeds: {t.mean:+.1f} [{t.ci_low:.1f}, {t.ci_high:.1f}], p {_p_cell(t.p, adjusted)}, n {t.n}"


def _same_fraction_notes(table: Table) -> list[str]:
    """One sentence per non-baseline trainer line against the baseline trainer on the same labeled
    data: the item-level test, the seed-level test and the gap recovered, per benchmark and metric."""
    base_label = parse_baseline(table.baseline)[0]
    base_name = table.baseline.replace("@1.0", "@100%")
    out = []
    for line in table.lines:
        parts = []
        for (bench, metric), cell in line.cells.items():
            t, st = cell.same_fraction_test, cell.seed_test
            if t is None and st is None:
                continue
            name = f"{bench} {METRIC_LABELS.get(metric, metric)}"
            if t is not None:
                head = f"{name} {t.diff:+.1f} points"
                inner = [f"p {_p_cell(t.p, cell.same_fraction_p_holm)} over questions"]
            else:
                head = name
                inner = [f"no test over questions: {cell.same_fraction_note}"]
            if st is not None:
                inner.append(_seed_part(st, cell.seed_p_holm))
            if cell.gap_recovered is not None:
                inner.append(f"{cell.gap_recovered:.0f}% of the gap to {base_name} recovered")
            elif cell.gap_note:
                inner.append(cell.gap_note)
            parts.append(f"{head} ({'; '.join(inner)})")
        if parts:
            out.append(
                f"{line.name} vs {base_label}@{float(line.fraction)!r} (same labeled data): "
                + ", ".join(parts)
                + "."
            )
    return out


def csv_columns(table: Table) -> list[str]:
    cols = [
        "model",
        "kind",
        "trainer",
        "fraction",
        "n_seeds",
        "seeds",
        "loss",
        "n_labeled",
        "n_pairs",
        "data_used",
        "pct_of_full_sft",
        "data_label",
    ]
    for bench in table.benchmarks:
        for metric in table.metrics:
            for sc in (table.scorer, table.side_scorer):
                if sc:
                    cols += [f"{bench}/{metric}/{sc}/{x}" for x in ("mean", "ci_low", "ci_high", "ci_method")]
            cols += [
                f"{bench}/{metric}/{x}"
                for x in ("test", "diff_vs_baseline", "p_vs_baseline", "p_holm_vs_baseline", "no_test_reason")
            ]
            cols += [
                f"{bench}/{metric}/{x}"
                for x in ("diff_vs_same_fraction", "p_vs_same_fraction", "p_holm_vs_same_fraction")
            ]
            cols += [f"{bench}/{metric}/{x}" for x in SEED_COLUMNS]
    return [*cols, "missing"]


def to_csv(table: Table) -> str:
    cols = csv_columns(table)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for line in table.lines:
        row: dict[str, Any] = {
            "model": line.name,
            "kind": line.kind,
            "trainer": line.trainer,
            "fraction": "" if line.fraction is None else f"{line.fraction:g}",
            "n_seeds": len(line.seeds) or 1,
            "seeds": ";".join(map(str, line.seeds)),
            "loss": line.loss,
            "n_labeled": _num(line.n_labeled, 1),
            "n_pairs": _num(line.n_pairs, 1),
            "data_used": _num(line.data_used, 1),
            "pct_of_full_sft": _num(line.pct_full, 2),
            "data_label": line.data_label,
            "missing": "; ".join(line.missing),
        }
        for (bench, metric), cell in line.cells.items():
            for sc, s in cell.summaries.items():
                row[f"{bench}/{metric}/{sc}/mean"] = _num(s.mean, 4)
                row[f"{bench}/{metric}/{sc}/ci_low"] = _num(s.ci_low, 4)
                row[f"{bench}/{metric}/{sc}/ci_high"] = _num(s.ci_high, 4)
                row[f"{bench}/{metric}/{sc}/ci_method"] = s.method
            if cell.test:
                row[f"{bench}/{metric}/test"] = cell.test.test
                row[f"{bench}/{metric}/diff_vs_baseline"] = _num(cell.test.diff, 4)
                row[f"{bench}/{metric}/p_vs_baseline"] = f"{cell.test.p:.6g}"
                row[f"{bench}/{metric}/p_holm_vs_baseline"] = f"{cell.p_holm:.6g}"
            row[f"{bench}/{metric}/no_test_reason"] = cell.test_note
            if cell.same_fraction_test:
                row[f"{bench}/{metric}/diff_vs_same_fraction"] = _num(cell.same_fraction_test.diff, 4)
                row[f"{bench}/{metric}/p_vs_same_fraction"] = f"{cell.same_fraction_test.p:.6g}"
                row[f"{bench}/{metric}/p_holm_vs_same_fraction"] = f"{cell.same_fraction_p_holm:.6g}"
            if (st := cell.seed_test) is not None:
                pre = f"{bench}/{metric}/"
                row[pre + "seed_diff_vs_same_fraction"] = _num(st.mean, 4)
                row[pre + "seed_ci_low_vs_same_fraction"] = _num(st.ci_low, 4)
                row[pre + "seed_ci_high_vs_same_fraction"] = _num(st.ci_high, 4)
                row[pre + "seed_t_vs_same_fraction"] = _num(st.t, 4)
                if st.p is not None and cell.seed_p_holm is not None:
                    row[pre + "seed_p_vs_same_fraction"] = f"{st.p:.6g}"
                    row[pre + "seed_p_holm_vs_same_fraction"] = f"{cell.seed_p_holm:.6g}"
                row[pre + "seed_n_vs_same_fraction"] = st.n
                row[pre + "seed_diffs_vs_same_fraction"] = ";".join(f"{s}:{d:.4f}" for s, d in st.diffs)
                row[pre + "seed_no_test_reason"] = st.note
            row[f"{bench}/{metric}/gap_recovered_pct_vs_baseline"] = _num(cell.gap_recovered, 2)
        w.writerow({k: row.get(k, "") for k in cols})
    return buf.getvalue()


def write_tables(
    table: Table, out_dir: str | Path, formats: tuple[str, ...] = ("md", "csv"), *, extra_md: str = ""
) -> list[Path]:
    """data_efficiency.md (the table, its notes, then `extra_md`: the category breakdown, the viewer
    link) and data_efficiency.csv."""
    out_dir = Path(out_dir)
    written = []
    if "md" in formats:
        p = out_dir / "data_efficiency.md"
        atomic_write_text(p, to_markdown(table) + (f"\n{extra_md}" if extra_md else ""))
        written.append(p)
    if "csv" in formats:
        p = out_dir / "data_efficiency.csv"
        atomic_write_text(p, to_csv(table))
        written.append(p)
    return written
