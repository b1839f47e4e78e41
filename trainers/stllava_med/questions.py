"""Stage 2, step 1: k sampled questions per unlabeled image → `questions.jsonl` `{id, image, question}`.

Each question `<image stem>-q<j>` has its own sampling seed (run seed, image name, j) and its own
generator, so a killed-and-resumed run, another batch size or another number of ranks writes the
same file byte for byte.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medvqa.distributed import Dist
from medvqa.trainers.stllava_med.answers import distinct_questions
from medvqa.trainers.stllava_med.config import STLLaVAMedConfig
from medvqa.trainers.stllava_med.stagefiles import image_key, run_sharded, seed_for


def unlabeled_pool(images: Sequence[str], cfg: STLLaVAMedConfig, seed: int) -> list[str]:
    pool = sorted(dict.fromkeys(str(i) for i in images))
    if cfg.max_unlabeled_images and len(pool) > cfg.max_unlabeled_images:
        pool = sorted(random.Random(seed_for("pool", seed)).sample(pool, cfg.max_unlabeled_images))
    return pool


def generate_questions(
    generator: Any,
    images: Sequence[str],
    out_path: Path,
    cfg: STLLaVAMedConfig,
    *,
    seed: int,
    policy: str = "",
    progress_log: Path | None = None,
    dist: Dist | None = None,
) -> dict[str, int]:
    """k sampled questions per image → `questions.jsonl` (resumes: finished questions are skipped)."""
    from medvqa.prompts import get_policy
    from medvqa.trainers.rows import instruction_prompt
    from medvqa.types import GenerationRequest, GenerationSettings

    # prompts only (no processor): the generator may be an hf: model or an openai: endpoint
    prompt = instruction_prompt(get_policy(policy or None), cfg.ask_instruction)
    settings = GenerationSettings(
        max_new_tokens=cfg.question_max_new_tokens,
        do_sample=True,
        temperature=cfg.question_temperature,
        top_p=cfg.question_top_p,
        seed=seed,
    )
    k = cfg.k_questions

    def round_items(pool: Sequence[str], r: int) -> list[dict[str, Any]]:
        return [
            {"id": f"{image_key(img)}-q{j}", "image": img, "j": j}
            for img in pool
            for j in range(r * k, (r + 1) * k)
        ]

    def produce(batch: list[Any]) -> list[dict[str, Any]]:
        requests = [
            GenerationRequest(
                image=it["image"], prompt=prompt, id=it["id"],
                seed=seed_for("questions", seed, image_key(it["image"]), it["j"]),
            )
            for it in batch
        ]  # fmt: skip
        texts = generator.generate(requests, settings)
        return [
            {"id": it["id"], "image": it["image"], "question": q.strip()}
            for it, q in zip(batch, texts, strict=True)
        ]

    # Round 0: k questions per image. With min_distinct_questions = m, each later round asks k more
    # of the images that still have fewer than m distinct questions (up to max_question_rounds).
    # Which images need another round depends only on earlier rounds' rows: deterministic, resumable.
    items = round_items(images, 0)
    needy: list[str] = list(images)
    distinct: Counter[str] = Counter()
    for r in range(max(1, cfg.max_question_rounds)):
        if r > 0:
            needy = [img for img in needy if distinct.get(img, 0) < cfg.min_distinct_questions]
            if not needy:
                break
            items = items + round_items(needy, r)
        rows = run_sharded(
            out_path,
            items,
            produce,
            batch_size=cfg.generation_batch_size,
            dist=dist or Dist(),
            stage="questions",
            progress_log=progress_log,
        )
        if not cfg.min_distinct_questions:
            break
        so_far = {it["id"] for it in items}  # rows of later rounds (a resumed run's) do not count yet
        asked = [q for q in rows if q["id"] in so_far and q["question"].strip()]
        distinct = Counter(q["image"] for q in distinct_questions(asked))
    return {"images": len(images), "questions": len(items)}
