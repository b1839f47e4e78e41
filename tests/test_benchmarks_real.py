"""Real-benchmark loaders on tiny fixture trees in every layout: counts, OPEN/CLOSED rules, detection."""

from __future__ import annotations

from pathlib import Path

import pytest
from medvqa.benchmarks._files import YES_NO_RULE, make_benchmark
from medvqa.errors import BadInput
from medvqa.registry import benchmarks
from medvqa.types import VQASample

from tests import real_fixtures as fx


def counts(samples: list[VQASample]) -> tuple[int, int, int, int]:
    n_open = sum(s.answer_type == "OPEN" for s in samples)
    return len(samples), n_open, len(samples) - n_open, len({s.image_id for s in samples})


# ------------------------------------------------------------------------------------------ registry


@pytest.mark.parametrize(
    ("name", "cls_name"),
    [("vqa-rad", "VQARad"), ("slake", "Slake"), ("pathvqa", "PathVQA"), ("llava-med-json", "LlavaMedJson")],
)
def test_registered_with_description_and_version(name: str, cls_name: str) -> None:
    cls = benchmarks.get(name)
    assert cls.__name__ == cls_name
    assert cls.name == name
    assert benchmarks.describe(name)  # first docstring line
    bench = cls()
    assert bench.version and isinstance(bench.version, str)


# ------------------------------------------------------------------------------------------ VQA-RAD


def test_vqa_rad_original_splits_and_quirks(tmp_path: Path) -> None:
    root = fx.make_vqa_rad_original(tmp_path / "rad")
    bench = benchmarks.get("vqa-rad")()
    assert "original" in bench.detect_layout(root)
    assert bench.closed_rule(root) == "dataset answer_type"
    test = bench.load("test", root)
    assert counts(test) == (5, 2, 3, 2)
    by_id = {s.id: s for s in test}
    assert by_id["4"].answer_type == "CLOSED"  # "closed " with stray case/space
    assert by_id["6"].answer_type == "CLOSED"  # " Closed"
    assert by_id["7"].answer_type == "OPEN"  # "open"
    assert by_id["5"].answer == "2"  # a numeric answer becomes text
    s = by_id["4"]
    assert s.split == "test" and s.benchmark == "vqa-rad"
    assert Path(s.image).is_file() and Path(s.image).name == "synpic2.jpg"
    assert s.meta["image_id"] == "synpic2.jpg" and s.meta["organ"] == "CHEST"
    assert s.meta["phrase_type"] == "test_freeform" and s.meta["answer_type_source"] == "dataset"
    train = bench.load("train", root)
    assert counts(train) == (3, 2, 1, 2)
    assert {s.meta["phrase_type"] for s in train} == {"freeform", "para"}


def test_vqa_rad_root_may_be_the_parent(tmp_path: Path) -> None:
    fx.make_vqa_rad_original(tmp_path / "VQA_RAD")
    bench = benchmarks.get("vqa-rad")()
    assert str(tmp_path / "VQA_RAD") in bench.detect_layout(tmp_path)
    assert len(bench.load("test", tmp_path)) == 5


def test_vqa_rad_parquet_yes_no_rule(tmp_path: Path) -> None:
    root = fx.make_vqa_rad_parquet(tmp_path / "hf")
    bench = benchmarks.get("vqa-rad")()
    assert "parquet" in bench.detect_layout(root)
    assert bench.closed_rule(root) == YES_NO_RULE
    test = bench.load("test", root)
    assert counts(test) == (4, 2, 2, 2)
    assert [s.answer_type for s in test] == ["CLOSED", "OPEN", "CLOSED", "OPEN"]  # "Yes" counts
    assert all(isinstance(s.image, bytes) for s in test)
    assert test[0].meta["image_id"] == "img2.png"
    assert test[0].meta["answer_type_source"] == "gold"
    assert [s.id for s in test] == ["test-00000", "test-00001", "test-00002", "test-00003"]
    assert counts(bench.load("train", root)) == (3, 2, 1, 2)


