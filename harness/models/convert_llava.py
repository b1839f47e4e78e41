"""Convert original-format LLaVA / LLaVA-Med v1.5 checkpoints into transformers' LLaVA format.

`medvqa model convert-llava --src DIR --vision-tower PATH_OR_ID --out DIR` reads a checkpoint in
the layout of haotian-liu/LLaVA and microsoft/LLaVA-Med v1.5 (`config.json` with `model_type`
`llava_llama`/`llava_mistral` and the `mm_*` fields; weights `model.embed_tokens.*`,
`model.layers.*`, `model.norm.*`, `lm_head.*`, `model.mm_projector.*`; the CLIP vision tower named
by `mm_vision_tower`, usually not included) and writes a `LlavaForConditionalGeneration` folder
that `hf:DIR` loads with no remote code:

- text config: the source's own Llama/Mistral fields (`model_type` without the `llava_` prefix);
- vision tower: the CLIP checkpoint given by `--vision-tower` (as the original code loads it at
  inference), or the weights saved in the source when `unfreeze_mm_vision_tower` is set;
- projector: `mlp2x_gelu` (`mm_projector.0/2`) → `multi_modal_projector.linear_1/linear_2` with
  exact GELU; `linear` → `linear_1` = the source linear, `projector_hidden_act="linear"` and
  `linear_2` = identity with zero bias (transformers' `LlavaMultiModalProjector` always has two
  layers; the identity is exact: y = I·x + 0);
- `vision_feature_layer` = `mm_vision_select_layer`, strategy `default` for `patch` (CLS dropped)
  and `full` for `cls_patch`;
- tokenizer: `<image>` added as a special token (and `<pad>` when the tokenizer has no pad token),
  embeddings and `lm_head` resized to a multiple of 64 with transformers' `resize_token_embeddings`
  (new rows drawn around the mean of the old ones: the same procedure transformers'
  `convert_llava_weights_to_hf.py` uses, with a fixed seed);
- processor: `LlavaProcessor` with the PIL backend of `LlavaImageProcessor` (no torchvision), whose
  `do_pad` pads to a square with the image-mean colour before the CLIP resize and centre crop:
  exactly the original `expand2square` for `image_aspect_ratio="pad"`;
- chat template: `[INST] <image>\\n{question} [/INST]` for Mistral (LLaVA-Med v1.5's
  `mistral_instruct`), the `llava_v1` (vicuna) USER/ASSISTANT format for Llama.

Anything it cannot convert faithfully is refused with a `BadInput` that names the field or the
weights: `mm_use_im_start_end=True`, projectors other than `linear`/`mlp2x_gelu` (e.g. SQ-LLaVA's
`cluster` projector used by STLLaVA-Med), `anyres` aspect handling, `mm_patch_merge_type` other
than `flat`, unknown weight names. A refused checkpoint is never half-written.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medvqa.errors import BadInput
from medvqa.prompts import LLAVA_SYSTEM  # the llava_v1 system line, defined once

SUPPORTED_MODEL_TYPES = {"llava_llama": "llama", "llava_mistral": "mistral"}
SUPPORTED_PROJECTORS = ("linear", "mlp2x_gelu")
SUPPORTED_ASPECT = {"pad": True, "square": False, "": False, None: False}
SELECT_FEATURE_STRATEGY = {"patch": "default", "cls_patch": "full"}
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
PAD_TO_MULTIPLE_OF = 64
RESIZE_SEED = 0

# Original LLaVA config keys that describe the multimodal wrapper, not the language model.
_WRAPPER_KEYS = {
    "architectures",
    "model_type",
    "auto_map",
    "transformers_version",
    "image_aspect_ratio",
    "image_grid_pinpoints",
    "freeze_mm_mlp_adapter",
    "tune_mm_mlp_adapter",
    "unfreeze_mm_vision_tower",
    "mm_hidden_size",
    "mm_projector_type",
    "mm_projector_lr",
    "mm_use_im_patch_token",
    "mm_use_im_start_end",
    "mm_vision_select_feature",
    "mm_vision_select_layer",
    "mm_vision_tower",
    "mm_vision_tower_lr",
    "mm_patch_merge_type",
    "mm_resampler_type",
    "use_mm_proj",
    "tokenizer_model_max_length",
    "tokenizer_padding_side",
    # LLaVA-Med v1.5's segmentation-token experiment fields (unused at inference)
    "feature_outs",
    "img_size",
    "vision_backbone",
    "segtok_posembed",
}

# The original chat formats (llava/conversation.py): `mistral_instruct` for LLaVA-Med v1.5,
# `llava_v1` (vicuna) for Llama-based LLaVA. Image parts come first, each followed by "\n", as
# the original code puts `<image>\n` before the question. The template writes the BOS (the
# original tokenization starts with it; the hf adapter does not add special tokens to chat text).
# Every literal is a Jinja expression: transformers renders with trim_blocks/lstrip_blocks, which
# would otherwise eat the spaces and newlines that these formats depend on.
_PARTS = (
    "{%- if message['content'] is string -%}"
    "{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
)
_USER_BODY = (
    "{%- for part in parts if part['type'] == 'image' -%}{{ '<image>\\n' }}{%- endfor -%}"
    "{%- for part in parts if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
)
_TEXT = "{%- for part in parts if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}" + _PARTS + "{%- if message['role'] == 'system' -%}"
    "{{ '<<SYS>>\\n' }}" + _TEXT + "{{ '\\n<</SYS>>\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ '[INST] ' }}" + _USER_BODY + "{{ ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ ' ' }}" + _TEXT + "{{ ' </s>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

VICUNA_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set ns = namespace(system='" + LLAVA_SYSTEM.replace("'", "\\'") + "') -%}"
    "{%- for message in messages if message['role'] == 'system' -%}"
    + _PARTS
    + "{%- set ns.system = parts | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') -%}"
    "{%- endfor -%}"
    "{{ ns.system + ' ' }}"
    "{%- for message in messages if message['role'] != 'system' -%}"
    + _PARTS
    + "{%- if message['role'] == 'user' -%}"
    "{{ 'USER: ' }}" + _USER_BODY + "{{ ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ 'ASSISTANT: ' }}" + _TEXT + "{{ '</s>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)
CHAT_TEMPLATES = {"mistral": MISTRAL_CHAT_TEMPLATE, "llama": VICUNA_CHAT_TEMPLATE}
CHAT_FORMATS = {"mistral": "mistral_instruct", "llama": "llava_v1"}


# --- reading the source ------------------------------------------------------------------------


def read_source_config(src: Path) -> dict[str, Any]:
    path = src / "config.json"
    if not path.is_file():
        raise BadInput("no config.json: not a model folder", path=src)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BadInput(f"not valid JSON ({exc})", path=path) from exc
    if not isinstance(config, dict):
        raise BadInput("expected a JSON object", path=path)
    return config


def check_supported(config: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """What the converter will do with this config, or a BadInput naming what it cannot convert."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        known = ", ".join(SUPPORTED_MODEL_TYPES)
        hint = ""
        if model_type == "llava":
            hint = " (this already looks like a transformers LLaVA folder: use it as hf:DIR directly)"
        raise BadInput(
            f"unsupported model_type {model_type!r}; supported: {known}{hint}", path=path, field="model_type"
        )
    if config.get("mm_use_im_start_end"):
        raise BadInput(
            "mm_use_im_start_end=True (image wrapped in <im_start>/<im_end> tokens, LLaVA-Med v1.0 style) "
            "has no transformers LlavaForConditionalGeneration equivalent; not converted",
            path=path,
            field="mm_use_im_start_end",
        )
    projector = config.get("mm_projector_type", "linear")  # the original code's default
    if projector not in SUPPORTED_PROJECTORS:
        detail = ""
        if projector == "cluster":
            detail = " (SQ-LLaVA's clustering projector, used by STLLaVA-Med: not expressible as a LLaVA MLP)"
        raise BadInput(
            f"unsupported mm_projector_type {projector!r}{detail}; supported: {', '.join(SUPPORTED_PROJECTORS)}",
            path=path,
            field="mm_projector_type",
        )
    aspect = config.get("image_aspect_ratio")
    if aspect not in SUPPORTED_ASPECT:
        raise BadInput(
            f"unsupported image_aspect_ratio {aspect!r} (anyres tiling is LLaVA-NeXT); supported: pad, square",
            path=path,
            field="image_aspect_ratio",
        )
    merge = config.get("mm_patch_merge_type", "flat")
    if merge != "flat":
        raise BadInput(
            f"unsupported mm_patch_merge_type {merge!r}; supported: flat",
            path=path,
            field="mm_patch_merge_type",
        )
    feature = config.get("mm_vision_select_feature", "patch")
    if feature not in SELECT_FEATURE_STRATEGY:
        raise BadInput(
            f"unsupported mm_vision_select_feature {feature!r}; supported: patch, cls_patch",
            path=path,
            field="mm_vision_select_feature",
        )
    layer = config.get("mm_vision_select_layer", -2)
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise BadInput(
            f"mm_vision_select_layer must be an integer, got {layer!r}",
            path=path,
            field="mm_vision_select_layer",
        )
    resampler = config.get("mm_resampler_type")
    if resampler not in (None, "", "identity"):
        raise BadInput(f"unsupported mm_resampler_type {resampler!r}", path=path, field="mm_resampler_type")
    return {
        "text_model_type": SUPPORTED_MODEL_TYPES[model_type],
        "projector": projector,
        "projector_declared": "mm_projector_type" in config,
        "do_pad": SUPPORTED_ASPECT[aspect],
        "strategy": SELECT_FEATURE_STRATEGY[feature],
        "vision_feature_layer": layer,
        "unfreeze_vision": bool(config.get("unfreeze_mm_vision_tower", False)),
    }


