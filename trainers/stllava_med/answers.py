"""Stage 2, step 2: n sampled answers per (distinct) question → `answers.jsonl`.

Row: `{id, image, question, answer_type, answers: [a_1 … a_n]}` (or `skipped` for an empty
question). With `dedupe_questions`, a question repeating an (image, question) already asked is
answered once, under the first id: at k = 8 half the questions are repeats, and answering them
again only repeats the same pairs. Answer i of question `id` is sampled with its own seed (run
seed, id, i) and generator, so the file does not depend on batching, resumption or ranks.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from medvqa.distributed import Dist
from medvqa.trainers.stllava_med.config import STLLaVAMedConfig
from medvqa.trainers.stllava_med.stagefiles import iter_checked, run_sharded, seed_for

_NON_WORD = re.compile(r"[^\w\s]+")


def question_key(image: str, question: str) -> tuple[str, str]:
    """(image, question) up to case, punctuation and spacing: what counts as the same question."""
    return str(image), " ".join(_NON_WORD.sub(" ", question.lower()).split())


def distinct_questions(questions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: set[tuple[str, str]] = set()
    out = []
    for q in questions:
        key = question_key(q["image"], q["question"])
        if key not in seen:
            seen.add(key)
            out.append(q)
    return out


def generate_answers(
    generator: Any,
    questions_path: Path,
    out_path: Path,
    cfg: STLLaVAMedConfig,
    *,
    seed: int,
    policy: str = "",
    progress_log: Path | None = None,
    dist: Dist | None = None,
) -> dict[str, int]:
    """`n_answers` sampled answers per question → `answers.jsonl` (resumable)."""
    from medvqa.prompts import get_policy
    from medvqa.trainers.rows import guess_answer_type
    from medvqa.types import GenerationRequest, GenerationSettings

    prompt_policy = get_policy(policy or None)  # prompts only: the generator may be hf: or openai:
    questions = iter_checked(questions_path, ("id", "image", "question"))
    items = distinct_questions(questions) if cfg.dedupe_questions else questions
    n = max(1, cfg.n_answers)
    settings = GenerationSettings(
        max_new_tokens=cfg.answer_max_new_tokens,
        do_sample=True,
        temperature=cfg.answer_temperature,
        top_p=cfg.answer_top_p,
        seed=seed,
    )

    def produce(batch: list[Any]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        asked = [q for q in batch if q["question"].strip()]
        types = {q["id"]: guess_answer_type(q["question"]) for q in asked}
        requests = [
            GenerationRequest(
                image=q["image"], prompt=prompt_policy.render(q["question"], types[q["id"]]), id=q["id"],
                seed=seed_for("answers", seed, q["id"], i),
            )
            for q in asked
            for i in range(n)
        ]  # fmt: skip
        texts = generator.generate(requests, settings) if requests else []
        by_id = {q["id"]: [t.strip() for t in texts[k * n : (k + 1) * n]] for k, q in enumerate(asked)}
        for q in batch:
            base = {"id": q["id"], "image": q["image"], "question": q["question"]}
            if q["id"] in by_id:
                rows.append({**base, "answer_type": types[q["id"]], "answers": by_id[q["id"]]})
            else:
                rows.append({**base, "answers": [], "skipped": "empty question"})
        return rows

    run_sharded(
        out_path,
        items,
        produce,
        batch_size=max(1, cfg.generation_batch_size // n),
        dist=dist or Dist(),
        stage="answers",
        progress_log=progress_log,
    )
    n_empty = sum(not q["question"].strip() for q in items)
    return {
        "questions": len(questions),
        "distinct_questions": len(items),
        "duplicate_questions": len(questions) - len(items),
        "answered": len(items) - n_empty,
        "n_answers": n,
    }