def test_prompt_type_never_comes_from_the_gold_answer(tmp_path: Path) -> None:
    """Where CLOSED was derived from the gold answer, the prompt sees OPEN for every sample."""
    hf = benchmarks.get("vqa-rad")()
    samples = hf.load("test", fx.make_vqa_rad_parquet(tmp_path / "hf"))
    assert {s.answer_type for s in samples} == {"OPEN", "CLOSED"}
    assert {s.prompt_answer_type for s in samples} == {"OPEN"}
    orig = benchmarks.get("vqa-rad")()
    samples = orig.load("test", fx.make_vqa_rad_original(tmp_path / "rad"))
    assert [s.prompt_answer_type for s in samples] == [s.answer_type for s in samples]


def test_unknown_layout_says_what_was_expected(tmp_path: Path) -> None:
    (tmp_path / "junk.txt").write_text("x")
    with pytest.raises(
        BadInput, match=r"no known vqa-rad layout.*VQA_RAD Dataset Public\.json.*found: junk\.txt"
    ):
        benchmarks.get("vqa-rad")().detect_layout(tmp_path)
    with pytest.raises(BadInput, match="does not exist"):
        benchmarks.get("slake")().load("test", tmp_path / "missing")


def test_unknown_split_lists_splits(tmp_path: Path) -> None:
    root = fx.make_vqa_rad_original(tmp_path)
    with pytest.raises(BadInput, match="no split 'dev'; splits: train, test"):
        benchmarks.get("vqa-rad")().load("dev", root)


# ------------------------------------------------------------------------------------------ SLAKE


def test_slake_english_default_and_non_yes_no_closed(tmp_path: Path) -> None:
    root = fx.make_slake(tmp_path)
    bench = benchmarks.get("slake")()
    assert "Slake1.0" in bench.detect_layout(root)
    test = bench.load("test", root)
    assert counts(test) == (4, 2, 2, 2)
    closed_answers = {s.answer for s in test if s.answer_type == "CLOSED"}
    assert closed_answers == {"Liver", "No"}  # SLAKE's CLOSED includes non-yes/no
    s = test[0]
    assert s.id == "201"
    assert s.meta["image_id"] == "xmlab4/source.jpg"
    assert s.meta["modality"] == "CT" and s.meta["organ"] == "Abdomen" and s.meta["content_type"] == "Organ"
    assert s.meta["q_lang"] == "en"
    assert "non-yes/no" in bench.closed_rule(root)
    # the root may also be Slake1.0 itself
    assert len(bench.load("test", root / "Slake1.0")) == 4


@pytest.mark.parametrize(
    ("lang", "expected"), [("en", (4, 2, 2, 2)), ("zh", (2, 1, 1, 2)), ("all", (6, 3, 3, 2))]
)
def test_slake_lang_option(tmp_path: Path, lang: str, expected: tuple[int, ...]) -> None:
    root = fx.make_slake(tmp_path)
    bench = make_benchmark("slake", {"lang": lang})
    assert bench.options.lang == lang
    assert counts(bench.load("test", root)) == expected
    assert bench.version == ("1" if lang == "en" else f"1+lang={lang}")  # cached predictions never mix


def test_slake_validate_split_and_aliases(tmp_path: Path) -> None:
    root = fx.make_slake(tmp_path, validation_name="validation.json")
    bench = benchmarks.get("slake")()
    for split in ("validate", "val", "validation"):
        samples = bench.load(split, root)
        assert counts(samples) == (2, 1, 1, 1)
        assert {s.split for s in samples} == {"validate"}


def test_slake_bad_option(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match=r"option 'lang' must be one of \['en', 'zh', 'all'\]"):
        make_benchmark("slake", {"lang": "fr"})
    with pytest.raises(BadInput, match=r"unknown option\(s\) \['langue'\]; known: \['lang'\]"):
        make_benchmark("slake", {"langue": "en"})
    with pytest.raises(BadInput, match=r"benchmark 'vqa-rad': unknown option\(s\) \['lang'\]; known: none"):
        make_benchmark("vqa-rad", {"lang": "en"})


# ------------------------------------------------------------------------------------------ PathVQA


