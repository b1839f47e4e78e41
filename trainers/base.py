"""`TrainerPlugin`: the base of the registered trainers, and the one supervised stage they share."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from medvqa.errors import BadInput
from medvqa.trainers.checkpoints import checkpoint_meta, save_model, write_checkpoint
from medvqa.trainers.config import TrainConfig, config_with_preset
from medvqa.trainers.models import load_model_and_processor
from medvqa.trainers.rows import RowBuilder
from medvqa.trainers.trl_run import drop_trl_checkpoints, fit_sft, seed_everything


class TrainerPlugin:
    """Base of the registered trainers: `train(TrainRequest) -> Checkpoint`.

    Subclasses set `name`, `config_class` (one dataclass; flags and TOML keys derive from it) and
    `presets` (named overrides of that dataclass, e.g. "phantom"), and `trains_on`: what the
    request's samples are, "qa" (the benchmark's training QA) or "captions" (one caption per image,
    from the benchmark's `load_captions` or a captions file).
    """

    name: str = ""
    config_class: type = TrainConfig
    presets: Mapping[str, Mapping[str, Any]] = {}
    trains_on: str = "qa"

    @classmethod
    def make_config(cls, preset: str | None = None) -> Any:
        return config_with_preset(cls.config_class, cls.presets, preset)

    def _config(self, request: Any) -> Any:
        cfg = request.config if request.config is not None else self.config_class()
        if not isinstance(cfg, self.config_class):
            raise BadInput(
                f"trainer {self.name!r} needs a {self.config_class.__name__}, got {type(cfg).__name__}"
            )
        return cfg

    def train(self, request: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _train_supervised(
        self,
        request: Any,
        cfg: Any,
        make_rows: Callable[[RowBuilder], list[dict[str, Any]]],
        *,
        loss: str,
        n_labeled: int,
        **meta: Any,
    ) -> Any:
        """One SFT stage from the request's base model to a finished checkpoint folder.

        `make_rows(builder)` turns the request's samples into prompt/completion rows; `loss`,
        `n_labeled` and `meta` go into `checkpoint.json` (written last: its presence = finished).
        """
        from medvqa.types import Checkpoint

        out = Path(request.out_dir)
        seed_everything(request.seed)
        model, processor = load_model_and_processor(
            request.base_model, attn_implementation=cfg.attn_implementation
        )
        builder = RowBuilder(processor, cfg.prompt_policy)
        rows = make_rows(builder)
        model = fit_sft(
            model,
            processor,
            rows,
            cfg,
            work_dir=out / "_trl",
            log_path=out / "train_log.jsonl",
            seed=request.seed,
            stage=self.name,
            merge_lora=False,
        )
        save_model(model, processor, out)
        drop_trl_checkpoints(out / "_trl")
        checkpoint = checkpoint_meta(
            trainer=self.name,
            request=request,
            config=cfg,
            n_labeled=n_labeled,
            loss=loss,
            prompt_policy=builder.policy.name,
            adapter=cfg.use_lora,
            **meta,
        )
        write_checkpoint(out, checkpoint)
        return Checkpoint(path=out, meta=checkpoint)
