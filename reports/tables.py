"""The data-efficiency table: how much medical data each method needs, with uncertainty and tests.

One line per trainer@fraction (seeds pooled), plus reference lines (external checkpoints with a
user-stated data amount, the base model with none). Columns: the medical data used (labeled QA +
preference pairs, and its share of the full SFT set), then for each benchmark closed accuracy and
open recall — mean ± 95% CI over seeds under the `llava-med` scorer, the `strict` scorer beside it —
and a paired test of the line against SFT@100% (McNemar on closed questions, paired bootstrap on
open ones, questions matched by id), and the loss that produced the line.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medvqa.io import atomic_write_text, read_json
from medvqa.reports.results import EvalRecord, collect_records
from medvqa.reports.stats import SeedSummary, TestResult, format_p, load_scored, paired_test, seed_mean_ci

METRICS: tuple[str, ...] = ("closed_accuracy", "open_recall")
METRIC_LABELS = {
    "closed_accuracy": "closed acc",
    "open_recall": "open recall",
    "open_f1": "open F1",
    "open_exact_match": "open EM",
    "open_precision": "open precision",
}


@dataclass
class Cell:
    summaries: dict[str, SeedSummary] = field(default_factory=dict)  # scorer -> mean/CI over seeds
    test: TestResult | None = None  # against the baseline (SFT@100%)
    same_fraction_test: TestResult | None = None  # against the baseline trainer at this line's fraction


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
        n = read_json(meta).get("n_train_full")
        if isinstance(n, int) and n > 0:
            return n
    return None


def parse_baseline(spec: str) -> tuple[str, float]:
    label, _, frac = spec.partition("@")
    return label, float(frac or 1.0)


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
    records = collect_records(run_dir)
    base_key = parse_baseline(baseline)
    n_full = _n_full(run_dir, records, base_key)

    groups: dict[tuple[str, str, float | None], list[EvalRecord]] = defaultdict(list)
    for r in records:
        groups[r.group].append(r)

    order = _trainer_order(run_dir)
    kind_rank = {"base": 0, "sweep": 1, "reference": 2}

    def sort_key(key: tuple[str, str, float | None]) -> tuple[Any, ...]:
        kind, label, fraction = key
        t_rank = order.index(label) if label in order else len(order)
        return (kind_rank.get(kind, 3), t_rank, label, fraction if fraction is not None else -1.0)

    benchmarks = sorted({r.benchmark for r in records})
    scored_cache: dict[Path, list[dict[str, Any]]] = {}

    def scored_by_seed(recs: list[EvalRecord], bench: str) -> dict[Any, list[dict[str, Any]]]:
        out = {}
        for r in recs:
            if r.benchmark != bench:
                continue
            if r.eval_dir not in scored_cache:
                scored_cache[r.eval_dir] = load_scored(r.eval_dir)
            out[r.seed if r.seed is not None else 0] = scored_cache[r.eval_dir]
        return out

    base_records = groups.get(("sweep", base_key[0], base_key[1]), [])
    lines: list[Line] = []
    for key in sorted(groups, key=sort_key):
        recs = groups[key]
        kind, label, fraction = key
        first = recs[0]
        seeds = sorted({r.seed for r in recs if r.seed is not None})
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
                peer = groups.get(("sweep", base_key[0], fraction))
                if kind == "sweep" and label != base_key[0] and peer and scorer in cell.summaries:
                    cell.same_fraction_test = paired_test(
                        scored_by_seed(brecs, bench),
                        scored_by_seed(peer, bench),
                        scorer,
                        metric,
                        n_boot=n_boot,
                    )
                if cell.summaries:
                    line.cells[(bench, metric)] = cell
        lines.append(line)
    return Table(lines, benchmarks, metrics, scorer, side_scorer, baseline, n_full)


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


def to_markdown(table: Table) -> str:
    base_name = table.baseline.replace("@1.0", "@100%")
    head = ["model", "loss", "labeled QA", "pairs", "data used (% of full SFT)", "seeds"]
    for bench in table.benchmarks:
        for metric in table.metrics:
            head.append(f"{bench} {METRIC_LABELS.get(metric, metric)}")
            if table.side_scorer:
                head.append(table.side_scorer)
            head.append(f"p vs {base_name}")
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["--:"] * (len(head) - 1)) + "|"]
    for line in table.lines:
        cells = [
            line.name,
            line.loss,
            _count(line.n_labeled),
            _count(line.n_pairs),
            _data_cell(line),
            str(len(line.seeds) or 1),
        ]
        for bench in table.benchmarks:
            for metric in table.metrics:
                cell = line.cells.get((bench, metric))
                cells.append(_value_cell(cell.summaries.get(table.scorer)) if cell else "")
                if table.side_scorer:
                    side = cell.summaries.get(table.side_scorer) if cell else None
                    cells.append(_num(side.mean) if side else "")
                if line.kind == "sweep" and (line.label, line.fraction) == parse_baseline(table.baseline):
                    cells.append("(baseline)")
                else:
                    cells.append(format_p(cell.test.p) if cell and cell.test else "")
        out.append("| " + " | ".join(cells) + " |")
    notes = [
        "",
        f"Scores in percent, `{table.scorer}` scorer (LLaVA-Med's published convention)"
        + (f"; `{table.side_scorer}` scorer beside it." if table.side_scorer else "."),
        "Value ± half-width of the 95% CI: Student-t over seeds; † one seed, so the 95% bootstrap CI "
        "over images of that run.",
        f"p: paired test against {base_name} on the same questions (McNemar for closed accuracy, exact "
        "binomial below 25 discordant pairs; paired bootstrap over images for open recall), "
        "seeds paired with seeds.",
        *_same_fraction_notes(table),
        "Data used = labeled QA + preference pairs"
        + (f"; % of the full SFT set ({table.n_full:,} labeled QA)." if table.n_full else "."),
    ]
    return "\n".join(out + notes) + "\n"


def _same_fraction_notes(table: Table) -> list[str]:
    """One sentence per non-baseline trainer line against the baseline trainer on the same labeled data."""
    base_label = parse_baseline(table.baseline)[0]
    out = []
    for line in table.lines:
        parts = []
        for (bench, metric), cell in line.cells.items():
            t = cell.same_fraction_test
            if t is None:
                continue
            parts.append(
                f"{bench} {METRIC_LABELS.get(metric, metric)} {t.diff:+.1f} points (p {format_p(t.p)})"
            )
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
            cols += [f"{bench}/{metric}/{x}" for x in ("test", "diff_vs_baseline", "p_vs_baseline")]
            cols += [f"{bench}/{metric}/{x}" for x in ("diff_vs_same_fraction", "p_vs_same_fraction")]
    return cols


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
            if cell.same_fraction_test:
                row[f"{bench}/{metric}/diff_vs_same_fraction"] = _num(cell.same_fraction_test.diff, 4)
                row[f"{bench}/{metric}/p_vs_same_fraction"] = f"{cell.same_fraction_test.p:.6g}"
        w.writerow({k: row.get(k, "") for k in cols})
    return buf.getvalue()


def write_tables(table: Table, out_dir: str | Path, formats: tuple[str, ...] = ("md", "csv")) -> list[Path]:
    out_dir = Path(out_dir)
    written = []
    if "md" in formats:
        p = out_dir / "data_efficiency.md"
        atomic_write_text(p, to_markdown(table))
        written.append(p)
    if "csv" in formats:
        p = out_dir / "data_efficiency.csv"
        atomic_write_text(p, to_csv(table))
        written.append(p)
    return written
