"""`medvqa export`: a real eval of the tiny model, read back by lm-eval's own code and by the shapes
lmms-eval's `--baseline` loader reads (lmms-eval itself needs torchvision, which this project never
installs, so its loader's rules are checked here: `<prefix>_samples_<task>.jsonl` beside
`<prefix>_results.json`, an int `doc_id`, a numeric key with "score" in its name)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from medvqa.cli import main
from medvqa.io import read_json, read_jsonl


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory, phantom_root, tiny_model_dir) -> Path:
    """A real eval folder: the tiny model on 40 Phantom test questions."""
    from medvqa.evaluate import EvalConfig, evaluate

    out = tmp_path_factory.mktemp("export") / "eval" / "phantom"
    evaluate(
        EvalConfig(
            model=f"hf:{tiny_model_dir}",
            benchmark="phantom",
            root=str(phantom_root),
            limit=40,
            batch_size=20,
            n_boot=50,
            out=str(out),
            progress=False,
        ),
        log=lambda _m: None,
    )
    # a fixed time, so that the file names are known
    os.utime(out / "scores.json", (1_764_590_400, 1_764_590_400))
    return out


def _export(run: Path, out: Path, fmt: str) -> list[str]:
    assert main(["export", str(run), "--format", fmt, "--out", str(out)]) == 0
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def test_lm_eval_reads_the_export(eval_dir, tmp_path, capsys):
    from lm_eval import utils as lm_utils
    from lm_eval.loggers.wandb_logger import WandbLogger

    out = tmp_path / "exp"
    files = _export(eval_dir.parent, out, "lm-eval")
    assert all(f.startswith(files[0].split("/")[0] + "/") for f in files)  # one model folder
    scores = read_json(eval_dir / "scores.json")

    # lm-eval's own file-name readers find the results file and each task's samples
    listed = [f"{out.name}/{f}" for f in files]
    (results_name,) = lm_utils.get_results_filenames(listed)
    samples = lm_utils.get_sample_results_filenames(listed)
    tasks = sorted(lm_utils.get_file_task_name(Path(f).name) for f in samples)
    assert tasks == ["phantom", "phantom_strict"]
    assert lm_utils.get_latest_filename(samples).endswith(".jsonl")

    results = json.loads((tmp_path / results_name).read_text())
    for key in ("results", "configs", "versions", "n-samples", "n-shot", "higher_is_better", "config"):
        assert key in results, key
    assert isinstance(results["date"], float) and "git_hash" in results
    if (Path(__file__).resolve().parents[1] / ".git").exists():  # a checkout: the harness's own commit
        assert results["git_hash"]
    assert results["versions"]["phantom"] == scores["benchmark_version"]
    assert results["n-samples"]["phantom"] == {"original": 40, "effective": 40}
    assert results["configs"]["phantom"]["metadata"]["data_hash"] == scores["data_hash"]
    task = results["results"]["phantom"]
    for metric, stored in scores["scorers"]["llava-med"].items():
        assert math.isclose(task[f"{metric},none"], stored["value"] / 100, abs_tol=1e-12), metric
        se = task[f"{metric}_stderr,none"]
        assert se == "N/A" or se >= 0
    strict = results["results"]["phantom_strict"]
    assert math.isclose(
        strict["closed_accuracy,none"], scores["scorers"]["strict"]["closed_accuracy"]["value"] / 100
    )

    # lm-eval's table renderer (what `lm_eval` prints at the end of a run) renders every metric
    table = lm_utils.make_table(results)
    assert "phantom_strict" in table and "closed_accuracy" in table and "open_recall" in table
    metric_lines = [line for line in table.splitlines() if line.count("|") > 8 and "none" in line]
    n_metrics = sum(len(m) for m in scores["scorers"].values())
    assert len(metric_lines) == n_metrics

    # lm-eval's W&B logger's parsing (no W&B run: its __init__ is the only part that needs one)
    logger = WandbLogger.__new__(WandbLogger)
    logger.post_init(results)
    _summary, flat = logger._sanitize_results_dict()
    assert flat["phantom/closed_accuracy"] == task["closed_accuracy,none"]
    assert logger._get_config()["task_configs"]["phantom"]["metric_list"][0]["metric"] == "closed_accuracy"

    # per-sample rows: lm-eval's saved shape, in the eval's question order, metrics match scored.jsonl
    scored = read_jsonl(eval_dir / "scored.jsonl")
    sample_file = next(f for f in samples if Path(f).name.startswith("samples_phantom_2"))
    rows = read_jsonl(tmp_path / sample_file)
    assert [r["doc_id"] for r in rows] == list(range(len(scored)))
    for row, item in zip(rows, scored):
        assert row["target"] == item["gold"] and row["filtered_resps"] == [item["prediction"]]
        assert row["resps"] == [[item["prediction"]]] and row["filter"] == "none"
        assert row["doc"]["question_id"] == item["id"]
        assert set(row["metrics"]) == set(item["llava-med"])
        for metric in row["metrics"]:
            assert row[metric] == item["llava-med"][metric] / 100
        assert row["arguments"]["gen_args_0"]["arg_0"]  # the prompt the model saw
        assert row["target_hash"] == lm_utils.hash_string(row["target"])
    # the task hash is lm-eval's: the samples' doc hashes in order
    expected = lm_utils.hash_string("".join(f"sample_{i}{r['doc_hash']}" for i, r in enumerate(rows)))
    assert results["task_hashes"]["phantom"] == expected

    # no local absolute path in the shared files
    text = (tmp_path / results_name).read_text()
    assert str(eval_dir.parent) not in text and str(tmp_path) not in text

    # re-exporting the same run gives the same bytes
    again = tmp_path / "again"
    _export(eval_dir.parent, again, "lm-eval")
    for f in files:
        assert (again / f).read_bytes() == (out / f).read_bytes(), f


def test_lmms_eval_baseline_shapes(eval_dir, tmp_path):
    out = tmp_path / "exp"
    files = _export(eval_dir, out, "lmms-eval")
    samples = [f for f in files if "_samples_" in f]
    assert len(samples) == 2
    for name in samples:
        path = out / name
        # lmms-eval's baseline loader: `<prefix>_samples_<task>.jsonl` → `<prefix>_results.json`
        prefix = path.name.split("_samples_")[0]
        assert (path.parent / f"{prefix}_results.json").is_file()
        scored = {r["id"]: r for r in read_jsonl(eval_dir / "scored.jsonl")}
        scorer = "strict" if path.name.endswith("_strict.jsonl") else "llava-med"
        for row in read_jsonl(path):
            assert isinstance(row["doc_id"], int) and "input" in row and "arguments" not in row
            score_keys = [k for k in row if "score" in k.lower() and isinstance(row[k], int | float)]
            assert score_keys == ["score"]
            item = scored[row["doc"]["question_id"]]
            headline = "closed_accuracy" if item["answer_type"] == "CLOSED" else "open_recall"
            assert row["score"] == item[scorer][headline] / 100


def test_bad_runs_are_one_line(eval_dir, tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope"), "--format", "lm-eval", "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["export", str(tmp_path / "empty"), "--format", "lm-eval", "--out", str(tmp_path / "o")]) == 2
    assert "no eval folder" in capsys.readouterr().err

    # a scores.json that disagrees with its scored rows is refused, not exported
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("scored.jsonl", "predictions.jsonl"):
        (broken / name).write_bytes((eval_dir / name).read_bytes())
    scores = read_json(eval_dir / "scores.json")
    scores["scorers"]["llava-med"]["closed_accuracy"]["value"] += 12.5
    (broken / "scores.json").write_text(json.dumps(scores))
    assert main(["export", str(broken), "--format", "lm-eval", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "scores.json" in err and "closed_accuracy" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


# --- STLLaVA-Med preference pairs → trl's vision DPO format ------------------------------------


@pytest.fixture()
def pairs_file(tmp_path, phantom_root) -> Path:
    """A stage-2 pairs.jsonl in the trainer's format, on real Phantom images."""
    images = sorted((phantom_root).rglob("*.png"))[:3]
    pairs = [
        {
            "id": f"img{i}-q0",
            "image": str(image),
            "prompt": "is there a lesion in the liver?",
            "answer_type": "CLOSED",
            "chosen": "yes",
            "rejected": "no",
            "scores": [10.0, 0.0],
        }
        for i, image in enumerate(images)
    ]
    pairs.append({**pairs[0]})  # a pair written twice (two writers) is exported once
    replay = {**pairs[0], "id": "replay-x", "chosen": "no", "rejected": "no", "replay": True}
    pairs.append({k: v for k, v in replay.items() if k != "scores"})  # labeled replay: not a preference
    path = tmp_path / "ckpt" / "stages" / "pairs.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return path


