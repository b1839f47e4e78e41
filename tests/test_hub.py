"""Benchmark data from the Hugging Face cache and from `datasets` folders, offline.

The hub cache is laid out exactly as huggingface_hub lays it out (`datasets--OWNER--NAME/` with
`blobs/`, `refs/<branch>` holding the commit, and `snapshots/<commit>/` whose files are relative links
into `blobs/`), and resolved by the library's own `snapshot_download(..., local_files_only=True)`
under HF_HUB_OFFLINE=1 (set for every test in conftest).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from medvqa.benchmarks import make_benchmark
from medvqa.benchmarks.hub import parse_hub_root, resolve_root
from medvqa.cli import main
from medvqa.errors import BadInput

from tests import real_fixtures as fx


def lay_out_hub_cache(cache: Path, repo_id: str, source: Path, branch: str = "main") -> str:
    """Put every file of `source` into the cache as huggingface_hub stores a downloaded dataset repo."""
    repo = cache / f"datasets--{repo_id.replace('/', '--')}"
    files = sorted(p for p in source.rglob("*") if p.is_file())
    commit = hashlib.sha1(b"".join(p.read_bytes() for p in files)).hexdigest()
    for file in files:
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / file.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / branch).write_text(commit)
    return commit


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert constants.HF_HUB_OFFLINE
    return cache


def test_parse_hub_roots():
    assert parse_hub_root("hf://datasets/acme/vqa-rad@v1.0") == ("acme/vqa-rad", "v1.0")
    assert parse_hub_root("hf://datasets/acme/vqa-rad") == ("acme/vqa-rad", None)
    assert parse_hub_root("acme/vqa-rad") == ("acme/vqa-rad", None)
    assert parse_hub_root("data/phantom/test") is None and parse_hub_root("~/data") is None
    with pytest.raises(BadInput, match="only dataset repos"):
        parse_hub_root("hf://models/acme/tiny")
    with pytest.raises(BadInput, match="is not hf://datasets/OWNER/NAME"):
        parse_hub_root("hf://datasets/acme")


def test_hub_root_resolves_through_the_library_cache(hub_cache, tmp_path, monkeypatch):
    src = fx.make_vqa_rad_parquet(tmp_path / "release")
    commit = lay_out_hub_cache(hub_cache, "acme/vqa-rad", src)
    snapshot = hub_cache / "datasets--acme--vqa-rad" / "snapshots" / commit
    for root in (
        "hf://datasets/acme/vqa-rad@main",
        "hf://datasets/acme/vqa-rad",
        "acme/vqa-rad",
        f"acme/vqa-rad@{commit}",
    ):
        resolved = resolve_root(root)
        assert resolved.path == snapshot.resolve() and resolved.commit == commit, root
        assert resolved.version_suffix == f"+hf=acme/vqa-rad@{commit}"
    # a local folder that happens to look like OWNER/NAME stays a local folder
    local = tmp_path / "acme" / "vqa-rad"
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert (
        resolve_root("acme/vqa-rad").path == Path("acme/vqa-rad")
        and resolve_root("acme/vqa-rad").commit is None
    )

    samples = make_benchmark("vqa-rad").load("test", resolve_root("hf://datasets/acme/vqa-rad").path)
    assert [s.answer for s in samples] == ["no", "2", "Yes", "axial"]


def test_data_inspect_takes_a_hub_root(hub_cache, tmp_path, capsys):
    lay_out_hub_cache(hub_cache, "acme/vqa-rad", fx.make_vqa_rad_parquet(tmp_path / "release"))
    assert main(["data", "inspect", "vqa-rad", "--root", "hf://datasets/acme/vqa-rad@main", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 4 and "Hugging Face parquet" in report["layout"]
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "inspect", "vqa-rad", "--root", "hf://datasets/acme/none"])
    assert exit_info.value.code == 2 and "hf download acme/none" in capsys.readouterr().err


def test_a_dataset_not_in_the_cache_says_how_to_get_it(hub_cache, capsys):
    with pytest.raises(BadInput, match=r"hf download acme/missing --repo-type dataset --revision v2"):
        resolve_root("hf://datasets/acme/missing@v2")
    assert (
        main(["eval", "--model", "hf:none", "--benchmark", "phantom", "--root", "hf://datasets/acme/missing"])
        == 2
    )
    err = capsys.readouterr().err
    assert "neither a local folder nor a dataset in the Hugging Face cache" in err and "Traceback" not in err


def _eval_tiny(model_dir: Path, root: str, out: Path) -> dict:
    from medvqa.evaluate import EvalConfig, evaluate

    cfg = EvalConfig(
        model=f"hf:{model_dir}", benchmark="phantom", root=root, limit=8, batch_size=8, n_boot=0, out=str(out)
    )
    return evaluate(cfg, log=lambda _m: None)


def test_eval_on_a_hub_root_records_the_commit(hub_cache, phantom_root, tiny_model_dir, tmp_path):
    commit = lay_out_hub_cache(hub_cache, "acme/phantom", phantom_root)
    scores = _eval_tiny(tiny_model_dir, "hf://datasets/acme/phantom@main", tmp_path / "eval")
    assert scores["n"] == 8
    assert scores["benchmark_version"].endswith(f"+hf=acme/phantom@{commit}")
    assert scores["root"] == f"hf://datasets/acme/phantom@{commit}"  # not the local cache path
    local = _eval_tiny(tiny_model_dir, str(phantom_root), tmp_path / "eval-local")
    assert "+hf=" not in local["benchmark_version"]
    assert local["scorers"] == scores["scorers"]  # same data, same answers


def test_confinement_admits_the_snapshot_blobs_and_nothing_else(hub_cache, tmp_path):
    src = fx.make_vqa_rad_original(tmp_path / "release")
    commit = lay_out_hub_cache(hub_cache, "acme/vqa-rad-orig", src)
    snapshot = resolve_root("acme/vqa-rad-orig").path
    samples = make_benchmark("vqa-rad").load("test", snapshot)  # images are links into blobs/
    assert samples and all(Path(s.image).is_relative_to(snapshot) for s in samples)
    assert all(s.image.endswith(".jpg") for s in samples)  # the file's name, not its blob's hash

    # one image link now leads out of the repo's cache folder: refused, naming file, record and field
    outside = fx.write_image(tmp_path / "elsewhere" / "x.jpg", 9)
    image = next((snapshot / fx.VQA_RAD_IMAGES).iterdir())
    image.unlink()
    image.symlink_to(outside)
    with pytest.raises(BadInput, match="leads outside the data root through a symlink") as info:
        make_benchmark("vqa-rad").load("test", snapshot)
    assert info.value.field and commit


def test_save_to_disk_folders_load_through_datasets(tmp_path):
    import datasets

    rows = fx.hf_rows([(1, "is there a mass?", "yes"), (2, "what organ?", "brain")])
    folder = tmp_path / "vqa-rad-disk"
    dd = datasets.DatasetDict(
        {
            split: datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())
            for split in ("train", "test")
        }
    )
    dd.save_to_disk(str(folder))
    bench = make_benchmark("vqa-rad")
    assert "Hugging Face" in bench.detect_layout(folder)
    samples = bench.load("test", folder)
    assert [(s.question, s.answer, s.answer_type) for s in samples] == [
        ("is there a mass?", "yes", "CLOSED"),
        ("what organ?", "brain", "OPEN"),
    ]
    assert isinstance(samples[0].image, bytes) and samples[0].image == rows[0]["image"]["bytes"]

    # a save_to_disk folder whose image column holds only a path outside the root is refused
    bad = [{**rows[0], "image": {"bytes": None, "path": str(tmp_path / "x.png")}}]
    datasets.DatasetDict({"test": datasets.Dataset.from_list(bad)}).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(BadInput, match="absolute image path"):
        bench.load("test", tmp_path / "bad")


def test_reading_parquet_through_datasets_imports_no_torch(tmp_path):
    """`medvqa data` runs no model, so it must not import torch (datasets' streaming mode would)."""
    import subprocess
    import sys

    root = fx.make_vqa_rad_parquet(tmp_path / "hf")
    code = (
        "import sys; from pathlib import Path; from medvqa.benchmarks import make_benchmark; "
        f"n = len(make_benchmark('vqa-rad').load('test', Path({str(root)!r}))); "
        "print(n, 'torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["4", "False", "False"]


def test_train_takes_a_hub_root(hub_cache, phantom_root):
    from medvqa.cli import build_parser

    commit = lay_out_hub_cache(hub_cache, "acme/phantom", phantom_root)
    argv = ["train", "--trainer", "sft", "--model", "hf:m", "--benchmark", "phantom", "--out", "o"]
    args = build_parser().parse_args([*argv, "--root", "hf://datasets/acme/phantom"])
    assert args.root == hub_cache.resolve() / "datasets--acme--phantom" / "snapshots" / commit
    assert len(make_benchmark("phantom").load("train", args.root)) > 0


def test_a_sweep_keeps_hub_roots_and_plans_on_them(hub_cache, phantom_root, tmp_path):
    from medvqa.sweeps import load_config
    from medvqa.sweeps.plan import Planner

    lay_out_hub_cache(hub_cache, "acme/phantom", phantom_root)
    config = tmp_path / "hub.toml"
    config.write_text(
        'name = "hub"\nbase_model = "hf:models/tiny"\nfractions = [0.25]\nseeds = [0]\n'
        '[train]\nbenchmark = "phantom"\nroot = "hf://datasets/acme/phantom@main"\n'
        '[[eval]]\nbenchmark = "phantom"\nroot = "hf://datasets/acme/phantom@main"\nsplit = "test"\n'
        '[[trainers]]\nname = "sft"\n'
    )
    cfg, run_dir = load_config(config, out=tmp_path / "run")
    assert cfg.train.root == "hf://datasets/acme/phantom@main"  # not made into a local path
    assert [e.root for e in cfg.evals] == ["hf://datasets/acme/phantom@main"]
    manifest, n = Planner(cfg, run_dir).manifest(0.25, 0)
    assert manifest and n > 0


def test_stllava_questions_take_a_hub_root(hub_cache, phantom_root):
    from medvqa.cli import build_parser
    from medvqa.commands.stllava import _images_from

    commit = lay_out_hub_cache(hub_cache, "acme/phantom", phantom_root)
    argv = ["stllava", "questions", "--out", "q.jsonl", "--model", "hf:m", "--benchmark", "phantom"]
    images = _images_from(build_parser().parse_args([*argv, "--root", "hf://datasets/acme/phantom"]))
    assert images and all(f"/snapshots/{commit}/" in image for image in images)
