"""STLLaVA-Med's one config dataclass and its named presets (`paper`, `phantom`).

Every knob of every stage is one typed, documented field here; `medvqa train` flags, `medvqa
stllava` step flags and sweep TOML keys derive from it. The `TrainConfig` optimisation fields are
stage 1's; `dpo_*` are DPO's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from medvqa.errors import BadInput
from medvqa.prompts import ASK_INSTRUCTION  # one source (Phantom's vocabulary covers it)
from medvqa.trainers.config import TrainConfig

STAGE_FILES = {
    "questions": "questions.jsonl",
    "answers": "answers.jsonl",
    "judged": "judged.jsonl",
    "pairs": "pairs.jsonl",
}
DPO_LOSSES = {"sigmoid": ["sigmoid"], "sigmoid+sft": ["sigmoid", "sft"]}


@dataclass
class STLLaVAMedConfig(TrainConfig):
    """STLLaVA-Med knobs. Defaults = the original scripts (heliossun/STLLaVA-Med `sqllava_med.sh`,
    `visual_sq.py`, `model_collectA.py`, `dpo_finetune.sh`), i.e. the `paper` preset.

    Stage 1: self-questioning (sq_ratio 0.5; as ask rows — the original's in-conversation form is
    `sq_format="conversation"`, see docs/trainers.md for why it is not the default), LoRA r128/α256
    on every linear layer, vision tower and projector at 1/4 of lr 2e-4, 3 epochs, cosine, warmup
    3%. Stage 2: k = 5 questions (T 1.2, top-p 0.95), two answers (T 1.2, top-p 0.95), no
    de-duplication, ties skipped (the original keeps them: `tie_policy="second"`); sigmoid DPO,
    β 0.1, lr 5e-6, cosine, warmup 3%, 1 epoch.
    """

    # stage 1 (the original scripts' values; TrainConfig's generic defaults are overridden here)
    vision_lr_scale: float = field(
        default=0.25,
        metadata={"help": "vision tower/projector lr as a multiple of the stage-1 lr (original: 1/4)"},
    )
    learning_rate: float = field(default=2e-4, metadata={"help": "stage-1 peak learning rate"})
    num_train_epochs: float = field(default=3.0, metadata={"help": "stage-1 epochs (if max_steps = -1)"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "stage-1 warmup fraction"})
    use_lora: bool = field(
        default=True, metadata={"help": "LoRA adapters (peft) instead of all weights, in stage 1 and DPO"}
    )
    lora_r: int = field(default=128, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=256, metadata={"help": "LoRA alpha"})
    sq_ratio: float = field(
        default=0.5,
        metadata={"help": "probability that a labeled question also becomes a self-questioning target"},
    )
    sq_format: Literal["rows", "conversation"] = field(
        default="rows",
        metadata={
            "help": "'conversation' = the original's: each labeled image's QA as one multi-turn row, later "
            "questions become targets with p = sq_ratio; 'rows' = separate ask rows beside the QA rows"
        },
    )
    sq_schedule: Literal["mixed", "separate", "after"] = field(
        default="mixed",
        metadata={
            "help": "'mixed' = ask rows beside the QA rows for all of stage 1, one model (the original); "
            "'separate' = those rows train an asker that only samples the questions, and the QA rows alone "
            "(SFT's own run) train the model that answers, starts DPO and is its reference, so asking "
            "cannot cost answering; 'after' = the QA rows alone for max_steps, then sq_steps over QA + "
            "ask rows with the vision tower and projector frozen"
        },
    )
    answering_model: str = field(
        default="",
        metadata={
            "help": "with sq_schedule='separate': a finished `sft` checkpoint folder of the same labeled "
            "fraction, seed, base model and training settings (e.g. a sweep's `{checkpoint:sft}`), used as "
            "the answering model instead of training the same weights again; checked against this run "
            "before it is copied into stage 1. Empty = train it"
        },
    )
    sq_steps: int = field(
        default=200,
        metadata={"help": "steps of the ask phase with sq_schedule='after' (on top of max_steps)"},
    )
    ask_instruction: str = field(
        default=ASK_INSTRUCTION,
        metadata={"help": "instruction that asks the model for a question about the image"},
    )
    # stage 2: questions and answers
    k_questions: int = field(default=5, metadata={"help": "questions sampled per unlabeled image"})
    question_temperature: float = field(
        default=1.2, metadata={"help": "sampling temperature of the questions"}
    )
    question_top_p: float = field(default=0.95, metadata={"help": "nucleus top-p of the questions"})
    question_max_new_tokens: int = field(default=32, metadata={"help": "longest question in tokens"})
    dedupe_questions: bool = field(
        default=False,
        metadata={"help": "answer each distinct (image, question) once (the original answers duplicates)"},
    )
    min_distinct_questions: int = field(
        default=0,
        metadata={
            "help": "ask k more questions of an image while it has fewer than this many distinct ones "
            "(0 = one round of k)"
        },
    )
    max_question_rounds: int = field(
        default=3, metadata={"help": "at most this many rounds of k questions (with min_distinct_questions)"}
    )
    n_answers: int = field(default=2, metadata={"help": "answers sampled per (distinct) question"})
    answer_temperature: float = field(default=1.2, metadata={"help": "sampling temperature of the answers"})
    answer_top_p: float = field(default=0.95, metadata={"help": "nucleus top-p of the answers"})
    answer_max_new_tokens: int = field(default=16, metadata={"help": "longest answer in tokens"})
    generation_batch_size: int = field(default=64, metadata={"help": "requests per generate() call"})
    max_unlabeled_images: int = field(
        default=0, metadata={"help": "use at most this many unlabeled images (seeded sample); 0 = all"}
    )
    # judge and pairs
    expert: str = field(
        default="phantom",
        metadata={
            "help": "the judge: a name in `medvqa experts`; its own settings (model, base_url, "
            "error_rate, ...) are expert_options"
        },
    )
    judge_cache: str = field(
        default="", metadata={"help": "judgment cache file (openai expert); empty = beside judged.jsonl"}
    )
    expert_options: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": 'the expert\'s own settings: fields of its config dataclass, e.g. {model = "gpt-4o"} '
            "(flags --expert-FIELD, a [trainer.expert_options] TOML table, or KEY=VALUE,...), checked "
            "against it"
        },
    )
    tie_policy: Literal["skip", "second"] = field(
        default="skip",
        metadata={
            "help": "all answers scored equal: skip the question, or 'second' = answer 2 chosen over "
            "answer 1 (the original code's rule)"
        },
    )
    pair_min_margin: float = field(
        default=0.0,
        metadata={"help": "a pair needs chosen - rejected score > 0 and >= this margin"},
    )
    pairs_per_question: int = field(
        default=1, metadata={"help": "at most this many pairs per question (best vs each worse answer)"}
    )
    labeled_replay: bool = field(
        default=False,
        metadata={
            "help": "add each labeled QA to the DPO data as a chosen == rejected row: no DPO gradient, "
            "only the SFT term trains on it (a replay of the labels; counted once in data used)"
        },
    )
    # DPO
    dpo_loss: Literal["sigmoid", "sigmoid+sft"] = field(
        default="sigmoid",
        metadata={"help": "'sigmoid' = the paper's DPO; 'sigmoid+sft' adds an SFT term on the chosen answer"},
    )
    beta: float = field(default=0.1, metadata={"help": "DPO beta"})
    dpo_learning_rate: float = field(default=5e-6, metadata={"help": "DPO learning rate"})
    dpo_num_train_epochs: float = field(default=1.0, metadata={"help": "DPO epochs over the pairs"})
    dpo_max_steps: int = field(default=-1, metadata={"help": "DPO steps; -1 = use dpo_num_train_epochs"})
    dpo_max_epochs: float = field(
        default=0.0,
        metadata={
            "help": "cap dpo_max_steps at this many epochs over the DPO rows (pairs + replay), as max_epochs "
            "does for stage 1 (whose cap DPO does not take); 0 = no cap"
        },
    )
    dpo_batch_size: int = field(default=32, metadata={"help": "DPO pairs per device batch"})
    dpo_report_pairs: int = field(
        default=512,
        metadata={
            "help": "after DPO, the reward margin/accuracy in checkpoint.json is measured on this many "
            "pairs (a seeded sample; one forward each, so all of them cost ~10% of a 3-epoch run); 0 = all"
        },
    )
    dpo_pack_pairs: bool = field(
        default=True,
        metadata={
            "help": "run each DPO pair as one row: the shared prompt and image once, then both answers, "
            "masked so neither sees the other (the same losses to float rounding; 0.57x the forward + "
            "backward of trl's two rows on the tiny model). Off = trl's own batch"
        },
    )
    dpo_lr_scheduler_type: str = field(default="cosine", metadata={"help": "DPO scheduler"})
    dpo_warmup_ratio: float = field(default=0.03, metadata={"help": "DPO warmup fraction"})
    # shared stages
    stage_cache: str = field(
        default="",
        metadata={
            "help": "folder of a content-addressed cache of stage 1, questions.jsonl and answers.jsonl "
            "(<folder>/<key>/): runs that agree on everything these depend on (base model files, labeled "
            "samples, unlabeled pool, seed, fraction, library versions, every setting except the judge's, "
            "the pairs' and DPO's) compute them once; a second run waits for the first (up to "
            "dist_timeout_s) and reuses the entry. Empty = no cache: everything in OUT/stages"
        },
    )
    # distributed
    dist_timeout_s: int = field(
        default=4 * 3600,
        metadata={
            "help": "process-group timeout in seconds (a rank waits this long at a barrier, e.g. while "
            "another finishes its share of stage-2 sampling)"
        },
    )

    def __post_init__(self) -> None:
        """The base class's ranges, and `expert_options` checked against the chosen expert's own
        config dataclass now (a sweep refuses a misspelt judge setting before any job runs)."""
        super().__post_init__()
        checks = [
            ("sq_ratio", 0 <= self.sq_ratio <= 1, "in [0, 1]"),
            ("sq_steps", self.sq_steps >= 1, ">= 1"),
            ("k_questions", self.k_questions >= 1, ">= 1"),
            ("min_distinct_questions", self.min_distinct_questions >= 0, ">= 0"),
            ("max_question_rounds", self.max_question_rounds >= 1, ">= 1"),
            ("n_answers", self.n_answers >= 1, ">= 1"),
            ("question_temperature", self.question_temperature > 0, "> 0"),
            ("answer_temperature", self.answer_temperature > 0, "> 0"),
            ("question_top_p", 0 < self.question_top_p <= 1, "in (0, 1]"),
            ("answer_top_p", 0 < self.answer_top_p <= 1, "in (0, 1]"),
            ("question_max_new_tokens", self.question_max_new_tokens >= 1, ">= 1"),
            ("answer_max_new_tokens", self.answer_max_new_tokens >= 1, ">= 1"),
            ("generation_batch_size", self.generation_batch_size >= 1, ">= 1"),
            ("max_unlabeled_images", self.max_unlabeled_images >= 0, ">= 0"),
            ("pair_min_margin", self.pair_min_margin >= 0, ">= 0"),
            ("pairs_per_question", self.pairs_per_question >= 1, ">= 1"),
            ("beta", self.beta > 0, "> 0"),
            ("dpo_learning_rate", self.dpo_learning_rate >= 0, ">= 0"),
            ("dpo_num_train_epochs", self.dpo_num_train_epochs > 0, "> 0"),
            ("dpo_max_steps", self.dpo_max_steps == -1 or self.dpo_max_steps >= 1, "-1 or >= 1"),
            ("dpo_max_epochs", self.dpo_max_epochs >= 0, ">= 0"),
            ("dpo_batch_size", self.dpo_batch_size >= 1, ">= 1"),
            ("dpo_report_pairs", self.dpo_report_pairs >= 0, ">= 0"),
            ("dpo_warmup_ratio", 0 <= self.dpo_warmup_ratio <= 1, "in [0, 1]"),
            ("dist_timeout_s", self.dist_timeout_s >= 1, ">= 1"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise BadInput(f"{type(self).__name__}: {name!r} must be {rule}, got {getattr(self, name)!r}")
        if self.answering_model and (self.sq_schedule != "separate" or self.use_lora):
            raise BadInput(
                f"{type(self).__name__}: 'answering_model' needs sq_schedule = 'separate' and use_lora = false "
                f"(got {self.sq_schedule!r}, use_lora = {self.use_lora}): only then is stage 1's answering "
                "model a full SFT model of the labeled QA alone"
            )
        from medvqa.config import dataclass_from_mapping
        from medvqa.registry import experts

        config_class = getattr(experts.get(self.expert), "config_class", None)
        if config_class is not None:
            dataclass_from_mapping(
                config_class, self.expert_options, where=f"expert {self.expert!r}", from_strings=True
            )
        elif self.expert_options:
            raise BadInput(f"expert {self.expert!r} has no settings; got {sorted(self.expert_options)}")


STLLAVA_PRESETS: dict[str, dict[str, Any]] = {
    # = the dataclass defaults: the original scripts, meant for a 7B LLaVA (see docs/trainers.md)
    "paper": {},
    # What measured best on Phantom with the tiny model (/work/shared/STLLAVA-STUDY.md, PHANTOM-NOTES):
    # full fine-tuning at lr 1e-3 (LoRA on a 460k-parameter model only slows it down), steps not
    # epochs; k = 8 questions, de-duplicated; 8 answers at T 1.5 / top-p 1 (two samples at top-p 0.95
    # are the same string 98% of the time); best vs worst, <= 1 pair per question; labeled replay;
    # DPO + SFT term at lr 5e-4 over ~10 epochs (plain sigmoid DPO helped less).
    "phantom": {
        "learning_rate": 1e-3,
        "max_steps": 1500,
        "warmup_ratio": 0.0,
        "use_lora": False,
        "vision_lr_scale": 1.0,  # not measured on Phantom yet: the full-rate recipe the study used
        "lora_r": 16,
        "lora_alpha": 32,
        "logging_steps": 100,
        "k_questions": 8,
        "question_temperature": 1.0,
        "dedupe_questions": True,
        "n_answers": 8,
        "answer_temperature": 1.5,
        "answer_top_p": 1.0,
        "generation_batch_size": 256,
        "pair_min_margin": 1.0,
        "labeled_replay": True,
        "dpo_loss": "sigmoid+sft",
        "dpo_learning_rate": 5e-4,
        "dpo_num_train_epochs": 10.0,
        "dpo_lr_scheduler_type": "cosine",
        "dpo_warmup_ratio": 0.0,
    },
}
