"""Build every report file of a sweep folder from its stored scores (never reruns a model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medvqa.errors import BadInput
from medvqa.io import atomic_write_text

FORMATS = ("md", "csv", "png", "html")
SAMPLES_PAGE = "samples.html"


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
    """Write results.csv, data_efficiency.{md,csv,png}, by_category.csv and samples.html (the sample
    viewer the markdown links to); return (the markdown, files written)."""
    from medvqa.reports import categories
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
    by_category = categories.category_tables(table)
    extra = categories.to_markdown(by_category, scorer)
    if "csv" in formats and by_category:
        atomic_write_text(out / "by_category.csv", categories.to_csv(by_category, scorer))
        written.append(out / "by_category.csv")
    if "html" in formats:
        page, sentence = _samples_page(table, out)
        if page is not None:
            written.append(page)
        if sentence:
            extra += f"\n{sentence}\n"
    written += write_tables(table, out, tuple(f for f in formats if f in ("md", "csv")), extra_md=extra)
    if "png" in formats:
        from medvqa.reports.plots import plot_data_efficiency

        written.append(plot_data_efficiency(table, out / "data_efficiency.png"))
    return to_markdown(table) + "\n" + extra, written


def viewer_pair(table: Any) -> tuple[Any, Any | None]:
    """The two lines worth looking at side by side: the first trainer line that has the baseline
    trainer on the same labeled data (e.g. STLLaVA-Med@9% and SFT@9%); else the baseline alone."""
    from medvqa.reports.tables import parse_baseline

    base_label, base_fraction = parse_baseline(table.baseline)
    by_key = {(ln.kind, ln.label, ln.fraction): ln for ln in table.lines if ln.records}
    for ln in table.lines:
        peer = by_key.get(("sweep", base_label, ln.fraction))
        if ln.records and ln.kind == "sweep" and ln.label != base_label and peer is not None:
            return ln, peer
    base = by_key.get(("sweep", base_label, base_fraction))
    return (base or next((ln for ln in table.lines if ln.records), None)), None


def _job_dir(line: Any, seed: int | None) -> Path:
    """The folder above a line's eval folders for one seed (`<trainer>/f<f>/s<seed>` or the reference)."""
    rec = next((r for r in line.records if r.seed == seed), line.records[0])
    return rec.eval_dir.parent.parent


def _samples_page(table: Any, out: Path) -> tuple[Path | None, str]:
    from medvqa.reports.viewer import write_page

    a, b = viewer_pair(table)
    if a is None:
        return None, ""
    seed = min((r.seed for r in a.records if r.seed is not None), default=None)
    a_dir = _job_dir(a, seed)
    b_dir = _job_dir(b, seed) if b is not None else None
    try:
        suffix = f" (seed {seed})" if seed is not None else ""
        page, _ = write_page(
            a_dir,
            out / SAMPLES_PAGE,
            compare=b_dir,
            title=f"{a.name} vs {b.name}" if b else a.name,
            labels=(f"{a.name}{suffix}",) + ((f"{b.name}{suffix}",) if b else ()),
        )
    except BadInput as exc:  # e.g. an eval without scored.jsonl: the report says so and goes on
        return None, f"No sample viewer: {exc}"
    which = f"seed {seed}" if seed is not None else "one run"
    if b is None:
        return (
            page,
            f"Samples: [{SAMPLES_PAGE}]({SAMPLES_PAGE}) — every question of {a.name} ({which}), filterable.",
        )
    return page, (
        f"Samples: [{SAMPLES_PAGE}]({SAMPLES_PAGE}) — {a.name} beside {b.name} ({which}) on the same "
        f"questions, disagreements first (`medvqa show {a_dir} --compare {b_dir}`)."
    )
