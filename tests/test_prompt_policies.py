"""The published prompt conventions, pinned character for character.

Each expected string is what the original evaluation script builds for one question (before its
image placeholder is expanded): LLaVA-Med v1.0 `llava/eval/model_vqa_med.py` with conv `simple`,
LLaVA-Med v1.5 `llava/eval/model_vqa.py` with conv `mistral_instruct`, STLLaVA-Med with conv
`llava_v1`. The closed-question options line is switched by `answer_type` only.
"""

from __future__ import annotations

import inspect

import pytest
from medvqa.prompts import CLOSED_YES_NO, PromptPolicy, get_policy, policy_names

LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
QUESTION = "  Is there a lesion in the left lung? "
OPTIONS = " Please choose from the following two options: [yes, no]"

SNAPSHOTS = {
    "llava-med-v1": (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the human's questions.###Human: Hi!###Assistant: Hi there!  "
        "How can I help you today?\n###Human: Is there a lesion in the left lung?{opt}\n<image>###"
    ),
    "llava-med-v1.5": "[INST] <image>\nIs there a lesion in the left lung?{opt} [/INST]",
    "stllava-med": (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the human's questions. USER: <image>\n"
        "Is there a lesion in the left lung?{opt} ASSISTANT:"
    ),
}


@pytest.mark.parametrize("name", sorted(SNAPSHOTS))
@pytest.mark.parametrize("answer_type", ["OPEN", "CLOSED"])
def test_published_policy_text_is_pinned(name, answer_type):
    prompt = get_policy(name).render(QUESTION, answer_type)
    assert prompt.messages == ()
    assert prompt.policy == name
    # the published scripts show the bare question, whatever the answer type
    assert prompt.text == SNAPSHOTS[name].format(opt="")
    assert prompt.text.count("<image>") == 1


@pytest.mark.parametrize("name", sorted(SNAPSHOTS))
def test_closed_options_switch_follows_answer_type(name):
    policy = get_policy(f"{name}+options")
    assert policy.name == f"{name}+options"
    assert policy.closed_options == CLOSED_YES_NO
    assert policy.render(QUESTION, "CLOSED").text == SNAPSHOTS[name].format(opt=OPTIONS)
    assert policy.render(QUESTION, "OPEN").text == SNAPSHOTS[name].format(opt="")
    assert policy.render(QUESTION, "CLOSED").policy == f"{name}+options"
    # the switch sees only (question, answer_type): a yes/no-looking OPEN question gets no options
    assert list(inspect.signature(PromptPolicy.render).parameters) == ["self", "question", "answer_type"]
    assert OPTIONS.strip() not in policy.render("Is it yes or no?", "OPEN").text


def test_short_answer_is_still_the_default_chat_policy():
    policy = get_policy()
    assert policy.name == "short-answer" and policy.style == "chat" and not policy.generation
    text = policy.render(QUESTION, "CLOSED").messages[-1]["content"][1]["text"]
    assert text == "Is there a lesion in the left lung? Answer with a single word or phrase."


def test_recommended_generation_settings():
    from medvqa.types import GenerationSettings

    v1 = get_policy("llava-med-v1")
    assert dict(v1.generation) == {"do_sample": True, "temperature": 0.7}
    settings = GenerationSettings(**v1.generation)  # every key is a GenerationSettings field
    assert settings.do_sample and settings.temperature == 0.7
    for name in ("llava-med-v1.5", "stllava-med"):
        assert not get_policy(name).generation  # greedy: the harness default
        assert not GenerationSettings().do_sample
    assert get_policy("llava-med-v1+options").generation == v1.generation


def test_llava_med_v1_answer_is_cut_at_the_separator():
    policy = get_policy("llava-med-v1")
    assert policy.stop == ("###",)
    assert policy.postprocess(" Assistant: yes ###Human: Is it?###") == "Assistant: yes"
    assert policy.postprocess("no") == "no"
    for name in ("llava-med-v1.5", "stllava-med", "short-answer"):
        assert get_policy(name).postprocess(" left lung ### x ") == "left lung ### x"


def test_policies_are_listed_and_recorded():
    names = policy_names()
    for name in ("short-answer", "llava-med-v1", "llava-med-v1.5", "stllava-med"):
        assert name in names
    record = get_policy("llava-med-v1").to_json()
    assert record["name"] == "llava-med-v1" and record["style"] == "raw"
    assert record["generation"] == {"do_sample": True, "temperature": 0.7} and record["stop"] == ["###"]
    assert LLAVA_SYSTEM in record["template"]


def test_converted_mistral_tokenizes_the_v15_prompt_like_the_original(tmp_path):
    """On a converted LLaVA-Med-style checkpoint, the policy text becomes exactly the original ids:
    tokenizer_image_token (first chunk with BOS, image, second chunk without) with the image
    placeholder expanded to the vision tower's patch count."""
    pytest.importorskip("torch")
    from medvqa.models.convert_llava import convert_llava
    from transformers import AutoProcessor, AutoTokenizer

    from tests.test_convert_llava import N_IMAGE_TOKENS, _image, _source, _vision_tower

    vision = _vision_tower(tmp_path)
    src = _source(tmp_path, kind="mistral")
    out = tmp_path / "out"
    convert_llava(src, str(vision), out)
    processor = AutoProcessor.from_pretrained(out)
    text = get_policy("llava-med-v1.5").render("what modality ?", "OPEN").text
    ids = processor(text=[text], images=[_image()], return_tensors="pt")["input_ids"][0].tolist()
    tok = AutoTokenizer.from_pretrained(src)
    pre, post = text.split("<image>")
    expected = tok(pre)["input_ids"] + [processor.image_token_id] * N_IMAGE_TOKENS
    expected += tok(post, add_special_tokens=False)["input_ids"]
    assert ids == expected