def load_source_state_dict(src: Path) -> dict[str, Any]:
    """All tensors of the source: safetensors (single or sharded) or PyTorch .bin (weights_only)."""
    import torch
    from safetensors.torch import load_file

    files = sorted(src.glob("*.safetensors"))
    if files:
        state: dict[str, Any] = {}
        for f in files:
            state.update(load_file(str(f), device="cpu"))
        return state
    files = sorted(p for p in src.glob("*.bin") if p.name.startswith(("pytorch_model", "model")))
    if not files:
        raise BadInput("no weights (*.safetensors or pytorch_model*.bin)", path=src)
    state = {}
    for f in files:
        try:
            part = torch.load(str(f), map_location="cpu", weights_only=True)
        except Exception as exc:  # pickles with code in them are refused by weights_only
            raise BadInput(
                f"cannot load with weights_only=True ({type(exc).__name__}: {exc})", path=f
            ) from exc
        if not isinstance(part, Mapping):
            raise BadInput("expected a state dict (name → tensor)", path=f)
        state.update(part)
    return state


_VISION_PREFIXES = ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower.vision_tower.")


def split_state_dict(
    state: Mapping[str, Any], plan: Mapping[str, Any], src: Path
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], Any, list[str]]:
    """(language model, projector (HF names), vision tower or {}, lm_head weight or None, notes)."""
    lm: dict[str, Any] = {}
    proj: dict[str, Any] = {}
    vision: dict[str, Any] = {}
    lm_head = None
    unknown: list[str] = []
    notes: list[str] = []
    if plan["projector"] == "mlp2x_gelu":
        proj_map = {
            "model.mm_projector.0.weight": "linear_1.weight",
            "model.mm_projector.0.bias": "linear_1.bias",
            "model.mm_projector.2.weight": "linear_2.weight",
            "model.mm_projector.2.bias": "linear_2.bias",
        }
    else:
        proj_map = {
            "model.mm_projector.weight": "linear_1.weight",
            "model.mm_projector.bias": "linear_1.bias",
        }
    for key, value in state.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        if key in proj_map:
            proj[proj_map[key]] = value
        elif key == "lm_head.weight":
            lm_head = value
        elif key.startswith(("model.embed_tokens.", "model.layers.", "model.norm.")):
            lm[key.removeprefix("model.")] = value
        elif key.startswith("model.vision_tower."):
            for prefix in _VISION_PREFIXES:
                if key.startswith(prefix):
                    vision[key.removeprefix(prefix)] = value
                    break
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        shown = ", ".join(sorted(unknown)[:8]) + (" ..." if len(unknown) > 8 else "")
        implicit = ""
        if not plan.get("projector_declared", True):
            implicit = (
                ", taken from the original LLaVA default because config.json has no mm_projector_type; "
                "SQ-LLaVA / STLLaVA-Med default to their unsupported 'cluster' projector"
            )
        raise BadInput(
            f"{len(unknown)} weight(s) this converter does not know how to map "
            f"(mm_projector_type={plan['projector']!r}{implicit}): {shown}",
            path=src,
            field="weights",
        )
    missing = sorted(set(proj_map.values()) - set(proj))
    if missing:
        expected = ", ".join(k for k, v in proj_map.items() if v in missing)
        raise BadInput(
            f"projector weights missing for mm_projector_type={plan['projector']!r}: {expected}",
            path=src,
            field="weights",
        )
    if vision and not plan["unfreeze_vision"]:
        notes.append(
            "the source holds vision-tower weights but unfreeze_mm_vision_tower is false: like the original "
            "loader, they are ignored and the --vision-tower checkpoint is used"
        )
        vision = {}
    if plan["unfreeze_vision"] and not vision:
        raise BadInput(
            "unfreeze_mm_vision_tower=true but the source holds no model.vision_tower.* weights",
            path=src,
            field="unfreeze_mm_vision_tower",
        )
    return lm, proj, vision, lm_head, notes


