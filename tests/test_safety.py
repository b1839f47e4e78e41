"""Untrusted data: malicious pickles, paths that escape the root, bad records (and --skip-bad)."""

from __future__ import annotations

import os
import pickle
import pickletools
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from medvqa.errors import BadInput
from medvqa.registry import benchmarks
from medvqa.safety import PathGuard, confinement_roots, resolve_inside, safe_load_pickle

from tests import real_fixtures as fx


class _CreatesFile:
    """Unpickling this runs `open(marker, "w")`: the file appears if the pickle is executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


class _RunsShell:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch '{self.marker}'",))


def _write_malicious_pathvqa(root: Path, payload: Any) -> Path:
    fx.make_pathvqa_original(root, splits=("test",))
    records: list[Any] = fx.pathvqa_records("test")
    records[1]["answer"] = payload  # hidden inside an otherwise ordinary record
    with open(root / "pvqa" / "qas" / "test" / "test_qa.pkl", "wb") as fh:
        pickle.dump(records, fh, protocol=2)
    return root


@pytest.mark.parametrize("payload_cls", [_CreatesFile, _RunsShell])
def test_malicious_pickle_is_refused_and_never_executed(tmp_path: Path, payload_cls: type) -> None:
    marker = tmp_path / "pwned"
    root = _write_malicious_pathvqa(tmp_path / "data", payload_cls(marker))
    pkl = root / "pvqa" / "qas" / "test" / "test_qa.pkl"
    with pytest.raises(
        BadInput, match=r"test_qa\.pkl: pickle refused: it references (builtins|io)\.open|system"
    ) as exc:
        benchmarks.get("pathvqa")().load("test", root)
    assert "not executed" in str(exc.value)
    assert not marker.exists()
    # Control: the payload is real — a plain unpickler does create the file.
    with open(pkl, "rb") as fh:
        obj = pickle.load(fh)  # deliberately unsafe: proves the payload is real
    if hasattr(obj[1]["answer"], "close"):
        obj[1]["answer"].close()
    assert marker.exists()


def test_protocol0_global_and_plain_pickles(tmp_path: Path) -> None:
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(b"cos\nsystem\n(S'echo hi'\ntR.")  # protocol 0: GLOBAL + REDUCE
    with pytest.raises(BadInput, match=r"evil\.pkl: pickle refused: it references os\.system"):
        safe_load_pickle(evil)
    good = tmp_path / "good.pkl"
    data = [{"image": "a", "n": 1, "x": 1.5, "t": (1, None, True), "b": b"\x00", "s": {1, 2}}]
    good.write_bytes(pickle.dumps(data, protocol=5))
    assert safe_load_pickle(good) == data
    trunc = tmp_path / "trunc.pkl"
    trunc.write_bytes(pickle.dumps(data)[:-5])
    with pytest.raises(BadInput, match=r"trunc\.pkl: not a readable pickle"):
        safe_load_pickle(trunc)
    # protocol 4+ names a global with STACK_GLOBAL instead of GLOBAL: refused too, and never run
    marker = tmp_path / "pwned"
    evil5 = tmp_path / "evil5.pkl"
    evil5.write_bytes(pickle.dumps(_RunsShell(marker), protocol=5))
    assert {"STACK_GLOBAL", "REDUCE"} <= {op.name for op, _, _ in pickletools.genops(evil5.read_bytes())}
    with pytest.raises(BadInput, match=r"evil5\.pkl: pickle refused: it references (os|posix)\.system"):
        safe_load_pickle(evil5)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ paths


def test_paths_escaping_the_root_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "imgs").mkdir(parents=True)
    outside = fx.write_image(tmp_path / "secret" / "x.jpg", 1)
    kw: dict[str, Any] = {"path": root / "test.json", "index": "#0", "field": "img_name"}
    for bad, why in [
        (str(outside), "absolute"),
        ("/etc/passwd", "absolute"),
        ("C:\\x.jpg", "absolute"),
        ("../secret/x.jpg", "'..'"),
        ("imgs/../../secret/x.jpg", "'..'"),
        ("..\\secret\\x.jpg", "'..'"),
    ]:
        with pytest.raises(BadInput, match=why) as exc:
            resolve_inside(root, bad, base=root / "imgs", **kw)
        assert (
            "test.json" in str(exc.value) and "record #0" in str(exc.value) and "'img_name'" in str(exc.value)
        )
    (root / "imgs" / "link").symlink_to(tmp_path / "secret")
    with pytest.raises(BadInput, match="outside the data root through a symlink"):
        resolve_inside(root, "link/x.jpg", base=root / "imgs", **kw)
    # a symlink that stays inside the root is fine
    fx.write_image(root / "real" / "y.jpg", 2)
    (root / "imgs" / "inside").symlink_to(root / "real")
    assert (
        resolve_inside(root, "inside/y.jpg", base=root / "imgs", **kw) == (root / "real" / "y.jpg").resolve()
    )


def _resolved_whole(root: Path, rel: str) -> Path | str:
    """The oracle: what `resolve_inside` did before `PathGuard` (every path resolved whole, the root
    and the file's folders with it), or "refused" for an escape / "loop"."""
    real_root = root.resolve()
    full = root.joinpath(*PurePosixPath(rel).parts)
    try:
        real, in_snapshot = full.resolve(), full.parent.resolve() / full.name
    except RuntimeError:
        return "loop"
    if not any(real.is_relative_to(folder) for folder in confinement_roots(real_root)):
        return "refused"
    if not real.is_relative_to(real_root) and in_snapshot.is_relative_to(real_root):
        return in_snapshot
    return real


def _guarded(guard: PathGuard, rel: str) -> Path | str:
    try:
        return guard.resolve(rel, path=guard.root / "samples.jsonl", index="line 1", field="image")
    except BadInput as exc:
        return "loop" if "symlink loop" in str(exc) else "refused" if "symlink" in str(exc) else str(exc)


def test_a_guard_admits_and_refuses_exactly_what_each_path_resolved_whole_did(tmp_path: Path) -> None:
    # One load's guard resolves each folder once and remembers what it admitted; every file is still
    # judged by itself: a link out, a folder link out, a chain, a loop, a hub snapshot's blob link, a
    # missing file, in two orders (a folder already seen, then a link beside the file it admitted)
    secret = fx.write_image(tmp_path / "secret" / "x.jpg", 1)
    cache = tmp_path / "hub" / "datasets--o--n"
    root = cache / "snapshots" / "abc"
    imgs = root / "imgs"
    fx.write_image(imgs / "a.jpg", 2)
    fx.write_image(root / "real" / "y.jpg", 3)
    blob = fx.write_image(cache / "blobs" / "0123abcd", 4)
    links = {
        "out.jpg": secret,  # a file link out, beside a.jpg
        "sub": tmp_path / "secret",  # a folder link out
        "in.jpg": root / "real" / "y.jpg",  # stays inside
        "chain.jpg": imgs / "in.jpg",  # a link to a link inside
        "chain_out.jpg": imgs / "out.jpg",  # a link to a link out
        "loop.jpg": imgs / "loop.jpg",  # itself
        "realdir": root / "real",  # a folder link inside
        "blob.jpg": blob,  # what huggingface_hub writes: a snapshot file links into blobs/
        "dangling.jpg": tmp_path / "nowhere.jpg",
    }
    for name, target in links.items():
        (imgs / name).symlink_to(target)
    (root / "real" / "up").symlink_to(tmp_path / "secret")  # out, two links deep
    rels = [
        "imgs/a.jpg",
        *(f"imgs/{name}" for name in links),
        "imgs/sub/x.jpg",
        "imgs/realdir/y.jpg",
        "imgs/realdir/up/x.jpg",
        "imgs/missing.jpg",
        "imgs/a.jpg/x.jpg",
        "nowhere/z.jpg",
        "real/y.jpg",
    ]
    expected = {rel: _resolved_whole(root, rel) for rel in rels}
    assert (
        expected["imgs/out.jpg"] == expected["imgs/sub/x.jpg"] == expected["imgs/chain_out.jpg"] == "refused"
    )
    assert expected["imgs/realdir/up/x.jpg"] == expected["imgs/dangling.jpg"] == "refused"
    assert expected["imgs/loop.jpg"] == "loop"
    assert expected["imgs/blob.jpg"] == imgs.resolve() / "blob.jpg"  # kept in the snapshot
    assert expected["imgs/chain.jpg"] == (root / "real" / "y.jpg").resolve()
    for order in (rels, rels[::-1], rels + rels):
        guard = PathGuard(root)
        assert {rel: _guarded(guard, rel) for rel in order} == expected


def test_a_guard_resolves_the_root_and_each_folder_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    for i in range(40):
        fx.write_image(root / f"d{i % 2}" / f"{i}.jpg", i)
    calls: list[Path] = []
    resolve = Path.resolve

    def counted(self: Path, strict: bool = False) -> Path:
        calls.append(self)
        return resolve(self, strict)

    monkeypatch.setattr(Path, "resolve", counted)
    guard = PathGuard(root)
    got = [
        guard.resolve(f"d{i % 2}/{i}.jpg", path=root, index=i, field="image") for i in range(40) for _ in "ab"
    ]
    assert got == [resolve(root / f"d{i % 2}" / f"{i}.jpg") for i in range(40) for _ in "ab"]
    assert len(calls) == 3  # the root, d0, d1 (no file here is a link)


def test_a_phantom_image_linked_out_is_refused_among_admitted_ones(tmp_path: Path) -> None:
    # the loader's guard has resolved train/images/ for the images before it; the link is still judged
    from medvqa.benchmarks.phantom import Phantom, PhantomConfig, write_phantom

    root = tmp_path / "phantom"
    write_phantom(root, PhantomConfig(seed=0, train_images=6, test_images=2, size=16))
    images = sorted((root / "train" / "images").iterdir())
    secret = fx.write_image(tmp_path / "secret" / "x.png", 1, "PNG")
    images[-1].unlink()
    images[-1].symlink_to(secret)
    bench = Phantom()
    with pytest.raises(
        BadInput, match=r"samples\.jsonl, record line \d+, field 'image': .*through a symlink"
    ):
        bench.load("train", root)
    kept = bench.load("train", root, skip_bad=True)
    assert kept and all(Path(s.image).parent == (root / "train" / "images").resolve() for s in kept)
    assert {Path(s.image).name for s in kept} == {p.name for p in images[:-1]}
    assert bench.skipped and all("through a symlink" in r.error for r in bench.skipped)


def test_slake_image_symlink_escape_is_refused(tmp_path: Path) -> None:
    root = fx.make_slake(tmp_path / "data")
    fx.write_image(tmp_path / "elsewhere" / "source.jpg", 3)
    target = root / "Slake1.0" / "imgs" / "xmlab4"
    for p in target.iterdir():
        p.unlink()
    target.rmdir()
    target.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(BadInput, match=r"test\.json, record #0 \(qid 201\), field 'img_name': .*symlink"):
        benchmarks.get("slake")().load("test", root)


def test_vqa_rad_dotdot_image_name(tmp_path: Path) -> None:
    records = fx.vqa_rad_records()
    records[3]["image_name"] = "../../outside.jpg"
    fx.write_image(tmp_path / "outside.jpg", 1)
    root = fx.make_vqa_rad_original(tmp_path / "a" / "rad", records)
    with pytest.raises(
        BadInput, match=r"record #3 \(qid 4\), field 'image_name': image path '\.\./\.\./outside\.jpg'"
    ):
        benchmarks.get("vqa-rad")().load("test", root)


# ------------------------------------------------------------------------------------------ bad records


def _rad_with(tmp_path: Path, change: Any) -> Path:
    records = fx.vqa_rad_records()
    change(records)
    return fx.make_vqa_rad_original(tmp_path / "rad", records)


BAD_RAD = {
    "missing field": (
        lambda r: r[4].pop("question"),
        r"record #4 \(qid 5\), field 'question': missing field",
    ),
    "duplicate qid": (
        lambda r: r[5].update(qid=4),
        r"record #5 \(qid 4\), field 'qid': duplicate question id '4' \(first seen at record #3 \(qid 4\)\)",
    ),
    "unknown answer type": (
        lambda r: r[6].update(answer_type="MAYBE"),
        r"record #6 \(qid 7\), field 'answer_type': unknown answer type 'MAYBE'",
    ),
    "missing image": (
        lambda r: r[7].update(image_name="synpic9.jpg"),
        r"record #7 \(qid 8\), field 'image_name': image not found .*synpic9\.jpg",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_RAD))
def test_bad_record_names_file_record_field(tmp_path: Path, case: str) -> None:
    change, pattern = BAD_RAD[case]
    root = _rad_with(tmp_path, change)
    bench = benchmarks.get("vqa-rad")()
    with pytest.raises(BadInput, match=pattern) as exc:
        bench.load("test", root)
    assert str(exc.value).startswith(str(root / fx.VQA_RAD_JSON))
    samples = bench.load("test", root, skip_bad=True)
    assert len(samples) == 4 and len(bench.skipped) == 1
    assert "record" in str(bench.skipped[0])


def test_corrupt_image_and_skip_bad_counts(tmp_path: Path) -> None:
    root = fx.make_vqa_rad_original(tmp_path / "rad")
    (root / fx.VQA_RAD_IMAGES / "synpic3.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    bench = benchmarks.get("vqa-rad")()
    with pytest.raises(BadInput, match=r"record #5 \(qid 6\), field 'image_name': corrupt image"):
        bench.load("test", root)
    samples = bench.load("test", root, skip_bad=True)
    assert [s.id for s in samples] == ["4", "5"]  # the 3 questions on synpic3 are skipped
    assert len(bench.skipped) == 3


def test_corrupt_parquet_image_and_missing_column(tmp_path: Path) -> None:
    rows = fx.hf_rows([(1, "is it?", "yes"), (2, "what?", "lung")])
    rows[1]["image"] = {"bytes": b"garbage bytes", "path": "img2.png"}
    fx.make_parquet(tmp_path / "hf" / "data" / "test-00000-of-00001.parquet", rows)
    bench = benchmarks.get("vqa-rad")()
    with pytest.raises(
        BadInput, match=r"test-00000-of-00001\.parquet, record row 1, field 'image': corrupt image"
    ):
        bench.load("test", tmp_path / "hf")
    assert len(bench.load("test", tmp_path / "hf", skip_bad=True)) == 1 and len(bench.skipped) == 1
    fx.make_parquet(tmp_path / "hf2" / "data" / "test-0.parquet", [{"question": "q", "answer": "a"}])
    with pytest.raises(
        BadInput, match=r"test-0\.parquet, field 'image': parquet file lacks column\(s\) \['image'\]"
    ):
        bench.load("test", tmp_path / "hf2")


def test_parquet_image_path_cell_cannot_escape(tmp_path: Path) -> None:
    fx.write_image(tmp_path / "secret.png", 1, "PNG")
    rows = [{"image": {"bytes": None, "path": "../secret.png"}, "question": "q?", "answer": "yes"}]
    fx.make_parquet(tmp_path / "hf" / "data" / "test-0.parquet", rows)
    with pytest.raises(
        BadInput, match=r"field 'image\.path': image path '\.\./secret\.png' with '\.\.' refused"
    ):
        benchmarks.get("pathvqa")().load("test", tmp_path / "hf")


def test_slake_duplicate_qid_and_missing_field(tmp_path: Path) -> None:
    root = fx.make_slake(tmp_path)
    records = fx.slake_records("test")
    records[2]["qid"] = records[0]["qid"]
    del records[3]["answer"]
    fx.write_json(root / "Slake1.0" / "test.json", records)
    bench = benchmarks.get("slake")()
    with pytest.raises(
        BadInput, match=r"test\.json, record #2 \(qid 201\), field 'qid': duplicate question id '201'"
    ):
        bench.load("test", root)
    samples = bench.load("test", root, skip_bad=True)
    assert len(samples) == 2 and len(bench.skipped) == 2
    assert "field 'answer': missing field" in str(bench.skipped[1])


def test_pathvqa_missing_image_and_bad_record_type(tmp_path: Path) -> None:
    root = fx.make_pathvqa_original(tmp_path, splits=("test",))
    records: list[Any] = fx.pathvqa_records("test")
    records[2]["image"] = "test_0099"
    records.append("not a dict")
    with open(root / "pvqa" / "qas" / "test" / "test_qa.pkl", "wb") as fh:
        pickle.dump(records, fh)
    bench = benchmarks.get("pathvqa")()
    with pytest.raises(
        BadInput, match=r"test_qa\.pkl, record #2, field 'image': image not found .*test_0099\.jpg"
    ):
        bench.load("test", root)
    samples = bench.load("test", root, skip_bad=True)
    assert len(samples) == 4 and len(bench.skipped) == 2
    assert "record #5: expected an object, got str" in str(bench.skipped[1])
    assert [s.id for s in samples] == ["test-00000", "test-00001", "test-00003", "test-00004"]  # ids stay put


def test_llava_med_json_escape_and_duplicates(tmp_path: Path) -> None:
    items = fx.llava_med_items()
    items[1]["id"] = 0
    items[2]["image"] = "/etc/hostname"
    root = fx.make_llava_med(tmp_path, items)
    bench = benchmarks.get("llava-med-json")()
    with pytest.raises(BadInput, match=r"record item 1 \(id 0\), field 'id': duplicate question id '0'"):
        bench.load("test", root)
    assert len(bench.load("test", root, skip_bad=True)) == 1
    assert "absolute image path '/etc/hostname' refused" in str(bench.skipped[1])
    with pytest.raises(BadInput, match=r"'\.\.' refused"):
        benchmarks.get("llava-med-json")(file="../test.json").load("test", root)


def test_truncated_jpeg_caught_by_full_decode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from medvqa.cli import main

    root = fx.make_vqa_rad_original(tmp_path / "rad")
    import io
    import random

    from PIL import Image

    rnd = random.Random(0)
    noise = Image.frombytes("L", (128, 128), bytes(rnd.randrange(256) for _ in range(128 * 128)))
    buf = io.BytesIO()
    noise.save(buf, format="JPEG")
    big = buf.getvalue()  # mostly entropy-coded scan data: cutting it leaves the headers intact
    (root / fx.VQA_RAD_IMAGES / "synpic3.jpg").write_bytes(big[: len(big) // 2])
    bench = benchmarks.get("vqa-rad")()
    assert len(bench.load("test", root)) == 5  # structure parses: the default check is cheap
    with pytest.raises(
        BadInput,
        match=r"record #5 \(qid 6\), field 'image_name': corrupt image \(OSError: image file is truncated",
    ):
        bench.load("test", root, check_images="decode")
    assert len(bench.load("test", root, check_images="exists")) == 5
    assert (
        main(["data", "inspect", "vqa-rad", "--root", str(root), "--check-images", "decode", "--skip-bad"])
        == 0
    )
    assert "skipped      3 bad record(s)" in capsys.readouterr().out
    ph = tmp_path / "ph"
    assert (
        main(
            ["data", "phantom", "--out", str(ph), "--train-images", "1", "--test-images", "1", "--size", "16"]
        )
        == 0
    )
    capsys.readouterr()
    # every benchmark takes the base class's image checks, Phantom too
    assert main(["data", "inspect", "phantom", "--root", str(ph), "--check-images", "decode"]) == 0
    capsys.readouterr()
    png = next((ph / "test" / "images").glob("*.png"))
    png.write_bytes(png.read_bytes()[:-30])  # cut into the image data
    assert main(["data", "inspect", "phantom", "--root", str(ph), "--check-images", "exists"]) == 0
    capsys.readouterr()
    assert main(["data", "inspect", "phantom", "--root", str(ph), "--check-images", "decode"]) == 2
    assert "field 'image': corrupt image" in capsys.readouterr().err
