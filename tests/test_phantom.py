"""Phantom: determinism, counts, the grammar round-trip, loading, captions, bad folders."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
from medvqa.benchmarks.phantom import (
    COUNT_WORDS,
    MODALITIES,
    SLOTS,
    Lesion,
    ParsedQuestion,
    Phantom,
    PhantomConfig,
    Scene,
    all_questions,
    answer_for,
    answer_matches,
    caption_for,
    corpus_texts,
    data_key,
    load_captions,
    load_scenes,
    parse_question,
    render_question,
    scenes_by_image,
    write_phantom,
)
from medvqa.errors import BadInput
from medvqa.prompts import ASK_INSTRUCTION
from medvqa.registry import benchmarks

SMALL = PhantomConfig(seed=3, train_images=60, test_images=20, size=32)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("phantom") / "data"
    summary = write_phantom(root, SMALL)
    return root, summary


def _hash_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes_different_seed_different(built, tmp_path):
    root, _ = built
    again = tmp_path / "again"
    write_phantom(again, SMALL)
    first, second = _hash_tree(root), _hash_tree(again)
    assert len(first) == SMALL.train_images + SMALL.test_images + 7  # images + 3 jsonl x 2 + phantom.json
    assert first == second
    other = tmp_path / "other"
    write_phantom(other, PhantomConfig(seed=4, train_images=60, test_images=20, size=32))
    third = _hash_tree(other)
    assert len(third) == len(first) and not set(third) & {k for k in first if "/images/" in k}
    assert (other / "train/samples.jsonl").read_bytes() != (root / "train/samples.jsonl").read_bytes()
    differing = [a[1] != b[1] for a, b in zip(sorted(first.items()), sorted(third.items()))]
    assert sum(differing) > 0.9 * len(first)  # the pixels differ, not only the names


def test_image_i_does_not_depend_on_how_many_are_drawn(built, tmp_path):
    root, _ = built
    fewer = tmp_path / "fewer"
    write_phantom(fewer, PhantomConfig(seed=3, train_images=10, test_images=0, size=32))
    names = sorted(p.name for p in (fewer / "train/images").iterdir())
    assert len(names) == 10
    for name in names:
        assert (root / "train/images" / name).read_bytes() == (fewer / "train/images" / name).read_bytes()


def test_ids_differ_between_differently_built_folders():
    key = data_key(SMALL)
    assert key == data_key(PhantomConfig(seed=3, train_images=5, test_images=1, size=32, captions=False))
    assert key != data_key(PhantomConfig(seed=4, train_images=60, test_images=20, size=32))
    assert key != data_key(PhantomConfig(seed=3, train_images=60, test_images=20, size=64))


def test_counts_and_closed_share(built):
    root, summary = built
    train = summary["splits"]["train"]
    assert train["images"] == 60
    assert train["samples"] == train["open"] + train["closed"] == 60 * 5
    assert train["closed"] / train["samples"] == pytest.approx(0.4)
    assert train["closed_yes"] * 2 == train["closed"]  # one yes and one no per image
    manifest = json.loads((root / "phantom.json").read_text())
    assert manifest["counts"] == summary["splits"]
    assert manifest["config"]["seed"] == 3
    samples = Phantom().load("test", root)
    assert len(samples) == 20 * 5
    assert len({s.image_id for s in samples}) == 20
    closed = [s for s in samples if s.answer_type == "CLOSED"]
    assert {s.answer for s in closed} == {"yes", "no"}


def test_images_have_the_configured_size(built):
    from PIL import Image

    root, _ = built
    first = sorted((root / "train/images").iterdir())[0]
    assert first.name == f"train-00000-{data_key(SMALL)}.png"
    with Image.open(first) as im:
        assert im.size == (32, 32) and im.mode == "L"


def test_every_generated_question_parses_back_to_its_gold_answer(built):
    root, _ = built
    for split in ("train", "test"):
        scenes = load_scenes(root, split)
        samples = Phantom().load(split, root)
        slots = Counter()
        for s in samples:
            parsed = parse_question(s.question)
            assert parsed is not None, s.question
            assert parsed.slot == s.meta["slot"] and parsed.arg == s.meta["slot_arg"]
            assert parsed.answer_type == s.answer_type
            assert answer_for(scenes[s.image_id], parsed) == s.answer, (s.id, s.question)
            slots[parsed.slot] += 1
        if split == "train":
            assert set(slots) == {spec.name for spec in SLOTS}  # every slot is used


def test_grammar_round_trip_and_paraphrases():
    questions = all_questions()
    assert len(questions) == len({q for q, _ in questions})  # no two slots share a string
    for text, parsed in questions:
        assert parse_question(text) == parsed
        assert parse_question(text.upper().rstrip("?") + " ?") == parsed
    assert parse_question("Is this an MRI?") == ParsedQuestion("is_modality", "mri", 0)
    assert parse_question("was this image taken with x ray") == ParsedQuestion("is_modality", "x-ray", 1)
    assert parse_question("Is this a xray?").arg == "x-ray"
    assert parse_question("HOW MANY LESIONS ARE SEEN").slot == "count"
    assert parse_question("Is there a lesion in the liver?") == ParsedQuestion("organ_abnormal", "liver", 2)
    assert render_question("is_plane", "axial", 0) == "is this an axial image?"
    assert render_question("is_modality", "ct", 0) == "is this a ct?"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "what colour is the sky?",
        "is this a pet?",
        "is the stomach abnormal?",
        "how many",
        "is this an",
    ],
)
def test_unparseable_is_none(text):
    assert parse_question(text) is None


def test_undefined_questions_are_none():
    normal = Scene("x", "test", "ct", "chest", "axial")
    two = Scene(
        "y",
        "test",
        "mri",
        "abdomen",
        "coronal",
        lesions=(
            Lesion("upper", "left", "liver", "small", 0.3, 0.3, 0.05),
            Lesion("lower", "right", "kidney", "large", 0.7, 0.7, 0.08),
        ),
    )
    where = parse_question("where is the lesion?")
    organ = parse_question("which organ is abnormal?")
    assert answer_for(normal, where) is None and answer_for(two, where) is None
    assert answer_for(normal, organ) is None and answer_for(two, organ) is None
    assert answer_for(normal, parse_question("is the liver abnormal?")) is None  # no liver in a chest
    assert answer_for(two, parse_question("is the liver abnormal?")) == "yes"
    assert answer_for(two, parse_question("is the spleen abnormal?")) == "no"
    assert answer_for(two, None) is None
    assert answer_for(two, ParsedQuestion("is_modality", "pet")) is None
    assert answer_for(normal, parse_question("how many lesions are there?")) == "zero"
    assert answer_for(two, parse_question("how many lesions are there?")) == "two"
    assert answer_for(two, parse_question("are there multiple lesions?")) == "yes"
    assert answer_for(normal, parse_question("is the image normal?")) == "yes"
    assert answer_for(two, parse_question("is there a lesion on the right?")) == "yes"
    one = Scene("z", "test", "x-ray", "chest", "coronal", lesions=(two.lesions[1],))
    assert answer_for(one, where) == "lower right"
    assert answer_for(one, parse_question("is there a lesion on the left side?")) == "no"


def test_load_resolves_paths_inside_root_and_meta(built):
    root, _ = built
    phantom = benchmarks.get("phantom")()
    assert phantom.name == "phantom" and phantom.splits == ("train", "test")
    assert "phantom" in phantom.detect_layout(root)
    samples = phantom.load("train", root)
    resolved_root = root.resolve()
    for s in samples[:50]:
        path = Path(s.image)
        assert path.is_absolute() and path.is_file() and path.is_relative_to(resolved_root)
        assert s.benchmark == "phantom" and s.split == "train"
        assert {"image_id", "modality", "region", "plane", "n_lesions"} <= set(s.meta)
        assert s.meta["modality"] in MODALITIES
    assert len({s.id for s in samples}) == len(samples)


def test_captions_and_scenes(built):
    root, _ = built
    scenes = load_scenes(root, "train")
    captions = load_captions(root, "train")
    assert len(captions) == len(scenes) == 60
    for record in captions:
        scene = scenes[record["image_id"]]
        assert record["caption"] == caption_for(scene)
        assert scene.modality in record["caption"] and scene.region in record["caption"]
        assert Path(record["image"]).is_file()
    assert load_captions(root, "test")
    by_path = scenes_by_image(root)
    assert len(by_path) == 80
    for s in Phantom().load("test", root)[:10]:
        assert by_path[s.image].image_id == s.image_id


def test_corpus_covers_every_word(built):
    root, _ = built
    vocab = {w for text in corpus_texts() for w in text.lower().replace("?", " ").replace(".", " ").split()}
    assert ASK_INSTRUCTION in corpus_texts()
    for split in ("train", "test"):
        for s in Phantom().load(split, root):
            for text in (s.question, s.answer):
                assert set(text.lower().replace("?", " ").split()) <= vocab, text
        for record in load_captions(root, split):
            assert set(record["caption"].lower().replace(".", " ").split()) <= vocab
    assert set(COUNT_WORDS) <= vocab


def test_not_a_phantom_folder_says_how_to_build_one(tmp_path):
    with pytest.raises(BadInput, match="medvqa data phantom --out"):
        Phantom().load("test", tmp_path)
    with pytest.raises(BadInput, match="medvqa data phantom --out"):
        Phantom().detect_layout(tmp_path / "missing")
    (tmp_path / "phantom.json").write_text('{"benchmark": "phantom", "version": "0.0", "status": "complete"}')
    with pytest.raises(BadInput, match="version"):
        Phantom().load("test", tmp_path)


def test_unknown_split_and_bad_records(built, tmp_path):
    root, _ = built
    with pytest.raises(BadInput, match="unknown split"):
        Phantom().load("validation", root)
    copy = tmp_path / "copy"
    write_phantom(copy, PhantomConfig(seed=1, train_images=2, test_images=3, size=16))
    lines = (copy / "test/samples.jsonl").read_text().splitlines()
    bad = json.loads(lines[0])
    bad["image"] = "../../etc/passwd"
    lines[0] = json.dumps(bad)
    (copy / "test/samples.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(BadInput, match=r"line 1.*image"):
        Phantom().load("test", copy)
    phantom = Phantom()
    kept = phantom.load("test", copy, skip_bad=True)
    assert len(kept) == len(lines) - 1 and len(phantom.skipped) == 1
    lines[0] = json.dumps({**bad, "image": json.loads(lines[1])["image"]})
    (copy / "test/samples.jsonl").write_text("\n".join(lines) + "\n")
    assert len(Phantom().load("test", copy)) == len(lines)
    sorted((copy / "test/images").iterdir())[2].unlink()
    with pytest.raises(BadInput, match="not found"):
        Phantom().load("test", copy)


def test_rebuild_over_a_phantom_folder_but_not_over_other_data(tmp_path):
    root = tmp_path / "p"
    write_phantom(root, PhantomConfig(train_images=4, test_images=2, size=16))
    summary = write_phantom(root, PhantomConfig(train_images=2, test_images=1, size=16))
    assert summary["splits"]["train"]["images"] == 2
    assert len(list((root / "train/images").iterdir())) == 2
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(BadInput, match="not a Phantom folder"):
        write_phantom(other, PhantomConfig(train_images=1, test_images=1, size=16))
    with pytest.raises(BadInput, match="size"):
        write_phantom(tmp_path / "x", PhantomConfig(size=2))


def test_config_fields_have_help():
    import dataclasses

    for f in dataclasses.fields(PhantomConfig):
        assert f.metadata.get("help"), f.name


def test_answer_matching_normalizes_numbers_articles_and_spelling():
    assert answer_matches("two", "2") and answer_matches("two", " Two. ")
    assert answer_matches("liver", "the liver") and answer_matches("x-ray", "X ray")
    assert answer_matches("x-ray", "x - ray") and answer_matches("zero", "none")
    assert answer_matches("upper left", "Upper left.")
    assert not answer_matches("upper left", "upper right") and not answer_matches("yes", "no")
    assert not answer_matches("two", "three") and not answer_matches("liver", "liver lesion")


def test_four_lesions_when_allowed(tmp_path):
    config = PhantomConfig(train_images=40, test_images=0, size=16, p_normal=0.0, max_lesions=4)
    write_phantom(tmp_path / "p", config)
    scenes = load_scenes(tmp_path / "p", "train")
    assert max(s.n_lesions for s in scenes.values()) == 4
    four = next(s for s in scenes.values() if s.n_lesions == 4)
    assert answer_for(four, parse_question("how many lesions are there?")) == "four"
    assert "four lesions" in caption_for(four)


def _pixels(root: Path, split: str):
    import numpy as np
    from PIL import Image

    scenes = load_scenes(root, split)
    ids = sorted(scenes)
    images = np.stack(
        [np.asarray(Image.open(root / split / "images" / f"{i}.png"), dtype=np.float32) for i in ids]
    )
    return [scenes[i] for i in ids], images


def test_pixels_carry_modality_region_and_plane(built):
    """Nearest class mean on raw pixels reads the global attributes: the images are not noise."""
    import numpy as np

    root, _ = built
    train_scenes, train_x = _pixels(root, "train")
    test_scenes, test_x = _pixels(root, "test")
    # Modality from the intensity histogram, region and plane from the silhouette.
    features = {
        "modality": lambda x: np.stack([np.histogram(i, bins=16, range=(0, 256))[0] for i in x]).astype(
            float
        ),
        "region": lambda x: x.reshape(len(x), -1),
        "plane": lambda x: x.reshape(len(x), -1),
    }
    for attribute, feature in features.items():
        labels = [getattr(s, attribute) for s in train_scenes]
        classes = sorted(set(labels))
        f_train, f_test = feature(train_x), feature(test_x)
        means = np.stack([f_train[[lab == c for lab in labels]].mean(axis=0) for c in classes])
        distances = ((f_test[:, None] - means[None]) ** 2).sum(axis=2)
        predicted = [classes[k] for k in distances.argmin(axis=1)]
        accuracy = np.mean([p == getattr(s, attribute) for p, s in zip(predicted, test_scenes)])
        assert accuracy >= 0.75, (attribute, accuracy)  # chance: 1/3 or 1/2


def test_lesions_stand_out_from_their_surroundings(built):
    import numpy as np

    root, _ = built
    scenes, images = _pixels(root, "train")
    size = images.shape[1]
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    contrasts = []
    for scene, image in zip(scenes, images):
        for lesion in scene.lesions:
            d = np.hypot(xx - lesion.x * size, yy - lesion.y * size) / (lesion.radius * size)
            inside, ring = image[d < 0.6], image[(d > 1.4) & (d < 2.0)]
            contrasts.append(inside.mean() - ring.mean())
    assert len(contrasts) > 30
    assert np.median(contrasts) > 40 and np.mean(np.array(contrasts) > 10) > 0.95