def test_pairs_export_is_a_trl_vision_dpo_dataset(pairs_file, tmp_path, tiny_model_dir):
    import datasets
    from transformers import AutoProcessor
    from trl.data_utils import is_conversational, prepare_multimodal_messages
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    out = tmp_path / "exp"
    assert main(["export", str(pairs_file.parents[1]), "--format", "trl-dpo", "--out", str(out)]) == 0
    from_disk = datasets.load_from_disk(str(out / "disk"))
    from_parquet = datasets.load_dataset("parquet", data_files=str(out / "data" / "*.parquet"), split="train")
    from_folder = datasets.load_dataset(str(out), split="train")  # the dataset card's configs
    for ds in (from_disk, from_parquet, from_folder):
        assert len(ds) == 3
        assert {"images", "prompt", "chosen", "rejected"} <= set(ds.column_names)
        assert isinstance(ds.features["images"], datasets.List)
        assert isinstance(ds.features["images"].feature, datasets.Image)
    assert "replay" in from_disk.info.description and "3 pairs" in from_disk.info.description
    assert "'short-answer' prompt policy" in from_disk.info.description
    from huggingface_hub import DatasetCard

    card = DatasetCard.load(out / "README.md")  # what the Hub reads once the folder is uploaded
    assert card.data.configs == [
        {"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*.parquet"}]}
    ]
    assert "replay-x" not in from_disk["id"]
    row = from_parquet[0]
    assert row["images"][0].size == (32, 32)  # the bytes travelled with the export
    assert is_conversational(row)
    assert row["chosen"][0]["role"] == "assistant" and row["chosen"][0]["content"][0]["text"] == "yes"
    assert "is there a lesion in the liver?" in row["prompt"][-1]["content"][-1]["text"]
    filled = prepare_multimodal_messages(row["prompt"], images=row["images"])
    assert sum(part.get("image") is not None for m in filled for part in m["content"]) == 1

    # trl's own vision-preference collator (what DPOTrainer batches with) takes the rows as they are
    processor = AutoProcessor.from_pretrained(str(tiny_model_dir))
    batch = DataCollatorForVisionPreference(processor)([dict(r) for r in from_disk.select(range(2))])
    assert batch["input_ids"].shape[0] == 4  # 2 chosen + 2 rejected
    assert batch["pixel_values"].shape[0] == 4 and batch["completion_mask"].sum() > 0


