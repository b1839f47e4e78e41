"""The tiny offline LLaVA: shape, tokenizer, processor without torchvision, loadable by hf:."""

from __future__ import annotations

import json
import sys

import pytest
from medvqa.models.tiny import IMAGE, TinyConfig, preset_config


def test_tiny_folder_loads_with_auto_classes(tiny_model_dir) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    assert isinstance(model, LlavaForConditionalGeneration)
    assert type(processor.image_processor).__name__ == "CLIPImageProcessorPil"
    meta = json.loads((tiny_model_dir / "tiny_config.json").read_text())
    assert 300_000 < meta["n_parameters"] < 700_000  # the Phantom preset: ~456k in PHANTOM-NOTES
    assert meta["n_parameters"] == sum(p.numel() for p in model.parameters())
    assert processor.tokenizer.image_token == IMAGE
    assert model.config.image_token_index == processor.tokenizer.convert_tokens_to_ids(IMAGE)


def test_image_token_count_is_patch_grid(tiny_model_dir) -> None:
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    cfg = preset_config("phantom")
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "is this a ct?"}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert text == "<s><user> <image> is this a ct?<assistant>"
    enc = processor(
        images=[Image.new("RGB", (50, 37))], text=[text], return_tensors="pt", add_special_tokens=False
    )
    n_image = int((enc["input_ids"] == processor.tokenizer.convert_tokens_to_ids(IMAGE)).sum())
    assert n_image == (cfg.image_size // cfg.patch) ** 2
    assert tuple(enc["pixel_values"].shape) == (1, 3, cfg.image_size, cfg.image_size)


def test_tokenizer_covers_phantom_words(tiny_model_dir, phantom_root) -> None:
    from medvqa.benchmarks.phantom import Phantom
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    samples = Phantom().load("test", phantom_root)
    for s in samples:
        ids = tok(f"{s.question} {s.answer}", add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids, s.question
    # whole words stay whole (x-ray is one token) and decode back with spaces
    assert tok.tokenize("Is this an X-ray?") == ["is", "this", "an", "x-ray", "?"]
    assert tok.decode(tok("left lung, upper")["input_ids"]) == "left lung, upper"


def test_init_tiny_cli_flags_and_refuses_non_empty(tmp_path, capsys) -> None:
    from medvqa.cli import main

    out = tmp_path / "m"
    cmd = ["model", "init-tiny", "--out", str(out)]
    flags = ["--image-size", "16", "--patch", "8", "--hidden", "32", "--layers", "1", "--corpus", "builtin"]
    assert main([*cmd, *flags]) == 0
    assert "16 px / patch 8 → 4 image tokens" in capsys.readouterr().out
    meta = json.loads((out / "tiny_config.json").read_text())
    assert (meta["image_size"], meta["hidden"], meta["layers"], meta["corpus"]) == (16, 32, 1, "builtin")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["text_config"]["num_hidden_layers"] == 1 and cfg["vision_config"]["image_size"] == 16
    assert main([*cmd, *flags]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main([*cmd, "--force", "--image-size", "20"]) == 2
    assert "multiple" in capsys.readouterr().err


def test_no_torchvision_needed(tiny_model_dir) -> None:
    """torchvision is not installed here (and never a dependency): the tiny processor is PIL-only."""
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    assert not is_torchvision_available()
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    assert "Pil" in type(processor.image_processor).__name__
    assert "torchvision" not in sys.modules


def test_presets() -> None:
    assert TinyConfig().image_size == 64 and TinyConfig().layers == 4
    p = preset_config("phantom", seed=3)
    assert (p.image_size, p.layers, p.vision_hidden, p.vision_layers, p.seed) == (32, 2, 64, 2, 3)
    with pytest.raises(Exception, match="unknown tiny-model preset"):
        preset_config("huge")
