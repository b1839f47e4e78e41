"""Build every report file of a sweep folder from its stored scores (never reruns a model)."""

from __future__ import annotations

from pathlib import Path

from medvqa.errors import BadInput
from medvqa.io import atomic_write_text

FORMATS = ("md", "csv", "png")


def parse_formats(text: str) -> tuple[str, ...]:
    formats = tuple(f.strip().lower() for f in text.split(",") if f.strip())
    bad = sorted(set(formats) - set(FORMATS))
    if bad or not formats:
        raise BadInput(f"--format: unknown format(s) {bad or text!r}; known: {', '.join(FORMATS)}")
    return formats


def make_report(
    run_dir: str | Path,
    *,
    out_dir: str | Path | None = None,
    formats: tuple[str, ...] = FORMATS,
    scorer: str = "llava-med",
    side_scorer: str | None = "strict",
    baseline: str = "sft@1.0",
) -> tuple[str, list[Path]]:
    """Write results.csv and data_efficiency.{md,csv,png}; return (markdown table, files written)."""
    from medvqa.reports.results import collect, to_csv
    from medvqa.reports.tables import build_table, to_markdown, write_tables

    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir else run_dir / "report"
    written: list[Path] = []
    rows = collect(run_dir)
    if "csv" in formats:
        atomic_write_text(out / "results.csv", to_csv(rows))
        written.append(out / "results.csv")
    table = build_table(run_dir, scorer=scorer, side_scorer=side_scorer, baseline=baseline)
    known = {sc for line in table.lines for cell in line.cells.values() for sc in cell.summaries}
    if scorer not in known:
        raise BadInput(f"--scorer {scorer!r}: no stored score uses it; found {sorted(known)}", path=run_dir)
    written += write_tables(table, out, tuple(f for f in formats if f in ("md", "csv")))
    if "png" in formats:
        from medvqa.reports.plots import plot_data_efficiency

        written.append(plot_data_efficiency(table, out / "data_efficiency.png"))
    return to_markdown(table), written
