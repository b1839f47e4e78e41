"""Our eval folders as lm-eval / lmms-eval result files, so the tools built for those read our runs.

    export_run("runs/demo", "exports/demo", fmt="lm-eval")

Reads only stored files (`scores.json`, `scored.jsonl`, `predictions.jsonl` of each eval folder under
RUN) and writes, per model (evals grouped by model fingerprint), into `<out>/<model_name_sanitized>/`:

- lm-eval naming: `results_<date>.json` and `samples_<task>_<date>.jsonl` (what lm-eval's
  `EvaluationTracker` writes and `lm_eval.utils.get_results_filenames` / `make_table` read);
- lmms-eval naming: `<date>_results.json` and `<date>_samples_<task>.jsonl` (what lmms-eval's tracker
  writes and its `--baseline` loader pairs by name).

Task = benchmark (+ `_<split>` unless test) for the `llava-med` scorer, `<task>_strict` for the strict
one; filter `none`. Metrics are fractions (lm-eval's convention; our reports use percent), each with
`<metric>_stderr`: the standard error of the mean clustered by image (the analytic counterpart of the
clustered bootstrap CI in scores.json). Each sample row carries `doc_id` (position in the eval's
question order), `doc`, `target`, `arguments`, `resps`, `filtered_resps`, `filter`, `metrics`, the
three hashes, one key per metric and `score` (the row's headline metric, the key lmms-eval's baseline
loader looks for). `<date>` is when scores.json was written, so re-exporting gives the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medvqa.errors import BadInput
from medvqa.io import atomic_write_json, atomic_write_jsonl, read_json, read_jsonl
from medvqa.scoring import HEADLINE

FORMATS: tuple[str, ...] = ("lm-eval", "lmms-eval")
SCORES, SCORED, PREDICTIONS = "scores.json", "scored.jsonl", "predictions.jsonl"  # an eval folder's files


@dataclass(frozen=True)
class EvalFolder:
    """One eval folder's stored files."""

    path: Path
    scores: dict[str, Any]
    rows: list[dict[str, Any]]  # scored.jsonl, benchmark order
    prompts: dict[str, str]  # question id -> prompt text (predictions.jsonl)
    run: Path | None = None  # the exported folder, which local model paths are named from

    @property
    def model_name(self) -> str:
        """The model as lm-eval names it: the spec's target without adapter prefix or options.

        A local checkpoint (scores.json records it relative to the eval folder) is named by its path
        inside the exported run (`sft/f0.09/s0/checkpoint`), or without its `..` parts when it lies
        outside; a hub id stays as it is.
        """
        spec = str(self.scores.get("model", {}).get("spec", "model"))
        target = spec.split(":", 1)[-1].split(",")[0] if ":" in spec else spec.split(",")[0]
        local = Path(target).expanduser()
        local = local if local.is_absolute() else self.path / local
        if not (target.startswith((".", "/", "~")) or local.exists()):
            return target
        if self.run is not None:
            try:
                return local.resolve().relative_to(Path(self.run).resolve()).as_posix()
            except ValueError:
                pass
        return "/".join(p for p in Path(target).parts if p not in ("..", ".", "/", "~")) or local.name

    @property
    def fingerprint(self) -> str:
        return str(self.scores.get("model", {}).get("fingerprint") or self.model_name)

    def task(self, scorer: str) -> str:
        split = str(self.scores.get("split", "test"))
        name = str(self.scores.get("benchmark", "benchmark")) + ("" if split == "test" else f"_{split}")
        return sanitize_task_name(name + ("" if scorer == "llava-med" else f"_{scorer}"))

    @property
    def date(self) -> datetime:
        return datetime.fromtimestamp((self.path / SCORES).stat().st_mtime, UTC)


def sanitize_model_name(name: str) -> str:
    """lm-eval's folder name for a model (`lm_eval.utils.sanitize_model_name`)."""
    return re.sub(r"[\"<>:/|\\?*\[\]]+", "__", name)


def sanitize_task_name(name: str) -> str:
    """lm-eval's file-name form of a task (`lm_eval.utils.sanitize_task_name`)."""
    return re.sub(r"\W", "_", name)


