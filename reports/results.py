"""The tidy long results table: one row per (run, trainer, fraction, seed, benchmark, scorer, metric).

`collect(run_dir)` walks a sweep folder (the layout of DESIGN.md) and reads only stored files:

```
<run>/<trainer>/f<fraction>/s<seed>/checkpoint/checkpoint.json
<run>/<trainer>/f<fraction>/s<seed>/eval/<benchmark>/scores.json   (+ scored.jsonl, used by stats)
<run>/reference/<slug>/reference.json                               (external checkpoints, base model)
<run>/reference/<slug>/eval/<benchmark>/scores.json                 (or the eval dirs reference.json names)
```

A reference row is an external checkpoint placed beside the swept trainers (e.g. "LLaVA-Med v1.5,
530K medical samples") with the data amount the user states for it, or the base model the sweep
started from (0 medical samples). `reports.report` writes `results.csv` from `to_csv(collect(...))`, sorted,
with no timestamps, so that the same stored scores always give the same bytes.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medvqa.errors import BadInput
from medvqa.io import read_json
from medvqa.layout import fraction_dirname as fraction_dirname  # the run layout's names, defined once
from medvqa.layout import is_reserved, is_stale, parse_fraction_dirname, parse_seed_dirname

COLUMNS: tuple[str, ...] = (
    "run",
    "kind",
    "trainer",
    "label",
    "fraction",
    "seed",
    "benchmark",
    "split",
    "scorer",
    "metric",
    "value",
    "ci_low",
    "ci_high",
    "n",
    "n_labeled",
    "n_pairs",
    "data_used",
    "loss",
    "checkpoint_fingerprint",
    "manifest_hash",
    "benchmark_version",
    "closed_rule",
    "prompt_policy",
    "generation",
    "versions",
    "eval_dir",
)


@dataclass
class EvalRecord:
    """One evaluated model (a swept checkpoint or a reference) on one benchmark."""

    kind: str  # "sweep" | "reference" | "base"
    trainer: str
    label: str
    fraction: float | None
    seed: int | None
    benchmark: str
    eval_dir: Path
    scores: dict[str, Any]
    checkpoint: dict[str, Any] = field(default_factory=dict)
    data_used: float | None = None
    data_label: str = ""

    @property
    def n_labeled(self) -> int | None:
        v = self.checkpoint.get("n_labeled")
        return int(v) if isinstance(v, int | float) else None

    @property
    def n_pairs(self) -> int | None:
        v = self.checkpoint.get("n_pairs")
        return int(v) if isinstance(v, int | float) else (0 if self.kind == "sweep" else None)

    @property
    def loss(self) -> str:
        loss = self.checkpoint.get("loss")
        if loss:
            return str(loss)
        return "" if self.kind != "sweep" else "sft" if self.trainer == "sft" else ""

    @property
    def group(self) -> tuple[str, str, float | None]:
        """Rows of one table line: same kind, trainer/label and fraction (seeds pooled)."""
        return (self.kind, self.label, self.fraction)


@dataclass(frozen=True)
class Gap:
    """Something a report line should have and does not (an eval that never finished, ...)."""

    kind: str
    label: str
    fraction: float | None
    seed: int | None
    benchmark: str | None
    what: str

    @property
    def group(self) -> tuple[str, str, float | None]:
        return (self.kind, self.label, self.fraction)


def _kind(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {json.dumps(value, default=str)[:40]}"


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _check_fields(obj: dict[str, Any], path: Path, spec: dict[str, str], prefix: str = "") -> None:
    """Type-check the optional fields a report reads: "text", "number" (finite), "count" (int >= 0),
    "int", "object". A wrong type is a BadInput naming file and field, never a traceback or garbage."""
    for key, kind in spec.items():
        if key not in obj or obj[key] is None:
            continue
        v = obj[key]
        ok = {
            "text": isinstance(v, str),
            "scalar": isinstance(v, str) or _is_number(v),
            "number": _is_number(v),
            "count": _is_number(v) and v >= 0 and float(v).is_integer(),
            "nonneg": _is_number(v) and v >= 0,
            "int": isinstance(v, int) and not isinstance(v, bool),
            "object": isinstance(v, dict),
        }[kind]
        if not ok:
            expected = {
                "text": "text",
                "scalar": "text or a number",
                "number": "a finite number",
                "count": "a whole number >= 0",
                "nonneg": "a number >= 0",
                "int": "an integer",
                "object": "an object",
            }[kind]
            raise BadInput(f"expected {expected}, got {_kind(v)}", path=path, field=prefix + key)


CHECKPOINT_FIELDS = {
    "trainer": "text",
    "fraction": "number",
    "seed": "int",
    "n_labeled": "nonneg",
    "n_pairs": "nonneg",
    "loss": "text",
    "manifest_hash": "text",
}
SCORES_FIELDS = {
    "benchmark": "text",
    "benchmark_version": "scalar",
    "split": "text",
    "closed_rule": "scalar",
    "prompt_policy": "scalar",
    "model": "object",
    "generation": "object",
    "versions": "object",
}
METRIC_FIELDS = {"value": "number", "ci_low": "number", "ci_high": "number", "n": "count"}


def read_checkpoint(path: Path) -> dict[str, Any]:
    """checkpoint.json, with every field a report reads type-checked."""
    ckpt = read_json(path)
    if not isinstance(ckpt, dict):
        raise BadInput(f"expected a JSON object, got {_kind(ckpt)}", path=path)
    _check_fields(ckpt, path, CHECKPOINT_FIELDS)
    fraction = ckpt.get("fraction")
    if fraction is not None and not 0 < fraction <= 1:
        raise BadInput(f"must be in (0, 1], got {fraction!r}", path=path, field="fraction")
    return ckpt


def _fmt_float(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, float):
        return f"{round(x, 6):.6g}" if abs(x) < 1e15 else repr(x)
    return str(x)


def _eval_dirs(parent: Path) -> list[Path]:
    root = parent / "eval"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / "scores.json").is_file() and not is_stale(p.name))


def _load_scores(eval_dir: Path) -> dict[str, Any]:
    """scores.json, type-checked: NaN/Infinity or a string where a number belongs is a BadInput."""
    path = eval_dir / "scores.json"
    scores = read_json(path)
    if not isinstance(scores, dict) or not isinstance(scores.get("scorers"), dict):
        raise BadInput("not a scores.json (no 'scorers' table)", path=path, field="scorers")
    _check_fields(scores, path, SCORES_FIELDS)
    for scorer, metrics in scores["scorers"].items():
        if not isinstance(metrics, dict):
            raise BadInput(f"expected an object, got {_kind(metrics)}", path=path, field=f"scorers.{scorer}")
        for metric, mv in metrics.items():
            where = f"scorers.{scorer}.{metric}"
            if not isinstance(mv, dict) or "value" not in mv:
                raise BadInput("metric without a value", path=path, field=where)
            _check_fields(mv, path, METRIC_FIELDS, prefix=where + ".")
    return scores


def _unscored_dirs(parent: Path) -> list[Path]:
    """Eval folders that exist but hold no scores.json: an eval that was killed or failed."""
    root = parent / "eval"
    if not root.is_dir():
        return []
    return sorted(
        p for p in root.iterdir() if p.is_dir() and not (p / "scores.json").is_file() and not is_stale(p.name)
    )


def _sweep_records(run_dir: Path, gaps: list[Gap]) -> list[EvalRecord]:
    out: list[EvalRecord] = []
    for trainer_dir in sorted(p for p in run_dir.iterdir() if p.is_dir()):
        if is_reserved(trainer_dir.name):  # the one list the sweep's label check uses
            continue
        for frac_dir in sorted(p for p in trainer_dir.iterdir() if p.is_dir()):
            frac_name = parse_fraction_dirname(frac_dir.name)
            if frac_name is None:
                continue
            for seed_dir in sorted(p for p in frac_dir.iterdir() if p.is_dir()):
                seed_name = parse_seed_dirname(seed_dir.name)
                if seed_name is None:
                    continue
                ckpt_file = seed_dir / "checkpoint" / "checkpoint.json"
                ckpt = read_checkpoint(ckpt_file) if ckpt_file.is_file() else {}
                trainer = str(ckpt.get("trainer") or trainer_dir.name)
                # a field that is absent or null falls back to the folder name (type-checked above)
                fraction = float(frac_name if ckpt.get("fraction") is None else ckpt["fraction"])
                seed = int(seed_name if ckpt.get("seed") is None else ckpt["seed"])
                for eval_dir in _unscored_dirs(seed_dir):
                    gaps.append(
                        Gap("sweep", trainer_dir.name, fraction, seed, eval_dir.name, "no scores.json")
                    )
                if not _eval_dirs(seed_dir) and not _unscored_dirs(seed_dir):
                    what = "trained, not evaluated" if ckpt_file.is_file() else "no checkpoint, no eval"
                    gaps.append(Gap("sweep", trainer_dir.name, fraction, seed, None, what))
                for eval_dir in _eval_dirs(seed_dir):
                    scores = _load_scores(eval_dir)
                    out.append(
                        EvalRecord(
                            kind="sweep",
                            trainer=trainer,
                            label=trainer_dir.name,
                            fraction=fraction,
                            seed=seed,
                            benchmark=str(scores.get("benchmark") or eval_dir.name),
                            eval_dir=eval_dir,
                            scores=scores,
                            checkpoint=ckpt,
                        )
                    )
    return out


def _reference_records(run_dir: Path, gaps: list[Gap]) -> list[EvalRecord]:
    out: list[EvalRecord] = []
    ref_root = run_dir / "reference"
    if not ref_root.is_dir():
        return out
    for ref_dir in sorted(p for p in ref_root.iterdir() if p.is_dir()):
        meta_file = ref_dir / "reference.json"
        if not meta_file.is_file():
            continue
        meta = read_json(meta_file)
        if not isinstance(meta, dict):
            raise BadInput(f"expected a JSON object, got {_kind(meta)}", path=meta_file)
        name = meta.get("name")
        if not isinstance(name, str) or not name:
            raise BadInput("missing reference name", path=meta_file, field="name")
        _check_fields(
            meta, meta_file, {"kind": "text", "loss": "text", "data_label": "text", "eval_dirs": "object"}
        )
        data_used = meta.get("data_used")
        if data_used is not None and not (_is_number(data_used) and data_used >= 0):
            raise BadInput(f"must be a number, got {data_used!r}", path=meta_file, field="data_used")
        dirs: list[Path] = []
        for bench, d in sorted((meta.get("eval_dirs") or {}).items()):
            p = Path(d)
            if not p.is_absolute():
                p = ref_dir / p
            if not isinstance(d, str):
                raise BadInput(
                    f"expected a folder, got {_kind(d)}", path=meta_file, field=f"eval_dirs.{bench}"
                )
            if not (p / "scores.json").is_file():
                raise BadInput(f"eval dir of benchmark {bench!r} has no scores.json: {p}", path=meta_file)
            dirs.append(p)
        dirs += [p for p in _eval_dirs(ref_dir) if p not in dirs]
        kind = str(meta.get("kind", "reference"))
        gaps += [Gap(kind, name, None, None, p.name, "no scores.json") for p in _unscored_dirs(ref_dir)]
        for eval_dir in dirs:
            scores = _load_scores(eval_dir)
            out.append(
                EvalRecord(
                    kind=str(meta.get("kind", "reference")),
                    trainer=str(meta.get("kind", "reference")),
                    label=name,
                    fraction=None,
                    seed=None,
                    benchmark=str(scores.get("benchmark") or eval_dir.name),
                    eval_dir=eval_dir,
                    scores=scores,
                    checkpoint={"loss": meta.get("loss", "")},
                    data_used=float(data_used) if data_used is not None else None,
                    data_label=str(meta.get("data_label") or ""),
                )
            )
    return out


def collect_run(run_dir: str | Path) -> tuple[list[EvalRecord], list[Gap]]:
    """Every evaluated model under a sweep folder (swept checkpoints, then references), and the gaps:
    eval folders without scores.json, trained jobs never evaluated, and (line, seed) pairs that lack a
    benchmark the rest of the run has. A report shows the gaps; it never drops a line silently."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise BadInput("run folder not found", path=run_dir)
    gaps: list[Gap] = []
    records = _sweep_records(run_dir, gaps) + _reference_records(run_dir, gaps)
    if not records:
        raise BadInput(
            "no scores found: expected <trainer>/f<fraction>/s<seed>/eval/<benchmark>/scores.json "
            "or reference/<name>/reference.json",
            path=run_dir,
        )
    benchmarks = {r.benchmark for r in records}
    have = {(r.kind, r.label, r.fraction, r.seed, r.benchmark) for r in records}
    have |= {(g.kind, g.label, g.fraction, g.seed, g.benchmark) for g in gaps}
    seeds = {(r.kind, r.label, r.fraction, r.seed) for r in records}
    for kind, label, fraction, seed in sorted(seeds, key=str):
        for bench in sorted(benchmarks):
            if (kind, label, fraction, seed, bench) not in have:
                gaps.append(Gap(kind, label, fraction, seed, bench, "not evaluated"))
    return records, gaps