def text_config_from_source(config: Mapping[str, Any], text_model_type: str) -> Any:
    from transformers import AutoConfig

    fields = {k: v for k, v in config.items() if k not in _WRAPPER_KEYS and not k.startswith("mm_")}
    fields.pop("_name_or_path", None)
    # Training runs often save use_cache=false; the KV cache changes no output, only speed.
    fields["use_cache"] = True
    return AutoConfig.for_model(text_model_type, **fields)


def _read_image_processor_fields(vision_tower: str, vision_config: Any) -> dict[str, Any]:
    """CLIP preprocessing of the tower (its preprocessor_config.json), else the CLIP defaults."""
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    fields: dict[str, Any] = {
        "size": {"shortest_edge": vision_config.image_size},
        "crop_size": {"height": vision_config.image_size, "width": vision_config.image_size},
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
        "resample": 3,  # bicubic
        "do_resize": True,
        "do_center_crop": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
    }
    path = Path(vision_tower) / "preprocessor_config.json"
    if not path.is_file():
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(vision_tower, "preprocessor_config.json"))
        except Exception:
            return fields
    saved = json.loads(path.read_text(encoding="utf-8"))
    for key in list(fields):
        if key in saved:
            fields[key] = saved[key]
    if isinstance(fields["crop_size"], int):
        fields["crop_size"] = {"height": fields["crop_size"], "width": fields["crop_size"]}
    if isinstance(fields["size"], int):
        fields["size"] = {"shortest_edge": fields["size"]}
    return fields


