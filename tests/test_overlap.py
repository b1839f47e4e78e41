"""`medvqa.overlap.image_overlap`: the train/test check as a library call (the command only prints it)."""

from __future__ import annotations

from pathlib import Path

from medvqa.overlap import image_overlap
from medvqa.types import VQASample
from PIL import Image


def _sample(image: Path, sid: str, split: str) -> VQASample:
    return VQASample(
        id=sid,
        image=str(image),
        question="q?",
        answer="yes",
        answer_type="CLOSED",
        benchmark="x",
        split=split,
    )


def test_images_are_compared_by_content_not_name(tmp_path: Path) -> None:
    for name, shade in (("a.png", 0), ("b.png", 90), ("renamed-a.png", 0), ("c.png", 200)):
        Image.new("L", (4, 4), shade).save(tmp_path / name)
    train = [_sample(tmp_path / "a.png", "t1", "train"), _sample(tmp_path / "b.png", "t2", "train")]
    test = [
        _sample(tmp_path / "renamed-a.png", "s1", "test"),  # same pixels as a.png under another name
        _sample(tmp_path / "renamed-a.png", "s2", "test"),
        _sample(tmp_path / "c.png", "s3", "test"),
    ]
    found = image_overlap(train, test)
    assert found["n_images"] == {"train": 2, "test": 2}
    assert found["n_shared_images"] == 1 and found["share_of_test_images"] == 50.0
    assert (found["n_test_questions_on_shared_images"], found["n_test_questions"]) == (2, 3)
    assert [ex["train"] for ex in found["examples"]] == [train[0].image_id]
    assert image_overlap(train, test, examples=0)["examples"] == []
