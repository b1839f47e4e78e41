"""A tiny, offline LLaVA: `medvqa model init-tiny`.

`LlavaForConditionalGeneration` (CLIP vision tower + Llama language model, random init), a
word-level tokenizer trained offline with `tokenizers` on a corpus (Phantom's question/answer/
caption texts by default), a chat template, and an image processor that needs no torchvision
(`CLIPImageProcessorPil`), all written with `save_pretrained`, so that `hf:DIR` loads it like any
hub checkpoint. The number of `<image>` tokens is (image_size / patch)² (strategy "default": the
CLS token is dropped).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from medvqa.errors import BadInput

PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<s>", "</s>", "<image>"
USER, ASSISTANT = "<user>", "<assistant>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, IMAGE, USER, ASSISTANT)

# The tiny model's own chat format: <s><user> <image> question <assistant> answer </s>.
# Text parts are rendered verbatim; the word-level tokenizer splits on whitespace and punctuation.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if message['content'] is string %}{{ message['content'] }} "
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}"
    "{{ part['text'] }} {% endif %}{% endfor %}{% endif %}"
    "{% elif message['role'] == 'user' %}<user>"
    "{% if message['content'] is string %} {{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %} <image>{% elif part['type'] == 'text' %} {{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% elif message['role'] == 'assistant' %}<assistant>"
    "{% if message['content'] is string %} {{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %} {{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)

# `--corpus builtin` (or Phantom not importable): the words of generic radiology VQA.
BUILTIN_CORPUS = (
    "what is the modality of this image ? which organ is shown in the image ? is this a ct scan ?",
    "is this an mri ? is this an x-ray ? is there a lesion in the left lung ? is the image normal ?",
    "how many lesions are there ? where is the lesion located ? are there multiple lesions ?",
    "yes no ct mri x-ray ultrasound chest brain abdomen head lung liver kidney left right upper lower",
    "zero one two three four five none normal abnormal",
    "describe the image . a scan of the with showing and",
)


@dataclass
class TinyConfig:
    """The shape of the tiny LLaVA. Every field is one `medvqa model init-tiny` flag."""

    image_size: int = field(default=64, metadata={"help": "square input image size in pixels"})
    patch: int = field(
        default=8, metadata={"help": "vision patch size; <image> tokens = (image_size/patch)^2"}
    )
    hidden: int = field(default=128, metadata={"help": "language-model hidden size"})
    layers: int = field(default=4, metadata={"help": "language-model layers"})
    heads: int = field(default=4, metadata={"help": "language-model attention heads"})
    vision_hidden: int = field(default=64, metadata={"help": "vision-tower hidden size"})
    vision_layers: int = field(default=2, metadata={"help": "vision-tower layers"})
    vision_heads: int = field(default=2, metadata={"help": "vision-tower attention heads"})
    max_positions: int = field(default=512, metadata={"help": "maximum sequence length"})
    corpus: str = field(
        default="phantom",
        metadata={
            "help": "tokenizer corpus: a benchmark that lists its texts (phantom), 'builtin', or a text "
            "file (one text per line)"
        },
    )
    seed: int = field(default=0, metadata={"help": "random seed of the initial weights"})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# Named shapes. "phantom" is what the CPU prototype trained fast (~456k parameters at 32 px).
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "phantom": {
        "image_size": 32,
        "patch": 8,
        "hidden": 128,
        "layers": 2,
        "vision_hidden": 64,
        "vision_layers": 2,
    },
}


def preset_config(name: str, **overrides: Any) -> TinyConfig:
    if name not in PRESETS:
        raise BadInput(f"unknown tiny-model preset {name!r}; known: {', '.join(PRESETS)}")
    return replace(TinyConfig(**PRESETS[name]), **overrides)


def prompt_texts() -> list[str]:
    """The fixed words of every registered prompt policy (instructions, options, system lines)."""
    from medvqa import prompts

    texts = [prompts.SHORT_ANSWER, prompts.CLOSED_YES_NO]
    for name in prompts.policy_names():
        policy = prompts.get_policy(name)
        for text in (policy.instruction, policy.closed_options, policy.system or "", policy.template):
            texts.append(
                text.replace("{question}", " ").replace("{suffix}", " ").replace("{instruction}", " ")
            )
    return [t for t in texts if t.strip()]


def corpus_texts(corpus: str) -> list[str]:
    """Texts the tokenizer learns its vocabulary from (plus the prompt policies' own words)."""
    if corpus == "builtin":
        return [*BUILTIN_CORPUS, *prompt_texts()]
    from medvqa.registry import benchmarks

    if corpus in benchmarks:  # a benchmark that can list its texts (`Benchmark.vocabulary`)
        try:
            texts = benchmarks.get(corpus)().vocabulary()
        except ImportError:  # a stripped-down install without that benchmark
            return [*BUILTIN_CORPUS, *prompt_texts()]
        if not texts:
            raise BadInput(f"benchmark {corpus!r} cannot list its texts; pass a text file as the corpus")
        return [*texts, *prompt_texts()]
    path = Path(corpus)
    if not path.is_file():
        raise BadInput("tokenizer corpus is neither a benchmark, 'builtin' nor a text file", path=path)
    texts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [*texts, *prompt_texts()]


def build_tokenizer(texts: Iterable[str]) -> Any:
    """A word-level fast tokenizer (lower-cased; words and punctuation marks are tokens)."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(tok_models.WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    # words (hyphenated ones like "x-ray" stay whole) and single punctuation marks
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Split(Regex(r"\w+(?:[-']\w+)*|[^\w\s]"), behavior="isolated"),
        ]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS), min_frequency=1)
    tok.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        extra_special_tokens={"image_token": IMAGE},
        additional_special_tokens=[USER, ASSISTANT],
        padding_side="left",
        model_max_length=1_000_000,
        chat_template=CHAT_TEMPLATE,
    )


def build_processor(tokenizer: Any, config: TinyConfig) -> Any:
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    size = config.image_size
    image_processor = CLIPImageProcessorPil(
        size={"height": size, "width": size},
        crop_size={"height": size, "width": size},
        do_center_crop=False,
        do_resize=True,
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_model(tokenizer: Any, config: TinyConfig) -> Any:
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if config.image_size % config.patch:
        raise BadInput(f"--image-size {config.image_size} is not a multiple of --patch {config.patch}")
    if config.hidden % config.heads or config.vision_hidden % config.vision_heads:
        raise BadInput("hidden sizes must be multiples of their head counts (--hidden/--heads)")
    vision = CLIPVisionConfig(
        hidden_size=config.vision_hidden,
        intermediate_size=config.vision_hidden * 2,
        num_hidden_layers=config.vision_layers,
        num_attention_heads=config.vision_heads,
        image_size=config.image_size,
        patch_size=config.patch,
        projection_dim=config.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden,
        intermediate_size=config.hidden * 2,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.heads,
        max_position_embeddings=config.max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    llava = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(config.seed)
    model = LlavaForConditionalGeneration(llava)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.do_sample = False
    return model


def init_tiny(out_dir: str | Path, config: TinyConfig | None = None, *, force: bool = False) -> Path:
    """Write a randomly initialised tiny LLaVA (model, tokenizer, processor) to `out_dir`."""
    config = config or TinyConfig()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not force:
        raise BadInput("output folder exists and is not empty (pass --force to overwrite)", path=out)
    tokenizer = build_tokenizer(corpus_texts(config.corpus))
    processor = build_processor(tokenizer, config)
    model = build_model(tokenizer, config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    (out / "tiny_config.json").write_text(
        json.dumps({**config.to_json(), "n_parameters": n_params, "vocab_size": len(tokenizer)}, indent=2)
        + "\n",
        encoding="utf-8",
    )
    return out
