"""The model judge reached over HTTP: `model` expert → `openai:` adapter → a real loopback server.

The judge model answers each question itself (one request per distinct (image, question)); an
answer scores 10 when it says what the judge said. Its own accuracy on labeled samples
(`agreement`) is what the trainer reports beside the line it judged.
"""

from __future__ import annotations

import json

from medvqa.types import VQASample

from tests._openai_server import fake_key, fake_openai, openai_server, write_png  # noqa: F401 - fixtures


def test_model_judge_over_an_openai_compatible_server(fake_openai, fake_key, tmp_path):  # noqa: F811
    from medvqa.registry import experts

    image = tmp_path / "a.png"
    write_png(image)

    def reply(body: dict) -> str:
        text = json.dumps(body["messages"])
        return "Yes." if "normal" in text else "mri"

    fake_openai.reply = reply
    spec = f"openai:judge@{fake_openai.base_url},api_key_env=MEDVQA_TEST_KEY"
    judge = experts.get("model")(model=spec)
    assert judge.judge(str(image), "is the image normal?", ["yes", "no", "Yes"]) == [10.0, 0.0, 10.0]
    assert judge.judge(str(image), "what modality is this?", ["ct", "MRI"]) == [0.0, 10.0]
    assert judge.judge(str(image), "is the image normal?", ["no"]) == [0.0]  # asked once, remembered
    assert fake_openai.n_requests == 2
    samples = [
        VQASample(id=f"s{i}", image=str(image), question=q, answer=a, answer_type=t, benchmark="x", split="train")
        for i, (q, a, t) in enumerate(
            [("is the image normal?", "yes", "CLOSED"), ("what modality is this?", "ct", "OPEN"),
             ("what modality was used?", "mri", "OPEN")]
        )
    ]  # fmt: skip
    report = judge.agreement(samples)
    assert (report["closed_accuracy"], report["open_accuracy"]) == (100.0, 50.0)
    assert report["judge_model"] == spec
