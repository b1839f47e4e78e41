"""`medvqa model convert-llava`: original-format LLaVA / LLaVA-Med v1.5 → transformers LLaVA.

The tests fabricate tiny checkpoints in the original layout (the original key names and config
fields, a Llama/Mistral language model, a CLIP vision tower in its own folder), convert them, and
check the converted model against a forward pass assembled by hand from the source weights the
way the original code runs it: CLIP hidden_states[select_layer][:, 1:] → projector → spliced into
the token embeddings where the image goes → the language model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from medvqa.errors import BadInput  # noqa: E402
from medvqa.models.convert_llava import convert_llava  # noqa: E402
from PIL import Image  # noqa: E402

CORPUS = (
    "a chat between curious human and an artificial intelligence assistant . the gives helpful , detailed "
    "polite answers to human's questions user : [ inst ] / is there lesion in left lung ? what modality "
    "this image ct mri yes no ### hi there how can help you today"
)
TEXT = dict(
    vocab_size=None,  # set from the tokenizer
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
)
IMAGE_SIZE, PATCH = 32, 8  # 16 patches + CLS
N_IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in CORPUS.split():
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _sentencepiece_tokenizer():
    """A Llama (sentencepiece-style BPE, byte fallback) tokenizer as transformers 5 builds it:
    legacy=False, i.e. Metaspace prepend_scheme "first"."""
    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3}
    for i in range(256):
        vocab[f"<0x{i:02X}>"] = len(vocab)
    for word in ("▁[", "INST", "]", "▁What", "▁is", "▁shown", "▁in", "▁this", "▁image", "?", "/"):
        vocab.setdefault(word, len(vocab))
    return LlamaTokenizer(vocab=vocab, merges=[], legacy=False, add_bos_token=True)


def _vision_tower(root: Path, full_clip: bool = False) -> Path:
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel
    from transformers.models.clip import CLIPImageProcessorPil

    torch.manual_seed(1)
    vc = dict(
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        projection_dim=16,
    )
    path = root / ("clip-full" if full_clip else "clip-vision")
    if full_clip:
        cfg = CLIPConfig(
            vision_config=vc,
            text_config=dict(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                vocab_size=50,
            ),
            projection_dim=16,
        )
        CLIPModel(cfg).save_pretrained(path)
    else:
        CLIPVisionModel(CLIPVisionConfig(**vc)).save_pretrained(path)
    CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    ).save_pretrained(path)
    return path


def _source(
    root: Path,
    *,
    kind: str = "mistral",
    projector: str = "mlp2x_gelu",
    fmt: str = "safetensors",
    extra_config: dict | None = None,
    extra_weights: dict | None = None,
    tokenizer: str = "word",
) -> Path:
    """A tiny original-format LLaVA checkpoint: config.json with the mm_* fields + weights + tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    src = root / f"src-{kind}-{projector}-{fmt}"
    src.mkdir(parents=True)
    tok = _sentencepiece_tokenizer() if tokenizer == "sentencepiece" else _tokenizer()
    tok.save_pretrained(src)
    fields = dict(TEXT, vocab_size=len(tok))
    torch.manual_seed(2)
    if kind == "mistral":
        lm = MistralForCausalLM(MistralConfig(**fields, sliding_window=None))
    else:
        lm = LlamaForCausalLM(LlamaConfig(**fields))
    state = {k: v.clone() for k, v in lm.state_dict().items()}
    g = torch.Generator().manual_seed(3)
    if projector == "mlp2x_gelu":
        state["model.mm_projector.0.weight"] = torch.randn(32, 24, generator=g) * 0.2
        state["model.mm_projector.0.bias"] = torch.randn(32, generator=g) * 0.1
        state["model.mm_projector.2.weight"] = torch.randn(32, 32, generator=g) * 0.2
        state["model.mm_projector.2.bias"] = torch.randn(32, generator=g) * 0.1
    elif projector == "linear":
        state["model.mm_projector.weight"] = torch.randn(32, 24, generator=g) * 0.2
        state["model.mm_projector.bias"] = torch.randn(32, generator=g) * 0.1
    state.update(extra_weights or {})
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(src / "model.safetensors"))
    else:
        torch.save(state, src / "pytorch_model.bin")
    config = {
        "_name_or_path": "tiny",
        "architectures": ["LlavaMistralForCausalLM" if kind == "mistral" else "LlavaLlamaForCausalLM"],
        "model_type": f"llava_{kind}",
        **fields,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "image_aspect_ratio": "pad",
        "mm_hidden_size": 24,
        "mm_projector_type": projector,
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "mm_patch_merge_type": "flat",
        "tune_mm_mlp_adapter": False,
        "freeze_mm_mlp_adapter": False,
        "use_mm_proj": True,
        "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right",
        "use_cache": False,  # as training runs save it
        # LLaVA-Med v1.5's segmentation-token experiment fields
        "feature_outs": "encoder+decoder",
        "img_size": 640,
        "vision_backbone": "convnextlarge",
        "segtok_posembed": "sincos",
    }
    if kind == "mistral":
        config["sliding_window"] = None
    for key, value in (extra_config or {}).items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (src / "config.json").write_text(json.dumps(config, indent=2))
    return src