def test_pathvqa_original_pickles(tmp_path: Path) -> None:
    root = fx.make_pathvqa_original(tmp_path)
    bench = benchmarks.get("pathvqa")()
    assert "original" in bench.detect_layout(root)
    assert bench.closed_rule(root) == YES_NO_RULE
    test = bench.load("test", root)
    assert counts(test) == (5, 3, 2, 3)
    assert test[0].id == "test-00000" and test[0].meta["image_id"] == "test_0000"
    assert Path(test[0].image).name == "test_0000.jpg"
    assert counts(bench.load("val", root)) == (3, 2, 1, 2)
    assert counts(bench.load("validation", root)) == (3, 2, 1, 2)
    assert len(bench.load("test", root / "pvqa")) == 5


def test_pathvqa_parquet(tmp_path: Path) -> None:
    root = fx.make_pathvqa_parquet(tmp_path / "path-vqa")
    bench = benchmarks.get("pathvqa")()
    assert "parquet" in bench.detect_layout(root)
    test = bench.load("test", root)
    assert counts(test) == (4, 2, 2, 2)
    assert len(test[0].meta["image_id"]) == 16  # no path in the cell: content hash
    assert counts(bench.load("val", root)) == (1, 1, 0, 1)  # data/validation-*.parquet


# ------------------------------------------------------------------------------------------ LLaVA-Med JSON


def test_llava_med_json(tmp_path: Path) -> None:
    root = fx.make_llava_med(tmp_path)
    bench = benchmarks.get("llava-med-json")()
    assert "test.json" in bench.detect_layout(root)
    test = bench.load("test", root)
    assert counts(test) == (3, 1, 2, 2)
    assert test[0].question == "Is there a mass?"  # <image> token removed
    assert test[1].answer == "brain"  # from the misspelled `conversatons`
    assert bench.closed_rule(root) == "dataset answer_type"
    assert len(bench.load("anything", root / "test.json")) == 3  # root may be the file


def test_llava_med_json_options_and_missing_answer_type(tmp_path: Path) -> None:
    items = fx.llava_med_items()
    for it in items:
        del it["answer_type"]
    fx.write_json(tmp_path / "eval" / "q.json", items)
    fx.write_image(tmp_path / "imgs" / "synpic1.jpg", 1)
    fx.write_image(tmp_path / "imgs" / "synpic2.jpg", 2)
    bench = make_benchmark("llava-med-json", {"file": "eval/q.json", "image_folder": "imgs"})
    samples = bench.load("test", tmp_path)
    assert [s.answer_type for s in samples] == ["CLOSED", "OPEN", "OPEN"]  # yes/no rule
    assert "yes/no" in bench.closed_rule(tmp_path)
    assert {s.prompt_answer_type for s in samples} == {"OPEN"}


def test_convert_round_trip_matches_the_source(tmp_path: Path) -> None:
    """VQA-RAD parquet → `medvqa data convert` → llava-med-json gives the same questions, answers, types."""
    from medvqa.cli import main

    root = fx.make_vqa_rad_parquet(tmp_path / "hf")
    assert (
        main(
            ["data", "convert", "vqa-rad", "--root", str(root), "--out", str(tmp_path / "out" / "test.json")]
        )
        == 0
    )
    src = benchmarks.get("vqa-rad")().load("test", root)
    back = benchmarks.get("llava-med-json")().load("test", tmp_path / "out")
    assert [(s.id, s.question, s.answer, s.answer_type) for s in back] == [
        (s.id, s.question, s.answer, s.answer_type) for s in src
    ]
    assert [Path(s.image).read_bytes() for s in back] == [s.image for s in src]
    assert [s.image_id for s in back] == [s.image_id for s in src]  # meta rides along
    assert {s.prompt_answer_type for s in back} == {"OPEN"}  # still known to be gold-derived


def test_slake_zipped_images_hint(tmp_path: Path) -> None:
    fx.write_json(tmp_path / "test.json", fx.slake_records("test"))
    (tmp_path / "imgs.zip").write_bytes(b"PK")
    with pytest.raises(BadInput, match=r"images are still zipped: unzip imgs\.zip"):
        benchmarks.get("slake")().load("test", tmp_path)