def collect_records(run_dir: str | Path) -> list[EvalRecord]:
    """Every evaluated model under a sweep folder (swept checkpoints, then references)."""
    return collect_run(run_dir)[0]


def _versions_str(versions: Any) -> str:
    if not isinstance(versions, dict):
        return ""
    return ";".join(f"{k}={v}" for k, v in sorted(versions.items()))


def _rel(path: Path, root: Path | None) -> str:
    if root is not None:
        try:
            return str(path.resolve().relative_to(root.resolve()))
        except ValueError:
            pass
    return str(path)


def record_rows(record: EvalRecord, run: str, run_dir: Path | None = None) -> list[dict[str, str]]:
    s = record.scores
    model = s.get("model") or {}
    gen = s.get("generation") or {}
    n_labeled, n_pairs = record.n_labeled, record.n_pairs
    if record.data_used is not None:
        data_used: float | None = record.data_used
    elif n_labeled is not None:
        data_used = n_labeled + (n_pairs or 0)
    else:
        data_used = None
    common = {
        "run": run,
        "kind": record.kind,
        "trainer": record.trainer,
        "label": record.label,
        "fraction": "" if record.fraction is None else repr(float(record.fraction)),
        "seed": _fmt_float(record.seed),
        "benchmark": record.benchmark,
        "split": str(s.get("split", "")),
        "n_labeled": _fmt_float(n_labeled),
        "n_pairs": _fmt_float(n_pairs),
        "data_used": _fmt_float(data_used),
        "loss": record.loss,
        "checkpoint_fingerprint": str(model.get("fingerprint", "")),
        "manifest_hash": str(record.checkpoint.get("manifest_hash", "")),
        "benchmark_version": str(s.get("benchmark_version", "")),
        "closed_rule": str(s.get("closed_rule", "")),
        "prompt_policy": str(s.get("prompt_policy", "")),
        "generation": ";".join(f"{k}={v}" for k, v in sorted(gen.items())) if isinstance(gen, dict) else "",
        "versions": _versions_str(s.get("versions")),
        "eval_dir": _rel(record.eval_dir, run_dir),
    }
    rows = []
    for scorer, metrics in sorted(s["scorers"].items()):
        for metric, mv in sorted(metrics.items()):
            if not isinstance(mv, dict) or "value" not in mv:
                raise BadInput(
                    "metric without a value", path=record.eval_dir / "scores.json", field=f"{scorer}.{metric}"
                )
            rows.append(
                {
                    **common,
                    "scorer": scorer,
                    "metric": metric,
                    "value": _fmt_float(mv.get("value")),
                    "ci_low": _fmt_float(mv.get("ci_low")),
                    "ci_high": _fmt_float(mv.get("ci_high")),
                    "n": _fmt_float(mv.get("n")),
                }
            )
    return rows


def _sort_key(row: dict[str, str]) -> tuple[Any, ...]:
    kind_order = {"base": 0, "sweep": 1, "reference": 2}
    return (
        kind_order.get(row["kind"], 3),
        row["label"],
        float(row["fraction"] or -1),
        int(row["seed"] or -1),
        row["benchmark"],
        row["scorer"],
        row["metric"],
    )


def collect(run_dir: str | Path, *, run: str | None = None) -> list[dict[str, str]]:
    """The tidy rows of every stored score under `run_dir`, in a stable order."""
    run_dir = Path(run_dir)
    name = run or run_dir.resolve().name
    rows = [r for rec in collect_records(run_dir) for r in record_rows(rec, name, run_dir)]
    rows.sort(key=_sort_key)
    return rows


def to_csv(rows: list[dict[str, str]], columns: tuple[str, ...] = COLUMNS) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()