def hash_string(text: str) -> str:
    """lm-eval's `doc_hash` / `prompt_hash` / `target_hash`: sha256 of the text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- reading ---------------------------------------------------------------------------------


def find_eval_folders(run: str | Path) -> list[Path]:
    """RUN itself when it is an eval folder, else every eval folder below it (sorted)."""
    run = Path(run)
    if not run.exists():
        raise BadInput("run folder does not exist", path=run)
    if (run / SCORES).is_file():
        return [run]
    found = sorted(p.parent for p in run.rglob(SCORES) if "stale" not in p.parts)
    if not found:
        raise BadInput(f"no eval folder ({SCORES}) under this folder", path=run)
    return found


def load_eval_folder(path: Path, run: Path | None = None) -> EvalFolder:
    """scores.json + its scored.jsonl (same key) + the prompts of predictions.jsonl."""
    scores = read_json(path / SCORES)
    if not isinstance(scores, dict) or not isinstance(scores.get("scorers"), dict):
        raise BadInput("not a medvqa scores file (no 'scorers' object)", path=path / SCORES, field="scorers")
    rows = read_jsonl(path / SCORED)
    key = scores.get("key")
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or "id" not in row or "answer_type" not in row:
            raise BadInput("expected a scored row with 'id' and 'answer_type'", path=path / SCORED, record=i)
        if key is not None and row.get("key", key) != key:
            raise BadInput(
                f"row of another run (key {row.get('key')!r}, scores.json has {key!r}); rerun the eval",
                path=path / SCORED,
                record=i,
                field="key",
            )
    prompts: dict[str, str] = {}
    if (path / PREDICTIONS).is_file():
        for row in read_jsonl(path / PREDICTIONS, allow_truncated_tail=True):
            if isinstance(row, dict) and row.get("key", key) == key and "question_id" in row:
                prompts[str(row["question_id"])] = str(row.get("prompt", ""))
    return EvalFolder(path=path, scores=scores, rows=rows, prompts=prompts, run=run)


# --- the tidy per-sample table and its aggregates ----------------------------------------------


def tidy_samples(evals: Sequence[EvalFolder]) -> Any:
    """pandas long table: one row per (task, doc_id, metric) with the value as a fraction."""
    import pandas as pd

    records = []
    for ev in evals:
        for scorer in ev.scores["scorers"]:
            task = ev.task(scorer)
            for doc_id, row in enumerate(ev.rows):
                for metric, value in (row.get(scorer) or {}).items():
                    if isinstance(value, int | float) and math.isfinite(value):
                        records.append(
                            (task, doc_id, str(row.get("image_id", doc_id)), metric, value / 100.0)
                        )
    return pd.DataFrame.from_records(records, columns=["task", "doc_id", "image_id", "metric", "value"])


def aggregate(tidy: Any) -> Any:
    """Mean and clustered standard error per (task, metric), as a pandas frame indexed by both.

    stderr = sqrt(G/(G-1) · Σ_g (Σ_{i∈g} (x_i − x̄))²) / n over the G images (CR1); "N/A" below 2 images.
    """
    import pandas as pd

    df = tidy.assign(resid=tidy["value"] - tidy.groupby(["task", "metric"])["value"].transform("mean"))
    per_image = df.groupby(["task", "metric", "image_id"])["resid"].sum().pow(2)
    stats = pd.DataFrame(
        {
            "value": df.groupby(["task", "metric"])["value"].mean(),
            "n": df.groupby(["task", "metric"])["value"].size(),
            "images": per_image.groupby(level=["task", "metric"]).size(),
            "ss": per_image.groupby(level=["task", "metric"]).sum(),
        }
    )
    g, n = stats["images"], stats["n"]
    stats["stderr"] = (g / (g - 1).where(g > 1) * stats["ss"]).pow(0.5) / n
    return stats.drop(columns="ss")


def _check_against_scores(ev: EvalFolder, stats: Any) -> None:
    """Our aggregates must equal scores.json (which is what every report shows), else refuse."""
    for scorer, metrics in ev.scores["scorers"].items():
        for metric, stored in metrics.items():
            value = stored.get("value") if isinstance(stored, dict) else None
            if value is None:
                continue
            key = (ev.task(scorer), metric)
            if key not in stats.index or not math.isclose(
                stats.loc[key, "value"] * 100.0, value, rel_tol=1e-9, abs_tol=1e-9
            ):
                raise BadInput(
                    f"{scorer} {metric} = {value} does not match the mean of {SCORED} "
                    f"({stats.loc[key, 'value'] * 100.0 if key in stats.index else 'absent'}); rerun the eval",
                    path=ev.path / SCORES,
                    field=f"scorers.{scorer}.{metric}",
                )


# --- writing ---------------------------------------------------------------------------------


def results_document(
    evals: Sequence[EvalFolder], stats: Any, *, git_hash: str | None, run: Path | None = None
) -> dict[str, Any]:
    """lm-eval's aggregated results dict (`results`, `configs`, `versions`, `n-samples`, `config`, ...)."""
    results: dict[str, dict[str, Any]] = {}
    configs: dict[str, dict[str, Any]] = {}
    versions: dict[str, str] = {}
    n_samples: dict[str, dict[str, int]] = {}
    higher: dict[str, dict[str, bool]] = {}
    hashes: dict[str, str] = {}
    first = evals[0].scores
    for ev in evals:
        s = ev.scores
        for scorer, metrics in s["scorers"].items():
            task = ev.task(scorer)
            entry: dict[str, Any] = {"alias": task}
            for metric in metrics:
                if (task, metric) not in stats.index:
                    continue
                row = stats.loc[(task, metric)]
                entry[f"{metric},none"] = float(row["value"])
                se = row["stderr"]
                entry[f"{metric}_stderr,none"] = "N/A" if not math.isfinite(se) else float(se)
            results[task] = entry
            configs[task] = {
                "task": task,
                "dataset_path": s.get("benchmark"),
                "test_split": s.get("split"),
                "output_type": "generate_until",
                "num_fewshot": 0,
                "metric_list": [
                    {"metric": m, "aggregation": "mean", "higher_is_better": True} for m in metrics
                ],
                "generation_kwargs": s.get("generation", {}),
                "metadata": {
                    "version": s.get("benchmark_version"),
                    "harness": "medvqa",
                    "scorer": scorer,
                    "closed_rule": s.get("closed_rule"),
                    "prompt_policy": s.get("prompt_policy_config", s.get("prompt_policy")),
                    # which data: the root (hf://datasets/OWNER/NAME@COMMIT for a hub root) and its hash
                    "data_root": s.get("root"),
                    "data_hash": s.get("data_hash"),
                    "ci": s.get("ci"),
                    "key": s.get("key"),
                },
            }
            versions[task] = str(s.get("benchmark_version", "N/A"))
            n = int(s.get("n", len(ev.rows)))
            n_samples[task] = {"original": n + int(s.get("n_skipped", 0) or 0), "effective": n}
            higher[task] = dict.fromkeys(metrics, True)
            hashes[task] = hash_string(
                "".join(f"sample_{i}{_doc_hash(row)}" for i, row in enumerate(ev.rows))
            )
    date = max(ev.date for ev in evals)
    return {
        "results": results,
        "group_subtasks": {task: [] for task in results},
        "configs": configs,
        "versions": versions,
        "n-shot": dict.fromkeys(results, 0),
        "higher_is_better": higher,
        "n-samples": n_samples,
        "config": {
            "model": evals[0].model_name,
            "model_args": first.get("model", {}).get("spec"),
            "model_fingerprint": evals[0].fingerprint,
            "batch_size": None,
            "limit": first.get("limit") or None,
            "bootstrap_iters": first.get("ci", {}).get("n_boot"),
            "gen_kwargs": first.get("generation"),
            "random_seed": first.get("generation", {}).get("seed"),
        },
        "git_hash": git_hash,
        "date": date.timestamp(),
        "task_hashes": hashes,
        "model_name": evals[0].model_name,
        "model_name_sanitized": sanitize_model_name(evals[0].model_name),
        "versions_of_libraries": first.get("versions", {}),
        # relative to the exported folder: no local absolute path in a file meant to be shared
        "medvqa_eval_dirs": [_relative(ev.path, run) for ev in evals],
    }


