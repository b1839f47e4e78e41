"""`stllava-med`: STLLaVA-Med self-training (Sun et al., EMNLP 2024, arXiv 2406.19973).

Stage 1, reasoning and learning to ask (`stage1`): SFT on the labeled fraction with visual
self-questioning. Stage 2, preference revelation, on a pool of unlabeled images, one resumable
JSONL file per step in `<out>/stages/`, one module per step:

    questions.jsonl  {id, image, question}                              questions: k per image
    answers.jsonl    {id, image, question, answer_type, answers: [n]}   answers: n per distinct question
    judged.jsonl     ... + scores: [n] (+ category)  or  skipped        judging: the expert, n at once
    pairs.jsonl      {id, image, prompt, answer_type, chosen, rejected, scores} (+ replay rows)   pairs
    dpo              trl DPOTrainer, reference = the stage-1 model       dpo

Every sampled item has its own seed and generator, so a stage killed mid-way and resumed, run at
another batch size or sharded over N ranks (`stagefiles`) writes the same bytes. Each step also
runs alone: `medvqa stllava questions|answers|judge|pairs|dpo` on explicit files. Settings: one
dataclass, two presets (`config`): `paper` (the original scripts) and `phantom` (what measured best
on Phantom). `checkpoint.json` records the loss and the counts that explain the result.
With `stage_cache`, stage 1 and the questions and answers live in a content-addressed entry
shared by the runs that only judge or train DPO differently (`stagecache`).
"""

from medvqa.trainers.stllava_med.answers import distinct_questions, generate_answers
from medvqa.trainers.stllava_med.config import (
    ASK_INSTRUCTION,
    DPO_LOSSES,
    STAGE_FILES,
    STLLAVA_PRESETS,
    STLLaVAMedConfig,
)
from medvqa.trainers.stllava_med.dpo import dpo_view, train_dpo
from medvqa.trainers.stllava_med.judging import build_expert, judge_answers, judge_counts
from medvqa.trainers.stllava_med.pairs import make_pairs, replay_rows, select_pairs
from medvqa.trainers.stllava_med.questions import generate_questions, unlabeled_pool
from medvqa.trainers.stllava_med.stage1 import stage1_rows, train_stage1
from medvqa.trainers.stllava_med.trainer import STLLaVAMedTrainer, load_generator, parseable_share

_load_generator = load_generator  # the name the step commands and tests use

__all__ = [
    "ASK_INSTRUCTION",
    "DPO_LOSSES",
    "STAGE_FILES",
    "STLLAVA_PRESETS",
    "STLLaVAMedConfig",
    "STLLaVAMedTrainer",
    "build_expert",
    "distinct_questions",
    "dpo_view",
    "generate_answers",
    "generate_questions",
    "judge_answers",
    "judge_counts",
    "load_generator",
    "make_pairs",
    "parseable_share",
    "replay_rows",
    "select_pairs",
    "stage1_rows",
    "train_dpo",
    "train_stage1",
    "unlabeled_pool",
]