def test_pairs_export_refuses_bad_pairs(pairs_file, tmp_path, capsys):
    lines = pairs_file.read_text().splitlines()
    bad = json.loads(lines[1])
    bad["chosen"] = ""
    pairs_file.write_text("\n".join([lines[0], json.dumps(bad)]) + "\n")
    assert main(["export", str(pairs_file), "--format", "trl-dpo", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "pairs.jsonl" in err and "line 2" in err and "'chosen'" in err

    broken = json.loads(lines[0])
    broken["image"] = str(tmp_path / "missing.png")
    pairs_file.write_text(json.dumps(broken) + "\n")
    assert main(["export", str(pairs_file), "--format", "trl-dpo", "--out", str(tmp_path / "o")]) == 2
    assert "image not found" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "none"), "--format", "trl-dpo", "--out", str(tmp_path / "o")]) == 2


def test_a_run_tree_exports_one_folder_per_model(tmp_path, phantom_root, tiny_model_dir):
    """Two checkpoints inside a run: each gets its own lm-eval folder, named by its path in the run."""
    import shutil

    from medvqa.evaluate import EvalConfig, evaluate
    from medvqa.models.tiny import init_tiny, preset_config

    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "a" / "checkpoint")
    init_tiny(run / "b" / "checkpoint", preset_config("phantom", seed=1))  # other weights
    for name in ("a", "b"):
        cfg = EvalConfig(
            model=f"hf:{run / name / 'checkpoint'}",
            benchmark="phantom",
            root=str(phantom_root),
            limit=10,
            batch_size=10,
            n_boot=0,
            out=str(run / name / "eval" / "phantom"),
        )
        evaluate(cfg, log=lambda _m: None)
    files = _export(run, tmp_path / "exp", "lm-eval")
    assert sorted({f.split("/")[0] for f in files}) == ["a__checkpoint", "b__checkpoint"]
    results = [read_json(p) for p in sorted((tmp_path / "exp").glob("*/results_*.json"))]
    assert [r["model_name"] for r in results] == ["a/checkpoint", "b/checkpoint"]
    assert [r["medvqa_eval_dirs"] for r in results] == [["a/eval/phantom"], ["b/eval/phantom"]]
    assert results[0]["config"]["model_fingerprint"] != results[1]["config"]["model_fingerprint"]