def _relative(path: Path, run: Path | None) -> str:
    if run is None:
        return path.name
    try:
        return path.resolve().relative_to(run.resolve()).as_posix() or "."
    except ValueError:
        return path.name


def _doc(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "question_id": str(row["id"]),
        "question": row.get("question", ""),
        "answer": row.get("gold", ""),
        "answer_type": row["answer_type"],
        "image_id": row.get("image_id", ""),
        "meta": row.get("meta", {}),
    }


def _doc_hash(row: dict[str, Any]) -> str:
    return hash_string(json.dumps(_doc(row), indent=2, ensure_ascii=False))


def sample_rows(ev: EvalFolder, scorer: str, fmt: str) -> list[dict[str, Any]]:
    """One lm-eval (or lmms-eval) sample row per question, as their trackers write them."""
    out = []
    gen = ev.scores.get("generation", {})
    for doc_id, row in enumerate(ev.rows):
        metrics = {m: v / 100.0 for m, v in (row.get(scorer) or {}).items() if isinstance(v, int | float)}
        prompt = ev.prompts.get(str(row["id"]), row.get("question", ""))
        prediction = str(row.get("prediction", ""))
        target = str(row.get("gold", ""))
        sample: dict[str, Any] = {"doc_id": doc_id, "doc": _doc(row), "target": target}
        if fmt == "lmms-eval":
            sample["input"] = prompt
        else:
            sample["arguments"] = {"gen_args_0": {"arg_0": prompt, "arg_1": gen}}
        sample.update(
            {
                "resps": [[prediction]],
                "filtered_resps": [prediction],
                "filter": "none",
                "metrics": list(metrics),
                "doc_hash": _doc_hash(row),
                "prompt_hash": hash_string(prompt),
                "target_hash": hash_string(target),
                **metrics,
                "score": metrics.get(HEADLINE.get(row["answer_type"], ""), 0.0),
            }
        )
        out.append(sample)
    return out


