"""Step 3 of an eval: `scores.json` + `scored.jsonl` (+ `skipped.jsonl`) from `predictions.jsonl`.

Needs the plan and the prediction rows only, never the model: a finished run is rescored when
its scoring options (`plan.scoring()`: scorers, scorer version, bootstrap, `+think`) changed.
`scores.json` holds no absolute local path (it travels with reports): the data root is recorded
relative to the run folder, with a content hash of the questions; model paths likewise.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medvqa.benchmarks.hub import hub_root_uri
from medvqa.errors import BadInput
from medvqa.evaluation.plan import EvalPlan
from medvqa.evaluation.runfiles import SCORED, SCORES, SKIPPED
from medvqa.io import atomic_write_json, atomic_write_jsonl, library_versions, read_json, read_rows


def _previous(plan: EvalPlan, key: str | None) -> dict[str, Any] | None:
    """scores.json of this key and these questions, whatever its scoring options, else None."""
    path = plan.out / SCORES
    if not key or not path.is_file():
        return None
    try:
        previous = read_json(path)
    except BadInput:
        return None
    if (
        isinstance(previous, dict)
        and previous.get("key") == key
        and previous.get("questions_hash") == plan.ids_hash
    ):
        return previous
    return None


def finished_scores(plan: EvalPlan, key: str | None) -> dict[str, Any] | None:
    """scores.json of this key, these questions and these scoring options (a finished run), else None."""
    previous = _previous(plan, key)
    return previous if previous is not None and previous.get("scoring") == plan.scoring() else None


def previous_model_details(plan: EvalPlan, key: str | None) -> dict[str, Any] | None:
    """The model description an earlier scoring of this key recorded (a rescore loads no model)."""
    previous = _previous(plan, key)
    model = previous.get("model") if previous else None
    details = model.get("details") if isinstance(model, dict) else None
    return details if isinstance(details, dict) else None


def portable_path(text: str, base: Path) -> str:
    """An absolute local path as seen from `base` (the run folder); anything else unchanged."""
    if not os.path.isabs(text):
        return text
    try:
        return Path(os.path.relpath(Path(text).resolve(), base.resolve())).as_posix()
    except ValueError:  # another drive (Windows)
        return Path(text).name


def portable_spec(spec: str, base: Path) -> str:
    """A model spec with its absolute paths (target, `adapter=`) made relative to `base`."""
    prefix, sep, rest = spec.partition(":")
    if not sep or "/" in prefix or "\\" in prefix or len(prefix) == 1:  # no adapter prefix (or a drive)
        prefix, sep, rest = "", "", spec
    items = []
    for item in rest.split(","):
        name, eq, value = item.partition("=")
        items.append(f"{name}={portable_path(value, base)}" if eq else portable_path(item, base))
    return prefix + sep + ",".join(items)


def score_run(
    plan: EvalPlan,
    key: str,
    fingerprint: str,
    rows: dict[str, dict],
    *,
    skipped: list[dict[str, str]],
    model_details: dict[str, Any] | None,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Score the prediction `rows` ({question_id: row} of `key`) and write the run's score files.

    `skipped` are the images this rank could not read while generating (rank shards add theirs);
    with the records skipped at load they are counted in `n_skipped` and listed in skipped.jsonl.
    """
    from medvqa.scoring import score_samples

    out = plan.out
    answered = [s for s in plan.samples if s.id in rows]
    if not answered:
        raise BadInput("no question could be answered (every image failed to load)", path=plan.root)
    result = score_samples(
        answered,
        {s.id: plan.policy.scored_text(rows[s.id]["text"]) for s in answered},
        scorers=plan.scorers,
        seed=plan.seed,
        n_boot=plan.n_boot,
    )
    atomic_write_jsonl(out / SCORED, ({**r, "key": key} for r in result.rows))

    at_generation = list(skipped)
    for shard in sorted(out.glob("skipped.rank*.jsonl")):
        at_generation += [] if shard.name == "skipped.rank0.jsonl" else read_rows(shard)
        shard.unlink()
    # a question neither answered nor listed now: its image failed in an earlier run (a rescore)
    listed = {str(r.get("id")) for r in at_generation}
    for row in read_rows(out / SKIPPED):
        qid = str(row.get("id"))
        if row.get("stage") != "load" and qid not in rows and qid not in listed and qid in plan.order:
            at_generation.append({"stage": "generate", "id": qid, "error": str(row.get("error", ""))})
            listed.add(qid)
    at_generation += [
        {"stage": "generate", "id": s.id, "error": "no prediction"}
        for s in plan.samples
        if s.id not in rows and s.id not in listed
    ]
    at_generation.sort(key=lambda r: plan.order.get(str(r.get("id")), 0))
    n_unanswered = len(plan.samples) - len(answered)

    summary = result.to_json()
    bench = plan.benchmark
    details = model_details
    if details is not None:
        details = {k: portable_path(v, out) if isinstance(v, str) else v for k, v in details.items()}
        details["spec"] = portable_spec(str(details.get("spec", plan.spec)), out)
    scores: dict[str, Any] = {
        "benchmark": bench.name,
        "benchmark_version": bench.version,
        "split": plan.split,
        "closed_rule": bench.closed_rule(plan.root, plan.split),
        "prompt_policy": plan.policy.name,
        "prompt_policy_config": plan.policy.to_json(),
        "model": {"spec": portable_spec(plan.spec, out), "fingerprint": fingerprint},
        "generation": plan.settings.to_json(),
        "versions": library_versions(),
        "n": summary["n"],
        "n_open": summary["n_open"],
        "n_closed": summary["n_closed"],
        "n_skipped": len(plan.load_skips) + n_unanswered,
        "n_skipped_at_load": len(plan.load_skips),
        "n_skipped_at_generation": n_unanswered,
        "limit": plan.limit,
        # a hub snapshot as hf://datasets/OWNER/NAME@COMMIT (the same for every user), else relative
        "root": hub_root_uri(plan.root) or portable_path(str(plan.root.absolute()), out),
        "data_hash": plan.data_hash,
        "key": key,
        "questions_hash": plan.ids_hash,
        "scoring": plan.scoring(),
        "ci": summary["ci"],
        "scorers": summary["scorers"],
    }
    if details is not None:
        scores["model"]["details"] = details
    (out / SKIPPED).unlink(missing_ok=True)
    if plan.load_skips or at_generation:
        atomic_write_jsonl(out / SKIPPED, [*plan.load_skips, *at_generation])
    atomic_write_json(out / SCORES, scores)
    return scores
