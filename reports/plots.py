"""`data_efficiency.png`: score vs medical data used (log x), one line per trainer, error bars.

One panel per benchmark × (closed accuracy, open recall). Each swept trainer is a line through its
fractions (points labelled with the fraction); reference checkpoints are single labelled markers
at their stated data amount; the base model (no medical data) is a dotted horizontal line.
matplotlib is imported here only, with the Agg backend (no display needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medvqa.reports.tables import METRIC_LABELS, Line, Table

_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def _yerr(cell_summary: Any) -> tuple[float, float]:
    if cell_summary.ci_low is None or cell_summary.ci_high is None:
        return (0.0, 0.0)
    # scores are percentages: a t-interval over few seeds can cross 0 or 100, the plot clips it
    lo, hi = max(0.0, float(cell_summary.ci_low)), min(100.0, float(cell_summary.ci_high))
    return (max(0.0, cell_summary.mean - lo), max(0.0, hi - cell_summary.mean))


def _ylim(current: tuple[float, float]) -> tuple[float, float]:
    lo, hi = current
    return (max(0.0, lo), min(102.0, hi))


def _fmt_count(x: float, _pos: Any = None) -> str:
    if x >= 1e6:
        return f"{x / 1e6:g}M"
    if x >= 1e3:
        return f"{x / 1e3:g}k"
    return f"{x:g}"


def _count_ticks(ax: Any, lo: float, hi: float) -> None:
    """Plain counts (200, 1k, 530k) on the log axis; 1-2-5 ticks when the range is narrow."""
    import math

    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    decades = math.log10(hi / lo) if lo > 0 else 6
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades <= 2.5 else (1.0,)))
    ax.xaxis.set_major_formatter(FuncFormatter(_fmt_count))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _legend_columns(labels: list[str], width_in: float) -> int:
    """As many legend columns (at most 4) as fit the figure's width when every column is as wide
    as the longest entry (9 pt text: ~0.075 in a character, ~6 characters of marker and gap)."""
    per_row = width_in / 0.075
    widest = max(len(label) for label in labels) + 6
    return max(1, min(4, len(labels), int(per_row // widest)))


def plot_data_efficiency(table: Table, out: str | Path, *, dpi: int = 130) -> Path:
    # A bare Figure (no pyplot): no process-wide backend switch, no global figure registry.
    from matplotlib.figure import Figure

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    benches = table.benchmarks or ["(none)"]
    metrics = table.metrics
    nrows, ncols = len(benches), len(metrics)
    fig = Figure(figsize=(5.2 * ncols, 3.9 * nrows + 0.9), constrained_layout=True)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    sweep_labels: list[str] = []
    for line in table.lines:
        if line.kind == "sweep" and line.label not in sweep_labels:
            sweep_labels.append(line.label)
    style = {
        lab: (_COLORS[i % len(_COLORS)], _MARKERS[i % len(_MARKERS)]) for i, lab in enumerate(sweep_labels)
    }
    base_label = table.baseline.partition("@")[0]
    legend_label = {}  # the loss of a non-baseline trainer in its legend entry (e.g. DPO "sigmoid+sft")
    for ln in table.lines:
        if ln.kind == "sweep" and ln.label != base_label and ln.loss:
            legend_label[ln.label] = f"{ln.label} (loss: {ln.loss})"
    refs = [ln for ln in table.lines if ln.kind == "reference"]
    ref_style = {ln.label: _COLORS[(len(sweep_labels) + i) % len(_COLORS)] for i, ln in enumerate(refs)}

    handles: dict[str, Any] = {}
    for i, bench in enumerate(benches):
        for j, metric in enumerate(metrics):
            ax = axes[i][j]
            xs_all: list[float] = []
            labeled: set[tuple[float, str]] = set()  # one fraction label per point of the x axis
            for lab in sweep_labels:
                pts: list[tuple[float, float, tuple[float, float], Line]] = []
                for ln in table.lines:
                    if ln.kind != "sweep" or ln.label != lab or not ln.data_used:
                        continue
                    cell = ln.cells.get((bench, metric))
                    s = cell.summaries.get(table.scorer) if cell else None
                    if s is None:
                        continue
                    pts.append((ln.data_used, s.mean, _yerr(s), ln))
                if not pts:
                    continue
                pts.sort(key=lambda p: p[0])
                color, marker = style[lab]
                xs = [p[0] for p in pts]
                xs_all += xs
                h = ax.errorbar(
                    xs,
                    [p[1] for p in pts],
                    yerr=[[p[2][0] for p in pts], [p[2][1] for p in pts]],
                    color=color,
                    marker=marker,
                    markersize=6,
                    capsize=4,
                    linewidth=2,
                    label=legend_label.get(lab, lab),
                )
                handles.setdefault(lab, h)
                for x, y, _, ln in pts:
                    text = f"{ln.fraction:.0%}" if ln.fraction is not None else ""
                    if (x, text) in labeled:  # another line's point at the same data and fraction
                        continue
                    labeled.add((x, text))
                    ax.annotate(
                        text,
                        (x, y),
                        textcoords="offset points",
                        xytext=(6, -12),
                        fontsize=8,
                        color=color,
                    )
            for ln in refs:
                cell = ln.cells.get((bench, metric))
                s = cell.summaries.get(table.scorer) if cell else None
                if s is None or not ln.data_used:
                    continue
                color = ref_style[ln.label]
                e = _yerr(s)
                h = ax.errorbar(
                    [ln.data_used],
                    [s.mean],
                    yerr=[[e[0]], [e[1]]],
                    color=color,
                    marker="*",
                    markersize=13,
                    capsize=4,
                    linestyle="none",
                    label=f"{ln.label} ({ln.data_label or f'{ln.data_used:,.0f}'})",
                )
                xs_all.append(ln.data_used)
                handles.setdefault(ln.label, h)
            for ln in table.lines:
                if ln.kind != "base":
                    continue
                cell = ln.cells.get((bench, metric))
                s = cell.summaries.get(table.scorer) if cell else None
                if s is None:
                    continue
                h = ax.axhline(s.mean, color="0.45", linestyle=":", linewidth=1.6, label=f"{ln.label}")
                handles.setdefault("base:" + ln.label, h)
            ax.set_xscale("log")
            ax.set_ylim(*_ylim(ax.get_ylim()))
            if xs_all:
                lo, hi = min(xs_all), max(xs_all)
                ax.set_xlim(lo / 1.8, hi * 1.8)
                _count_ticks(ax, lo / 1.8, hi * 1.8)
            ax.set_title(f"{bench} — {METRIC_LABELS.get(metric, metric)}", fontsize=11)
            ax.set_xlabel("medical data used (labeled QA + preference pairs, log scale)", fontsize=9)
            ax.set_ylabel(f"{METRIC_LABELS.get(metric, metric)} (%, {table.scorer})", fontsize=9)
            ax.grid(True, which="major", alpha=0.35)
            ax.grid(True, which="minor", alpha=0.12)
    if handles:
        labels = [h.get_label() for h in handles.values()]
        fig.legend(
            list(handles.values()),
            labels,
            loc="outside lower center",
            ncol=_legend_columns(labels, fig.get_figwidth()),
            frameon=False,
            fontsize=9,
        )
    fig.suptitle("Data efficiency: score vs medical data used (error bars: 95% CI)", fontsize=12)
    fig.savefig(out, dpi=dpi)
    return out