# --- the conversion ----------------------------------------------------------------------------


def convert_llava(
    src: str | Path, vision_tower: str | None, out: str | Path, *, force: bool = False
) -> dict[str, Any]:
    """Convert `src` into a transformers LLaVA folder at `out`; returns the conversion record."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise BadInput("source folder does not exist", path=src)
    config = read_source_config(src)
    plan = check_supported(config, src / "config.json")
    vision_tower = vision_tower or config.get("mm_vision_tower")
    if not vision_tower:
        raise BadInput(
            "no --vision-tower given and config.json has no mm_vision_tower", path=src / "config.json"
        )
    if out.exists() and not out.is_dir():
        raise BadInput("output path exists and is a file", path=out)
    if out.exists() and any(out.iterdir()) and not force:
        raise BadInput("output folder exists and is not empty (use --force to replace it)", path=out)
    if out.resolve() == src.resolve():
        raise BadInput("--out must differ from --src", path=out)

    import torch
    from accelerate import init_empty_weights
    from medvqa.io import atomic_write_json, library_versions
    from transformers import (
        AddedToken,
        AutoTokenizer,
        CLIPVisionModel,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )
    from transformers.models.llava import LlavaImageProcessorPil, LlavaProcessor

    state = load_source_state_dict(src)
    lm_sd, proj_sd, vision_sd, lm_head, notes = split_state_dict(state, plan, src)
    text_config = text_config_from_source(config, plan["text_model_type"])

    try:
        tower = CLIPVisionModel.from_pretrained(vision_tower, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise BadInput(
            f"cannot load the CLIP vision tower ({exc})", path=vision_tower, field="--vision-tower"
        ) from exc
    vision_config = tower.config
    mm_hidden = config.get("mm_hidden_size")
    if mm_hidden is not None and mm_hidden != vision_config.hidden_size:
        raise BadInput(
            f"mm_hidden_size={mm_hidden} but the vision tower {vision_tower} has hidden_size {vision_config.hidden_size}",
            path=src / "config.json",
            field="mm_hidden_size",
        )
    in_features = proj_sd["linear_1.weight"].shape[1]
    if in_features != vision_config.hidden_size:
        raise BadInput(
            f"projector input size {in_features} differs from the vision tower's hidden size "
            f"{vision_config.hidden_size} ({vision_tower})",
            path=src,
            field="model.mm_projector",
        )
    n_layers = vision_config.num_hidden_layers
    layer = plan["vision_feature_layer"]
    if not -(n_layers + 1) <= layer <= n_layers:
        raise BadInput(
            f"mm_vision_select_layer={layer} is out of range for a {n_layers}-layer tower",
            path=src / "config.json",
            field="mm_vision_select_layer",
        )
    vision_state = vision_sd or tower.state_dict()

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src))
    except (OSError, ValueError) as exc:
        raise BadInput(f"cannot load the tokenizer ({exc})", path=src, field="tokenizer") from exc
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    dtype = lm_sd["embed_tokens.weight"].dtype
    tie = bool(getattr(text_config, "tie_word_embeddings", False))
    if lm_head is None and not tie:
        raise BadInput("no lm_head.weight and tie_word_embeddings is false", path=src, field="lm_head.weight")

    llava_config = LlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_index=image_token_id,
        image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2
        + (1 if plan["strategy"] == "full" else 0),
        projector_hidden_act="gelu" if plan["projector"] == "mlp2x_gelu" else "linear",
        vision_feature_select_strategy=plan["strategy"],
        vision_feature_layer=layer,
        multimodal_projector_bias="linear_1.bias" in proj_sd,
        tie_word_embeddings=tie,
    )
    if plan["projector"] == "linear":
        hidden = proj_sd["linear_1.weight"].shape[0]
        proj_sd["linear_2.weight"] = torch.eye(hidden, dtype=proj_sd["linear_1.weight"].dtype)
        if "linear_1.bias" in proj_sd:
            proj_sd["linear_2.bias"] = torch.zeros(hidden, dtype=proj_sd["linear_1.weight"].dtype)
        notes.append("linear projector: linear_2 is the identity (exact), projector_hidden_act='linear'")

    with init_empty_weights():
        model = LlavaForConditionalGeneration(llava_config)
    inner = model.model
    _load(inner.language_model, lm_sd, "language model", src)
    _load(inner.multi_modal_projector, proj_sd, "projector", src)
    _load(inner.vision_tower, {k: v.to(dtype) for k, v in vision_state.items()}, "vision tower", vision_tower)
    if tie:
        model.tie_weights()
    else:
        _load(model.lm_head, {"weight": lm_head}, "lm_head", src)
    model.to(dtype)
    still_empty = [n for n, p in model.named_parameters() if p.is_meta]
    if still_empty:
        raise BadInput(
            f"weights missing after conversion: {', '.join(still_empty[:6])}", path=src, field="weights"
        )

    old_vocab = model.get_input_embeddings().weight.shape[0]
    new_vocab = max(old_vocab, len(tokenizer))
    torch.manual_seed(RESIZE_SEED)
    model.resize_token_embeddings(new_vocab, pad_to_multiple_of=PAD_TO_MULTIPLE_OF, mean_resizing=True)
    llava_config.text_config.vocab_size = model.get_input_embeddings().weight.shape[0]
    # The pad token may be new: set it only now that the embeddings hold its row.
    model.config.text_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    ip = _read_image_processor_fields(str(vision_tower), vision_config)
    image_processor = LlavaImageProcessorPil(do_pad=plan["do_pad"], **ip)
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=plan["strategy"],
        chat_template=CHAT_TEMPLATES[plan["text_model_type"]],
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # CLIP's CLS token
    )
    tokenization = check_tokenization(processor, image_token_id)
    if not tokenization["identical"] and prefix_text_after_special_tokens(tokenizer):
        fixed = check_tokenization(processor, image_token_id)
        if fixed["identical"]:
            tokenization = fixed
            notes.append(
                "tokenizer: text after a special token now gets the '▁' prefix (Metaspace prepend_scheme "
                "'always', legacy=true), as the original chunk-by-chunk tokenization gives it"
            )
        else:
            prefix_text_after_special_tokens(tokenizer, undo=True)
    record = {
        "converter": "medvqa model convert-llava",
        "source": str(src.resolve()),
        "source_model_type": config.get("model_type"),
        "vision_tower": str(vision_tower),
        "vision_tower_weights": "source checkpoint" if vision_sd else "vision tower checkpoint",
        "projector": plan["projector"],
        "image_aspect_ratio": config.get("image_aspect_ratio"),
        "image_preprocessing": "pad to square with the image-mean colour, then CLIP resize + crop"
        if plan["do_pad"]
        else "CLIP resize + centre crop",
        "vision_feature_layer": layer,
        "vision_feature_select_strategy": plan["strategy"],
        "image_token": IMAGE_TOKEN,
        "image_token_id": image_token_id,
        "vocab_size": {"source": old_vocab, "converted": llava_config.text_config.vocab_size},
        "chat_format": CHAT_FORMATS[plan["text_model_type"]],
        "dtype": str(dtype).removeprefix("torch."),
        "tokenization": tokenization,
        "notes": notes,
        "versions": library_versions(),
    }

    tmp = out.with_name(out.name + ".converting")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(str(tmp))
        processor.save_pretrained(str(tmp))
        # what a user gets is the reloaded processor: check the tokenization on that
        from transformers import AutoProcessor

        tokenization = check_tokenization(AutoProcessor.from_pretrained(str(tmp)), image_token_id)
        record["tokenization"] = tokenization
        for path in ("chat_template", "raw_text"):
            if not tokenization[path]["identical"]:
                notes.append(
                    f"{path.replace('_', '-')} prompts do not reproduce the original chunked tokenization "
                    f"(first difference at token {tokenization[path]['first_difference']}; see conversion.json "
                    "'tokenization'): scores may differ slightly from the original code's"
                )
        atomic_write_json(tmp / "conversion.json", record)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return record


def prefix_text_after_special_tokens(tokenizer: Any, *, undo: bool = False) -> bool:
    """Make a sentencepiece-style (Metaspace) tokenizer prefix "▁" to text after special tokens.

    The original code tokenizes the chunks around `<image>` one by one, so each chunk starts with
    the "▁" a sentencepiece tokenizer prepends to a string; tokenizing the whole prompt with
    `prepend_scheme="first"` (transformers' `legacy=False`) drops it after `<image>` and `<s>`.
    `"always"` (`legacy=True`) restores it, and `legacy` is saved so a reload keeps it. Returns
    whether anything was changed.
    """
    from tokenizers import pre_tokenizers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre = getattr(backend, "pre_tokenizer", None)
    if not isinstance(pre, pre_tokenizers.Metaspace):
        return False
    before, after = ("always", "first") if undo else ("first", "always")
    if pre.prepend_scheme != before:
        return False
    pre.prepend_scheme = after
    backend.pre_tokenizer = pre
    if hasattr(tokenizer, "legacy"):
        tokenizer.legacy = not undo
    tokenizer.init_kwargs["legacy"] = not undo
    return True


def check_tokenization(
    processor: Any, image_token_id: int, question: str = "What is shown in this image?"
) -> dict:
    """Compare the converted tokenization of a prompt with the original LLaVA one.

    The original `tokenizer_image_token` tokenizes the text chunks around `<image>` separately
    (the first with BOS, the others without) and splices the image index between them. The
    converted processor tokenizes the whole string, `<image>` being an added special token: a chat
    prompt as rendered by the chat template (BOS written as text, `add_special_tokens=False`), a
    raw-text policy prompt with `add_special_tokens=True`. For sentencepiece tokenizers these can
    differ right after a special token (a "▁" prefix), depending on the tokenizer's `legacy`
    setting; this records, for both paths, whether they agree and where they first differ.
    """
    tok = processor.tokenizer
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    body = rendered.removeprefix(tok.bos_token or "")
    chunks = body.split(IMAGE_TOKEN)
    original = list(tok(chunks[0])["input_ids"])
    for chunk in chunks[1:]:
        original += [image_token_id, *tok(chunk, add_special_tokens=False)["input_ids"]]

    def first_difference(ids: list[int]) -> int | None:
        diff = next((i for i, (a, b) in enumerate(zip(original, ids)) if a != b), None)
        if diff is None and len(original) != len(ids):
            diff = min(len(original), len(ids))
        return diff

    chat_ids = list(tok(rendered, add_special_tokens=False)["input_ids"])
    raw_ids = list(tok(body)["input_ids"])
    chat_diff, raw_diff = first_difference(chat_ids), first_difference(raw_ids)
    return {
        "prompt": rendered,
        "identical": chat_diff is None and raw_diff is None,
        "original_ids": original,
        "chat_template": {"identical": chat_diff is None, "first_difference": chat_diff, "ids": chat_ids},
        "raw_text": {"identical": raw_diff is None, "first_difference": raw_diff, "ids": raw_ids},
    }


def _load(module: Any, state: Mapping[str, Any], what: str, where: object) -> None:
    result = module.load_state_dict(dict(state), strict=False, assign=True)
    missing = [k for k in result.missing_keys if not re.search(r"(inv_freq|position_ids)$", k)]
    if missing or result.unexpected_keys:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
        if result.unexpected_keys:
            unexpected = result.unexpected_keys
            parts.append(f"unexpected {', '.join(unexpected[:6])}{' ...' if len(unexpected) > 6 else ''}")
        raise BadInput(
            f"{what} weights do not match the config: {'; '.join(parts)}", path=where, field="weights"
        )


# --- command line ------------------------------------------------------------------------------


def convert_from_args(args: argparse.Namespace) -> int:
    """Entry point of `medvqa model convert-llava` (imports torch/transformers only when called)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the resize/mean-init and config-type notices are expected here
    try:
        record = convert_llava(
            args.src, args.vision_tower, args.out, force=bool(getattr(args, "force", False))
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    print(
        f"converted {record['source_model_type']} ({record['projector']} projector, "
        f"{record['chat_format']} chat format, image token id {record['image_token_id']}) → {args.out}"
    )
    for note in record["notes"]:
        print(f"note: {note}")
    print(f"score it with: medvqa eval --model hf:{args.out} --benchmark NAME --prompt-policy llava-med-v1.5")
    return 0
