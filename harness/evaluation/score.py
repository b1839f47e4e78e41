"""Step 3 of an eval: `scores.json` + `scored.jsonl` (+ `skipped.jsonl`) from `predictions.jsonl`.

Needs the plan and the prediction rows only, never the model: a finished run can be rescored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from medvqa.errors import BadInput
from medvqa.evaluation.plan import EvalPlan
from medvqa.evaluation.runfiles import SCORED, SCORES, SKIPPED, read_rows
from medvqa.io import atomic_write_json, atomic_write_jsonl, library_versions, read_json


def finished_scores(plan: EvalPlan, key: str | None) -> dict[str, Any] | None:
    """scores.json of this key and these questions (a finished run), else None."""
    path = plan.out / SCORES
    if not key or not path.is_file():
        return None
    try:
        previous = read_json(path)
    except BadInput:
        return None
    if previous.get("key") == key and previous.get("questions_hash") == plan.ids_hash:
        return previous
    return None


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
    """Score the prediction `rows` ({question_id: row} of `key`) and write the run's score files."""
    from medvqa.scoring import score_samples

    out = plan.out
    answered = [s for s in plan.samples if s.id in rows]
    n_unanswered = len(plan.samples) - len(answered)
    if not answered:
        raise BadInput("no question could be answered (every image failed to load)", path=plan.root)
    result = score_samples(
        answered,
        {s.id: rows[s.id]["text"] for s in answered},
        scorers=plan.scorers,
        seed=plan.seed,
        n_boot=plan.n_boot,
    )
    atomic_write_jsonl(out / SCORED, ({**r, "key": key} for r in result.rows))
    summary = result.to_json()
    bench = plan.benchmark
    scores: dict[str, Any] = {
        "benchmark": bench.name,
        "benchmark_version": bench.version,
        "split": plan.split,
        "closed_rule": bench.closed_rule(plan.root),
        "prompt_policy": plan.policy.name,
        "prompt_policy_config": plan.policy.to_json(),
        "model": {"spec": plan.spec, "fingerprint": fingerprint},
        "generation": plan.settings.to_json(),
        "versions": library_versions(),
        "n": summary["n"],
        "n_open": summary["n_open"],
        "n_closed": summary["n_closed"],
        "n_skipped": plan.n_skipped_at_load + n_unanswered,
        "limit": plan.limit,
        "root": str(plan.root),
        "key": key,
        "questions_hash": plan.ids_hash,
        "ci": summary["ci"],
        "scorers": summary["scorers"],
    }
    if model_details is not None:
        scores["model"]["details"] = model_details
    skipped = list(skipped)
    for shard in sorted(out.glob("skipped.rank*.jsonl")):
        skipped += [] if shard.name == "skipped.rank0.jsonl" else read_rows(shard)
        shard.unlink()
    (out / SKIPPED).unlink(missing_ok=True)
    if skipped:
        atomic_write_jsonl(out / SKIPPED, sorted(skipped, key=lambda r: plan.order.get(r["id"], 0)))
    atomic_write_json(out / SCORES, scores)
    return scores
