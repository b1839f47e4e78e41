"""`medvqa model init-tiny | convert-llava | info`: build, convert and inspect model folders."""

from __future__ import annotations

import argparse
import json

from medvqa.config import add_dataclass_arguments, dataclass_from_args

ORDER = 30


def _tiny_config_cls() -> type:
    # harness.models.tiny imports nothing heavy at top level (torch/transformers inside functions).
    from medvqa.models.tiny import TinyConfig

    return TinyConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="build, convert and inspect model folders", description=__doc__)
    msub = p.add_subparsers(title="model commands", metavar="SUBCOMMAND")

    tiny = msub.add_parser(
        "init-tiny",
        help="write a tiny random-init LLaVA (offline tokenizer, no torchvision) that hf:DIR loads",
        description="Write a tiny LLaVA (CLIP vision + Llama text, random init) with a word-level "
        "tokenizer trained offline on the corpus, a chat template and a PIL image processor. "
        "--preset phantom is the ~456k-parameter, 32 px shape that trains fast on a CPU.",
    )
    tiny.add_argument("--out", required=True, help="output folder")
    tiny.add_argument(
        "--preset",
        default="default",
        choices=("default", "phantom"),
        help="starting shape; explicit flags override it (default: default)",
    )
    tiny.add_argument("--force", action="store_true", help="overwrite a non-empty output folder")
    add_dataclass_arguments(tiny, _tiny_config_cls())
    tiny.set_defaults(func=run_init_tiny)

    conv = msub.add_parser(
        "convert-llava",
        help="convert an original-format LLaVA / LLaVA-Med checkpoint to a transformers Llava folder",
        description="Convert an original-format LLaVA checkpoint (model_type llava_llama/llava_mistral, "
        "mm_projector weights) plus its CLIP vision tower into a LlavaForConditionalGeneration folder.",
    )
    conv.add_argument("--src", required=True, help="original-format checkpoint folder")
    conv.add_argument("--vision-tower", required=True, help="CLIP vision tower folder or hub id")
    conv.add_argument("--out", required=True, help="output folder")
    conv.add_argument("--force", action="store_true", help="overwrite a non-empty output folder")
    conv.set_defaults(func=run_convert_llava)

    info = msub.add_parser("info", help="load a model spec and print its identity (fingerprint, class)")
    info.add_argument("--model", required=True, help="model spec, e.g. hf:DIR[,adapter=DIR]")
    info.set_defaults(func=run_info)


def run_init_tiny(args: argparse.Namespace) -> int:
    from medvqa.models.tiny import init_tiny, preset_config

    base = preset_config(args.preset)
    config = dataclass_from_args(type(base), args, base=base)
    out = init_tiny(args.out, config, force=args.force)
    meta = json.loads((out / "tiny_config.json").read_text(encoding="utf-8"))
    print(
        f"wrote {out}: tiny LLaVA, {meta['n_parameters']:,} parameters, vocab {meta['vocab_size']}, "
        f"{config.image_size} px / patch {config.patch} → {(config.image_size // config.patch) ** 2} image tokens"
    )
    print(f"use it as: --model hf:{out}")
    return 0


def run_convert_llava(args: argparse.Namespace) -> int:
    try:
        from medvqa.models.convert_llava import convert_from_args
    except ImportError as exc:
        from medvqa.errors import BadInput

        raise BadInput(f"LLaVA conversion is not available in this installation ({exc})") from None
    return int(convert_from_args(args) or 0)


def run_info(args: argparse.Namespace) -> int:
    from medvqa.models import load_model

    model = load_model(args.model)
    info = model.describe() if hasattr(model, "describe") else {"spec": model.spec}
    info.setdefault("fingerprint", model.fingerprint)
    print(json.dumps(info, indent=2))
    return 0