def _expand2square(img: Image.Image, color: tuple[int, ...]) -> Image.Image:
    """The original LLaVA `expand2square` (llava/mm_utils.py)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), color)
    out.paste(img, (0, (side - h) // 2) if w > h else ((side - w) // 2, 0))
    return out


def _reference_logits(
    src: Path, vision: Path, image: Image.Image, pre: str, post: str, projector: str, kind: str
):
    """The original inference path, assembled by hand from the source weights."""
    import torch.nn.functional as F
    from safetensors.torch import load_file
    from transformers import (
        AutoTokenizer,
        CLIPVisionModel,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
    )
    from transformers.models.clip import CLIPImageProcessorPil

    cfg = json.loads((src / "config.json").read_text())
    if (src / "model.safetensors").exists():
        sd = load_file(str(src / "model.safetensors"))
    else:
        sd = torch.load(src / "pytorch_model.bin", weights_only=True)
    fields = dict(TEXT, vocab_size=cfg["vocab_size"])
    lm = (
        MistralForCausalLM(MistralConfig(**fields, sliding_window=None))
        if kind == "mistral"
        else LlamaForCausalLM(LlamaConfig(**fields))
    )
    lm.load_state_dict({k: v for k, v in sd.items() if "mm_projector" not in k})
    lm.eval()
    tower = CLIPVisionModel.from_pretrained(vision).eval()
    ip = CLIPImageProcessorPil.from_pretrained(vision)
    color = tuple(int(x * 255) for x in ip.image_mean)
    pixels = ip(_expand2square(image, color), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        feats = tower(pixels, output_hidden_states=True).hidden_states[cfg["mm_vision_select_layer"]][:, 1:]
        if projector == "mlp2x_gelu":
            h = F.linear(feats, sd["model.mm_projector.0.weight"], sd["model.mm_projector.0.bias"])
            proj = F.linear(F.gelu(h), sd["model.mm_projector.2.weight"], sd["model.mm_projector.2.bias"])
        else:
            proj = F.linear(feats, sd["model.mm_projector.weight"], sd["model.mm_projector.bias"])
        tok = AutoTokenizer.from_pretrained(src)
        ids_pre = tok(pre)["input_ids"]  # with BOS, as tokenizer_image_token's first chunk
        ids_post = tok(post, add_special_tokens=False)["input_ids"]
        emb = lm.get_input_embeddings()
        embeds = torch.cat([emb(torch.tensor(ids_pre)), proj[0], emb(torch.tensor(ids_post))])[None]
        logits = lm(inputs_embeds=embeds).logits
    return logits, pixels, ids_pre, ids_post


def _converted_logits(out: Path, text: str, image: Image.Image):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(out)
    model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    return logits, inputs, processor, model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    return root, _vision_tower(root)


def _image(w: int = 40, h: int = 24) -> Image.Image:
    g = torch.Generator().manual_seed(4)
    arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr, "RGB")


@pytest.mark.parametrize(
    ("kind", "projector", "fmt"), [("mistral", "mlp2x_gelu", "safetensors"), ("llama", "linear", "bin")]
)
def test_converted_logits_match_the_original_forward(tiny, kind, projector, fmt):
    root, vision = tiny
    src = _source(root, kind=kind, projector=projector, fmt=fmt)
    out = root / f"out-{kind}-{projector}"
    record = convert_llava(src, str(vision), out)
    assert record["projector"] == projector
    text_config = json.loads((out / "config.json").read_text())["text_config"]
    assert text_config["model_type"] == kind and text_config["use_cache"] is True
    assert "img_size" not in text_config and "mm_hidden_size" not in text_config
    assert (out / "conversion.json").is_file()

    image = _image()  # not square: exercises the `pad` preprocessing
    pre, post = "is there", "lesion in the left lung ?"
    ref, ref_pixels, ids_pre, ids_post = _reference_logits(src, vision, image, pre, post, projector, kind)
    got, inputs, processor, model = _converted_logits(out, f"{pre} <image>\n{post}", image)

    image_id = model.config.image_token_id
    assert processor.tokenizer.convert_ids_to_tokens(image_id) == "<image>"
    assert inputs["input_ids"][0].tolist() == ids_pre + [image_id] * N_IMAGE_TOKENS + ids_post
    torch.testing.assert_close(inputs["pixel_values"], ref_pixels, atol=1e-6, rtol=0)
    vocab = ref.shape[-1]
    assert got.shape[-1] % 64 == 0 and got.shape[-1] > vocab  # <image> (+<pad>) added, padded to 64
    torch.testing.assert_close(got[..., :vocab], ref, atol=1e-5, rtol=1e-5)
    assert got[..., :vocab].argmax(-1).tolist() == ref.argmax(-1).tolist()


def test_pad_preprocessing_differs_from_a_plain_crop(tiny):
    """The converted processor pads with the mean colour: a wide image keeps its edges."""
    from transformers import AutoProcessor

    root, vision = tiny
    src = _source(root / "pad", kind="mistral")
    out = root / "pad-out"
    convert_llava(src, str(vision), out)
    processor = AutoProcessor.from_pretrained(out)
    assert type(processor.image_processor).__name__ == "LlavaImageProcessorPil"
    assert processor.image_processor.do_pad is True
    img = Image.new("RGB", (64, 16), (255, 0, 0))
    px = processor.image_processor(img, return_tensors="pt")["pixel_values"][0]
    # top rows are padding (mean colour → ≈0 after normalisation), the middle row is red
    assert px[:, 0, :].abs().max() < 0.02
    assert px[0, IMAGE_SIZE // 2, :].min() > 1.5


def test_chat_templates(tiny):
    from transformers import AutoProcessor

    root, vision = tiny
    msgs = [{"role": "user", "content": [{"type": "text", "text": "what modality ?"}, {"type": "image"}]}]
    expected = {
        "mistral": "<s>[INST] <image>\nwhat modality ? [/INST]",
        "llama": "<s>A chat between a curious human and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the human's questions. USER: <image>\nwhat modality ? "
        "ASSISTANT:",
    }
    for kind, text in expected.items():
        src = _source(root / f"tpl-{kind}", kind=kind)
        out = root / f"tpl-{kind}-out"
        convert_llava(src, str(vision), out)
        processor = AutoProcessor.from_pretrained(out)
        assert processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == text


def test_full_clip_checkpoint_as_vision_tower(tmp_path):
    """`--vision-tower` may name a full CLIP checkpoint (openai/clip-vit-large-patch14-336 is one)."""
    vision = _vision_tower(tmp_path, full_clip=True)
    src = _source(tmp_path, kind="mistral")
    convert_llava(src, str(vision), tmp_path / "out")
    ref, *_ = _reference_logits(src, vision, _image(), "what modality", "?", "mlp2x_gelu", "mistral")
    got, *_ = _converted_logits(tmp_path / "out", "what modality <image>\n?", _image())
    torch.testing.assert_close(got[..., : ref.shape[-1]], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("extra_config", "extra_weights", "projector", "message"),
    [
        ({"mm_projector_type": "cluster"}, {}, "none", "clustering projector"),
        ({"mm_use_im_start_end": True}, {}, "mlp2x_gelu", "mm_use_im_start_end"),
        ({"mm_projector_type": "mlp3x_gelu"}, {}, "mlp2x_gelu", "mlp3x_gelu"),
        ({"image_aspect_ratio": "anyres"}, {}, "mlp2x_gelu", "anyres"),
        ({"model_type": "llava_mpt"}, {}, "mlp2x_gelu", "llava_mpt"),
        ({}, {"model.image_newline": "x"}, "mlp2x_gelu", "model.image_newline"),
        ({"mm_projector_type": "mlp2x_gelu"}, {}, "none", "projector weights missing"),
        # no mm_projector_type: the original LLaVA default is linear, STLLaVA-Med's is cluster
        ({"mm_projector_type": None}, {"model.mm_projector.cluster.centers": 1}, "none", "cluster.centers"),
        ({"mm_hidden_size": 99}, {}, "mlp2x_gelu", "mm_hidden_size"),
    ],
)
def test_unsupported_formats_are_refused(tiny, extra_config, extra_weights, projector, message):
    root, vision = tiny
    weights = {k: torch.zeros(32) for k in extra_weights}
    if projector == "none" and extra_config.get("mm_projector_type") == "cluster":
        # SQ-LLaVA / STLLaVA-Med's clustering projector (names as in its cluster.py)
        weights = {
            "model.mm_projector.cluster.centers": torch.zeros(256, 32),
            "model.mm_projector.proj.weight": torch.zeros(32, 24),
        }
    name = f"refuse-{abs(hash(message))}"
    src = _source(root / name, projector=projector, extra_config=extra_config, extra_weights=weights)
    out = root / f"{name}-out"
    with pytest.raises(BadInput, match=message.replace("[", r"\[")):
        convert_llava(src, str(vision), out)
    assert not out.exists() and not (root / f"{name}-out.converting").exists()


def test_existing_output_needs_force(tiny):
    root, vision = tiny
    src = _source(root / "force", kind="mistral")
    out = root / "force-out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(BadInput, match="--force"):
        convert_llava(src, str(vision), out)
    convert_llava(src, str(vision), out, force=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_cli_converts_and_refuses_with_exit_2(tiny, capsys):
    from medvqa.cli import main

    root, vision = tiny
    src = _source(root / "cli-ok", kind="mistral")
    out = root / "cli-ok-out"
    assert (
        main(["model", "convert-llava", "--src", str(src), "--vision-tower", str(vision), "--out", str(out)])
        == 0
    )
    assert (out / "model.safetensors").is_file() and "mistral_instruct" in capsys.readouterr().out

    bad = _source(root / "cli-bad", projector="none", extra_config={"mm_projector_type": "cluster"})
    code = main(
        ["model", "convert-llava", "--src", str(bad), "--vision-tower", str(vision), "--out", str(root / "x")]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "mm_projector_type" in err and "cluster" in err and "STLLaVA-Med" in err
    assert len(err.strip().splitlines()) == 1


def test_tied_embeddings_sharded_bfloat16(tiny):
    """A tied lm_head (no lm_head.weight saved), sharded safetensors, bf16 weights kept as bf16."""
    from safetensors.torch import load_file, save_file
    from transformers import LlavaForConditionalGeneration

    root, vision = tiny
    src = _source(
        root / "tied", kind="llama", extra_config={"tie_word_embeddings": True, "torch_dtype": "bfloat16"}
    )
    sd = load_file(str(src / "model.safetensors"))
    sd.pop("lm_head.weight")
    (src / "model.safetensors").unlink()
    keys = sorted(sd)
    half = len(keys) // 2
    for i, part in enumerate((keys[:half], keys[half:])):
        save_file(
            {k: sd[k].to(torch.bfloat16).contiguous() for k in part},
            str(src / f"model-0000{i + 1}-of-00002.safetensors"),
        )
    out = root / "tied-out"
    record = convert_llava(src, str(vision), out)
    assert record["dtype"] == "bfloat16"
    model = LlavaForConditionalGeneration.from_pretrained(out)
    emb = model.get_input_embeddings().weight
    assert model.lm_head.weight.data_ptr() == emb.data_ptr()
    assert emb.dtype == torch.bfloat16
    vocab = sd["model.embed_tokens.weight"].shape[0]
    assert torch.equal(emb[:vocab], sd["model.embed_tokens.weight"].to(torch.bfloat16))
    assert model.model.vision_tower.embeddings.patch_embedding.weight.dtype == torch.bfloat16


def test_tokenization_check_is_recorded(tiny):
    root, vision = tiny
    src = _source(root / "tokcheck", kind="mistral")
    record = convert_llava(src, str(vision), root / "tokcheck-out")
    tok = record["tokenization"]
    assert tok["identical"] is True
    assert tok["chat_template"]["ids"] == tok["raw_text"]["ids"] == tok["original_ids"]
    assert tok["prompt"] == "<s>[INST] <image>\nWhat is shown in this image? [/INST]"
    assert tok["original_ids"][0] == 1 and record["image_token_id"] in tok["original_ids"]
    assert not any("tokenization" in n for n in record["notes"])


def test_tokenization_check_detects_the_sentencepiece_prefix_difference():
    """A Metaspace (sentencepiece-like) tokenizer: chunk-wise, the text after <image> gets a "▁"
    prefix; tokenized as one string after an added token it does not. The check must see it."""
    from medvqa.models.convert_llava import check_tokenization
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import AddedToken, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁[INST]": 3, "▁": 4, "\nx": 5, "▁\nx": 6, "▁[/INST]": 7}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)

    class Processor:
        tokenizer = tok

        def apply_chat_template(self, messages, **kwargs):
            return "<s>[INST] <image>\nx [/INST]"

    result = check_tokenization(Processor(), tok.convert_tokens_to_ids("<image>"), question="x")
    assert result["identical"] is False
    # original: <s> ▁[INST] ▁ <image> ▁\nx ▁[/INST]
    assert result["original_ids"] == [1, 3, 4, 8, 6, 7]
    # raw text (BOS added by the tokenizer): only the chunk after <image> differs
    assert result["raw_text"]["first_difference"] == 4 and result["raw_text"]["ids"][4] == 5
    # chat text ("<s>" written by the template): "[INST]" right after it loses its prefix too
    assert result["chat_template"]["first_difference"] == 1


@pytest.mark.parametrize("policy_name", ["llava-med-v1.5", "llava-med-v1"])
def test_medvqa_eval_on_a_converted_checkpoint(tiny, phantom_root, policy_name):
    """`medvqa eval` scores a converted checkpoint under a published policy: the raw policy text is
    the model input, the policy's decoding is applied and recorded, and LLaVA-Med v1.0's answer
    extraction (cut at "###") is what lands in predictions.jsonl."""
    from medvqa.benchmarks.phantom import Phantom
    from medvqa.cli import main
    from medvqa.io import read_json, read_jsonl
    from medvqa.models import load_model
    from medvqa.prompts import get_policy
    from medvqa.types import GenerationRequest, GenerationSettings

    root, vision = tiny
    out = root / "eval-model"
    if not out.exists():
        convert_llava(_source(root / "eval", kind="mistral"), str(vision), out)
    run = root / f"run-{policy_name}"
    args = ["eval", "--model", f"hf:{out}", "--benchmark", "phantom", "--root", str(phantom_root)]
    args += ["--limit", "6", "--batch-size", "6", "--max-new-tokens", "24", "--n-boot", "0"]
    assert main([*args, "--prompt-policy", policy_name, "--out", str(run)]) == 0

    scores = read_json(run / "scores.json")
    policy = get_policy(policy_name)
    assert scores["prompt_policy"] == policy_name and scores["n"] == 6
    expected_sampling = policy_name == "llava-med-v1"
    assert scores["generation"]["do_sample"] is expected_sampling
    assert scores["generation"]["temperature"] == (0.7 if expected_sampling else 0.0)
    rows = read_jsonl(run / "predictions.jsonl")
    assert len(rows) == 6

    # the same requests straight through the adapter: predictions = the policy's extraction of them
    samples = {s.id: s for s in Phantom().load("test", phantom_root)}
    requests = [
        GenerationRequest(
            image=samples[r["question_id"]].image,
            id=r["question_id"],
            prompt=policy.render(samples[r["question_id"]].question, samples[r["question_id"]].answer_type),
        )
        for r in rows
    ]
    assert all(r.prompt.text.count("<image>") == 1 for r in requests)
    assert [r["prompt"] for r in rows] == [r.prompt.text for r in requests]
    raw = load_model(f"hf:{out}").generate(requests, GenerationSettings(**scores["generation"]))
    assert [r["text"] for r in rows] == [policy.postprocess(t) for t in raw]
    if policy_name == "llava-med-v1":
        assert any("###" in t for t in raw)  # the cut was exercised
        assert not any("###" in r["text"] for r in rows)


def test_vision_tower_weights_in_the_source(tiny):
    """Like the original loader: tower weights saved in the source are used only when
    unfreeze_mm_vision_tower is set; otherwise the --vision-tower checkpoint is used (and said)."""
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    root, vision = tiny
    tower = {k: v + 0.5 for k, v in load_file(str(vision / "model.safetensors")).items()}
    saved = {f"model.vision_tower.vision_tower.vision_model.{k}": v for k, v in tower.items()}
    key = "embeddings.class_embedding"
    for unfreeze in (False, True):
        src = _source(
            root / f"tower-{unfreeze}",
            extra_config={"unfreeze_mm_vision_tower": unfreeze},
            extra_weights=saved,
        )
        out = root / f"tower-{unfreeze}-out"
        record = convert_llava(src, str(vision), out)
        got = LlavaForConditionalGeneration.from_pretrained(out).model.vision_tower.state_dict()[key]
        if unfreeze:
            assert record["vision_tower_weights"] == "source checkpoint"
            torch.testing.assert_close(got, tower[key])
        else:
            assert record["vision_tower_weights"] == "vision tower checkpoint"
            assert any("ignored" in n for n in record["notes"])
            torch.testing.assert_close(got, tower[key] - 0.5)


def test_sentencepiece_prefix_after_image_matches_the_original_chunks(tiny):
    """transformers 5 builds Llama tokenizers with legacy=False: text right after <image> (and after
    a literal <s>) loses the "▁" that the original chunk-by-chunk tokenization gives it. The
    converter switches the tokenizer to prefix it, and checks the reloaded processor."""
    from medvqa.prompts import get_policy
    from transformers import AutoProcessor, AutoTokenizer

    root, vision = tiny
    src = _source(root / "sp", kind="mistral", tokenizer="sentencepiece")
    assert AutoTokenizer.from_pretrained(src).backend_tokenizer.pre_tokenizer.prepend_scheme == "first"
    out = root / "sp-out"
    record = convert_llava(src, str(vision), out)
    assert record["tokenization"]["identical"] is True
    assert any("prefix" in n for n in record["notes"])
    assert json.loads((out / "tokenizer_config.json").read_text())["legacy"] is True

    processor = AutoProcessor.from_pretrained(out)
    src_tok = AutoTokenizer.from_pretrained(src)
    text = get_policy("llava-med-v1.5").render("What is shown in this image?", "OPEN").text
    ids = processor(text=[text], images=[_image()], return_tensors="pt")["input_ids"][0].tolist()
    pre, post = text.split("<image>")
    original = src_tok(pre)["input_ids"] + [processor.image_token_id] * N_IMAGE_TOKENS
    original += src_tok(post, add_special_tokens=False)["input_ids"]
    assert ids == original
    assert (
        src_tok.convert_ids_to_tokens(original[1 + len(src_tok(pre)["input_ids"]) - 1 + N_IMAGE_TOKENS])
        == "▁"
    )
