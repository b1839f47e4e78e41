"""Accuracy by question category, from the benchmark's own metadata carried in `scored.jsonl`.

"Where did self-training help?" is a table, not a guess: for each benchmark and each category field
its samples carry (Phantom's question `slot`; SLAKE's `content_type` and `modality`; VQA-RAD's
`question_type`), one row per (category, answer type) with the number of questions, each line's
score on them — closed accuracy for closed questions, open recall for open ones, under the table's
scorer, the mean over seeds — and, for each trainer line that has the baseline trainer at the same
fraction, the difference in points. Read from stored files only, like the rest of the report.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from medvqa.reports.stats import load_scored
from medvqa.reports.tables import Line, Table, parse_baseline
from medvqa.scoring import HEADLINE

# Meta fields that name a question category, in the order they are shown. A field is used where
# the rows have it with 2..MAX_VALUES distinct values (more is an id, fewer is not a breakdown).
CATEGORY_FIELDS: tuple[str, ...] = ("slot", "content_type", "question_type", "modality")
MAX_VALUES = 40


@dataclass
class CategoryRow:
    value: str
    answer_type: str
    n: int
    means: dict[str, float] = field(default_factory=dict)  # line name -> mean over seeds
    n_seeds: dict[str, int] = field(default_factory=dict)


@dataclass
class CategoryTable:
    benchmark: str
    field: str
    columns: list[str]  # line names, in the report's order
    deltas: list[tuple[str, str]]  # (line, same-fraction baseline line) pairs shown as differences
    rows: list[CategoryRow]


def _rows_of(table: Table, eval_dir: Any) -> list[dict[str, Any]]:
    if eval_dir not in table.scored:
        table.scored[eval_dir] = load_scored(eval_dir)
    return table.scored[eval_dir]


def _per_seed_means(
    table: Table, line: Line, bench: str, fld: str
) -> tuple[dict[tuple[str, str], list[float]], dict[tuple[str, str], int]]:
    """(category value, answer type) -> the per-seed mean of the headline metric, and the question count."""
    means: dict[tuple[str, str], list[float]] = defaultdict(list)
    counts: dict[tuple[str, str], int] = {}
    for rec in line.records:
        if rec.benchmark != bench:
            continue
        acc: dict[tuple[str, str], list[float]] = defaultdict(list)
        for row in _rows_of(table, rec.eval_dir):
            meta, kind = row.get("meta"), row.get("answer_type")
            if not isinstance(meta, dict) or meta.get(fld) in (None, "") or kind not in HEADLINE:
                continue
            values = row.get(table.scorer)
            v = values.get(HEADLINE[kind]) if isinstance(values, dict) else None
            if isinstance(v, int | float) and not isinstance(v, bool):
                acc[(str(meta[fld]), kind)].append(float(v))
        for key, vals in acc.items():
            means[key].append(sum(vals) / len(vals))
            counts[key] = max(counts.get(key, 0), len(vals))
    return means, counts


def category_tables(table: Table, fields: tuple[str, ...] = CATEGORY_FIELDS) -> list[CategoryTable]:
    base_label = parse_baseline(table.baseline)[0]
    by_name = {ln.name: ln for ln in table.lines}
    out = []
    for bench in table.benchmarks:
        for fld in fields:
            cols: list[str] = []
            rows: dict[tuple[str, str], CategoryRow] = {}
            for line in table.lines:
                means, counts = _per_seed_means(table, line, bench, fld)
                if not means:
                    continue
                cols.append(line.name)
                for key, per_seed in means.items():
                    row = rows.setdefault(key, CategoryRow(key[0], key[1], counts[key]))
                    row.n = max(row.n, counts[key])
                    row.means[line.name] = sum(per_seed) / len(per_seed)
                    row.n_seeds[line.name] = len(per_seed)
            if not 2 <= len({v for v, _ in rows}) <= MAX_VALUES:
                continue
            deltas = []
            for name in cols:
                line = by_name[name]
                if line.kind == "sweep" and line.label != base_label and line.fraction is not None:
                    peer = f"{base_label}@{float(line.fraction)!r}"
                    if peer in cols:
                        deltas.append((name, peer))
            ordered = sorted(rows.values(), key=lambda r: (r.answer_type, r.value))
            out.append(CategoryTable(bench, fld, cols, deltas, ordered))
    return out


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f}"


def to_markdown(tables: list[CategoryTable], scorer: str) -> str:
    if not tables:
        return (
            "No per-category breakdown: the scored rows carry no category field "
            f"({', '.join(CATEGORY_FIELDS)}).\n"
        )
    out = [
        "## Accuracy by question category",
        "",
        f"`{scorer}` scorer: closed accuracy on closed questions, open recall on open ones; mean over seeds; "
        "n = questions in the category; Δ = points gained over the baseline trainer on the same labeled data.",
    ]
    for t in tables:
        head = [t.field, "type", "n", *t.columns, *[f"Δ {a} − {b}" for a, b in t.deltas]]
        out += ["", f"**{t.benchmark}** by `{t.field}`", ""]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "|".join(["---", "---"] + ["--:"] * (len(head) - 2)) + "|")
        for r in t.rows:
            cells = [r.value, r.answer_type.lower(), f"{r.n:,}"]
            cells += [_fmt(r.means.get(c)) for c in t.columns]
            for a, b in t.deltas:
                if a in r.means and b in r.means:
                    cells.append(f"{r.means[a] - r.means[b]:+.1f}")
                else:
                    cells.append("—")
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def to_csv(tables: list[CategoryTable], scorer: str) -> str:
    """Long form: one row per (benchmark, field, category, answer type, model)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        ["benchmark", "field", "value", "answer_type", "n", "model", "scorer", "metric", "mean", "n_seeds"]
    )
    for t in tables:
        for r in t.rows:
            for c in t.columns:
                if c in r.means:
                    w.writerow(
                        [
                            t.benchmark,
                            t.field,
                            r.value,
                            r.answer_type,
                            r.n,
                            c,
                            scorer,
                            HEADLINE[r.answer_type],
                            f"{r.means[c]:.4f}",
                            r.n_seeds[c],
                        ]
                    )
    return buf.getvalue()