def file_names(fmt: str, date: datetime, task: str | None = None) -> str:
    """The tracker's file name: results (task None) or the samples of `task`."""
    date_id = date.isoformat().replace("+00:00", "").replace(":", "-")
    if fmt == "lmms-eval":
        return f"{date_id}_results.json" if task is None else f"{date_id}_samples_{task}.jsonl"
    return f"results_{date_id}.json" if task is None else f"samples_{task}_{date_id}.jsonl"


def git_hash() -> str | None:
    """The harness's own commit (`git describe --always --dirty`), where it runs from a checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def _group_by_model(evals: Iterable[EvalFolder]) -> dict[str, list[EvalFolder]]:
    groups: dict[str, list[EvalFolder]] = {}
    for ev in evals:
        groups.setdefault(ev.fingerprint, []).append(ev)
    for group in groups.values():
        seen: dict[str, Path] = {}
        for ev in group:
            for scorer in ev.scores["scorers"]:
                task = ev.task(scorer)
                if task in seen:
                    raise BadInput(
                        f"task {task!r} of this model is also in {seen[task]} (another prompt policy or "
                        "setting?); export the two folders separately",
                        path=ev.path,
                    )
                seen[task] = ev.path
    return groups


def export_run(run: str | Path, out: str | Path, *, fmt: str = "lm-eval") -> list[Path]:
    """Write the results and samples files of every model evaluated under `run`; returns the paths."""
    if fmt not in FORMATS:
        raise BadInput(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    evals = [load_eval_folder(p, Path(run)) for p in find_eval_folders(run)]
    commit = git_hash()
    written: list[Path] = []
    for group in _group_by_model(evals).values():
        stats = aggregate(tidy_samples(group))
        for ev in group:
            _check_against_scores(ev, stats)
        doc = results_document(group, stats, git_hash=commit, run=Path(run))
        folder = Path(out) / doc["model_name_sanitized"]
        date = max(ev.date for ev in group)
        path = folder / file_names(fmt, date)
        atomic_write_json(path, doc)
        written.append(path)
        for ev in group:
            for scorer in ev.scores["scorers"]:
                path = folder / file_names(fmt, date, ev.task(scorer))
                atomic_write_jsonl(path, sample_rows(ev, scorer, fmt))
                written.append(path)
    return written
