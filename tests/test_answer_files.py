"""GT and answer files: LLaVA-Med test.json, samples JSONL, answer files, join by id, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from medvqa.answer_files import (
    answer_row,
    join_predictions,
    read_answer_file,
    read_gt,
    read_gt_and_predictions,
    read_samples_jsonl,
    write_llava_med_test_json,
)
from medvqa.errors import BadInput
from medvqa.types import VQASample

DATA = Path(__file__).parent / "data"


def _item(iid, answer="yes", kind="CLOSED", key="conversations", **extra):
    item = {
        "id": iid,
        "image": f"img{iid}.jpg",
        key: [{"from": "human", "value": f"<image>\nQuestion {iid}?"}, {"from": "gpt", "value": answer}],
        "answer_type": kind,
    }
    item.update(extra)
    return item


def _write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------ GT: the example LLaVA-Med file


def test_reads_the_example_llava_med_test_json():
    samples = read_gt(DATA / "test.json")
    assert len(samples) == 12
    by_id = {s.id: s for s in samples}
    assert by_id["1"].question == "Are regions of the brain infarcted?"  # <image> token removed
    assert by_id["1"].answer == "Yes" and by_id["1"].answer_type == "CLOSED"
    assert by_id["4"].answer == "2" and by_id["10"].answer == "3.5"  # numeric gold → text
    assert by_id["9"].answer == "the liver"  # the misspelled `conversatons`
    assert by_id["11"].answer_type == "CLOSED"  # " closed" tolerated
    assert by_id["1"].image == str(DATA / "synpic54610.jpg")
    assert by_id["1"].image_id == by_id["2"].image_id == "synpic54610.jpg"
    assert read_gt(DATA / "test.json", image_root="/data/rad")[0].image == "/data/rad/synpic54610.jpg"


def test_gt_kind_is_detected_from_the_records(tmp_path):
    items = [_item(1), _item(2, "lung", "OPEN")]
    as_list = read_gt(_write_json(tmp_path / "test.json", items))
    as_jsonl = read_gt(_write_jsonl(tmp_path / "test.jsonl", items))
    assert (
        [(s.id, s.answer) for s in as_list]
        == [(s.id, s.answer) for s in as_jsonl]
        == [("1", "yes"), ("2", "lung")]
    )
    samples = [
        VQASample(
            id="a",
            image="/x/a.png",
            question="Is it?",
            answer="no",
            answer_type="CLOSED",
            benchmark="b",
            split="s",
        ),
        VQASample(
            id="b",
            image="/x/b.png",
            question="What?",
            answer="lung",
            answer_type="OPEN",
            benchmark="b",
            split="s",
        ),
    ]
    ours = read_gt(_write_jsonl(tmp_path / "samples.jsonl", [s.to_json() for s in samples]))
    assert ours == samples
    assert read_samples_jsonl(tmp_path / "samples.jsonl") == samples


def test_llava_med_test_json_round_trip(tmp_path):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    samples = [
        VQASample(
            id=f"s{i}",
            image=str(root / "images" / f"{i}.png"),
            question=f"Is there a mass {i}?",
            answer=a,
            answer_type=t,
            benchmark="vqa-rad",
            split="test",
            meta={"image_id": f"im{i}", "modality": "CT"},
        )
        for i, (a, t) in enumerate([("yes", "CLOSED"), ("left lung", "OPEN")])
    ]
    out = root / "export" / "test.json"
    assert write_llava_med_test_json(samples, out, root=root) == 2
    raw = json.loads(out.read_text())
    assert raw[0]["image"] == "images/0.png"
    assert raw[0]["conversations"][0]["value"] == "<image>\nIs there a mass 0?"
    assert raw[1]["conversations"][1] == {"from": "gpt", "value": "left lung"}
    back = read_gt(out, image_root=root)  # what `medvqa score --gt` reads
    for a, b in zip(samples, back):
        assert (a.id, a.image, a.question, a.answer, a.answer_type, a.image_id) == (
            b.id,
            b.image,
            b.question,
            b.answer,
            b.answer_type,
            b.image_id,
        )


def test_write_refuses_images_outside_the_root_and_image_bytes(tmp_path):
    outside = VQASample(
        id="x",
        image="/elsewhere/a.png",
        question="?",
        answer="a",
        answer_type="OPEN",
        benchmark="b",
        split="s",
    )
    with pytest.raises(BadInput, match=r"record x.*field 'image'.*not inside the data root"):
        write_llava_med_test_json([outside], tmp_path / "t.json", root=tmp_path)
    inline = VQASample(
        id="y", image=b"\x89PNG", question="?", answer="a", answer_type="OPEN", benchmark="b", split="s"
    )
    with pytest.raises(BadInput, match=r"record y.*image bytes"):
        write_llava_med_test_json([inline], tmp_path / "t.json")
    assert not (tmp_path / "t.json").exists()


# ------------------------------------------------------------------ GT: bad input


@pytest.mark.parametrize(
    ("items", "pattern"),
    [
        (
            [_item(1, kind="MAYBE")],
            r"test.json, record item 0 \(id 1\), field 'answer_type': unknown answer_type 'MAYBE'",
        ),
        ([_item(1, kind=None)], r"item 0 \(id 1\), field 'answer_type'"),
        (
            [{k: v for k, v in _item(1).items() if k != "answer_type"}],
            r"item 0 \(id 1\), field 'answer_type': missing",
        ),
        ([_item(1), {k: v for k, v in _item(2).items() if k != "id"}], r"item 1, field 'id': missing field"),
        (
            [_item(1, answer=None)],
            r"item 0 \(id 1\), field 'conversations\[1\].value': expected text, got null",
        ),
        ([_item(1, answer=["yes"])], r"field 'conversations\[1\].value': expected text, got list"),
        ([_item(1, answer=True)], r"expected text, got bool"),
        (
            [dict(_item(1), conversations=[{"from": "human", "value": "q"}])],
            r"field 'conversations': expected a list of at least 2",
        ),
        ([_item(1), _item(1)], r"1 duplicate GT ids \(e.g. '1'\)"),
        ([{"id": 1, "question": "?"}], r"item 0, field 'conversations': neither a LLaVA-Med item"),
        ([{"question_id": 1, "text": "yes"}], r"looks like an answer file.*swap --gt and --pred"),
        ([], r"no items in file"),
        ({"id": 1}, r"record line 1, field 'conversations': neither"),  # one object = a one-line JSONL
        (["text"], r"item 0: expected a JSON object"),
    ],
)
def test_bad_gt_names_file_record_and_field(tmp_path, items, pattern):
    path = _write_json(tmp_path / "test.json", items)
    with pytest.raises(BadInput, match=pattern) as info:
        read_gt(path)
    assert str(path) in str(info.value)


def test_bad_gt_files(tmp_path):
    with pytest.raises(BadInput, match="file not found"):
        read_gt(tmp_path / "missing.json")
    (tmp_path / "empty.json").write_text("  \n")
    with pytest.raises(BadInput, match=r"empty.json: file is empty"):
        read_gt(tmp_path / "empty.json")
    (tmp_path / "broken.json").write_text('[\n  {"id": 1,\n  "answer_type": }\n]')
    with pytest.raises(BadInput, match=r"broken.json: malformed JSON at line 3"):
        read_gt(tmp_path / "broken.json")
    (tmp_path / "broken.jsonl").write_text(json.dumps(_item(1)) + "\n{oops\n")
    with pytest.raises(BadInput, match=r"broken.jsonl: malformed JSON at line 2"):
        read_gt(tmp_path / "broken.jsonl")
    bad = VQASample(
        id="z", image="", question="?", answer="a", answer_type="OPEN", benchmark="b", split="s"
    ).to_json()
    bad["answer"] = None
    with pytest.raises(BadInput, match=r"line 1 \(id z\), field 'answer'"):
        read_gt(_write_jsonl(tmp_path / "samples.jsonl", [bad]))


# ------------------------------------------------------------------ answer files


def test_reads_the_example_answer_file_and_joins_by_id():
    samples, preds = read_gt_and_predictions(DATA / "test.json", DATA / "answers.jsonl")
    assert len(preds) == 12
    by_id = dict(zip([s.id for s in samples], preds))
    assert by_id["3"] == "upper upper upper"  # the answer file is in another order
    records = read_answer_file(DATA / "answers.jsonl")
    assert (
        records[0].question_id == "3"
        and records[0].line == 1
        and records[0].row["model_id"] == "example-model"
    )


@pytest.mark.parametrize(
    ("lines", "pattern"),
    [
        (
            ['{"question_id": 1, "text": "yes"}', '{"question_id": 2, "text": "no"'],
            r"malformed JSON at line 2",
        ),
        (['{"question_id": 1}'], r"line 1, field 'text': missing field"),
        (['{"text": "yes"}'], r"line 1, field 'question_id': missing field"),
        (
            ['{"question_id": 1, "text": null}'],
            r"line 1 \(question_id 1\), field 'text': expected text, got null",
        ),
        (['{"question_id": null, "text": "a"}'], r"field 'question_id'"),
        (['{"question_id": 1, "text": "a"}', '{"question_id": 1, "text": "b"}'], r"1 duplicate question ids"),
        (['{"id": 1, "conversations": []}'], r"looks like a GT file"),
        ([""], r"file is empty"),
    ],
)
def test_bad_answer_files(tmp_path, lines, pattern):
    path = tmp_path / "answers.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(BadInput, match=pattern) as info:
        read_answer_file(path)
    assert str(path) in str(info.value)


def test_numeric_prediction_text_is_scored_as_text(tmp_path):
    path = _write_jsonl(tmp_path / "a.jsonl", [{"question_id": 1, "text": 2}])
    assert read_answer_file(path)[0].text == "2"


def test_join_reports_missing_and_extra_ids_with_counts_and_examples(tmp_path):
    samples = read_gt(_write_json(tmp_path / "test.json", [_item(i) for i in range(1, 9)]))
    answers = read_answer_file(
        _write_jsonl(tmp_path / "a.jsonl", [{"question_id": i, "text": "yes"} for i in [1, 2, 3, 100, 101]])
    )
    with pytest.raises(BadInput) as info:
        join_predictions(samples, answers, gt_path="test.json", pred_path="a.jsonl")
    msg = str(info.value)
    assert msg.startswith("a.jsonl: predictions do not match the GT test.json")
    assert "5 of 8 GT ids have no prediction (e.g. '4', '5', '6', '7', '8')" in msg
    assert "2 of 5 prediction ids are not in the GT (e.g. '100', '101')" in msg
    other = read_answer_file(
        _write_jsonl(tmp_path / "b.jsonl", [{"question_id": f"x{i}", "text": "a"} for i in range(3)])
    )
    with pytest.raises(BadInput, match="prediction file for another GT"):
        join_predictions(samples, other)


def test_answer_row_has_llava_med_fields_then_ours():
    sample = VQASample(
        id="q7",
        image="/d/i.png",
        question="Is it?",
        answer="yes",
        answer_type="CLOSED",
        benchmark="b",
        split="s",
    )
    row = answer_row(sample, "Yes.", model_id="hf:tiny", policy="short-answer", fingerprint="abc")
    assert list(row)[:6] == ["question_id", "prompt", "text", "answer_id", "model_id", "metadata"]
    assert row["question_id"] == "q7" and row["prompt"] == "Is it?" and row["text"] == "Yes."
    assert row["policy"] == "short-answer" and row["fingerprint"] == "abc" and row["answer_type"] == "CLOSED"
    assert row["answer_id"] == answer_row(sample, "Yes.", model_id="hf:tiny")["answer_id"]  # deterministic
    assert row["answer_id"] != answer_row(sample, "No.", model_id="hf:tiny")["answer_id"]
    assert answer_row("q8", "no")["question_id"] == "q8"
    with pytest.raises(TypeError):
        answer_row(sample, "x", text2="ok", question_id="clash")
