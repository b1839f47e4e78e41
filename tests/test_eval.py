"""`medvqa eval` on Phantom + the tiny LLaVA: files, resume, cache keys, bad input, accelerate."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from medvqa.cli import main
from medvqa.errors import BadInput
from medvqa.evaluate import EvalConfig, evaluate
from medvqa.io import read_jsonl

from tests._openai_server import fake_key, fake_openai, openai_server  # noqa: F401 - fixtures

LIMIT = 48


def _cfg(model: str, root: Path, out: Path, **kw) -> EvalConfig:
    base = dict(
        benchmark="phantom", root=str(root), out=str(out), limit=LIMIT, batch_size=8, max_new_tokens=4
    )
    return EvalConfig(model=model, **{**base, **kw})


class Counting:
    """Wraps a VQAModel and counts the questions it is asked (to prove what was reused)."""

    def __init__(self, model):
        self.inner, self.spec, self.asked = model, model.spec, 0

    @property
    def fingerprint(self):
        return self.inner.fingerprint

    def generate(self, requests, settings):
        self.asked += len(requests)
        return self.inner.generate(requests, settings)


class Killed(Exception):
    """What a kill looks like from inside: the run stops between two batches, nothing is cleaned up."""


class DiesAfter(Counting):
    """Counting, and the process 'dies' (Killed) when asked for batch `n_batches + 1`; the rerun
    (`left = None`) lives."""

    def __init__(self, model, n_batches: int):
        super().__init__(model)
        self.left: int | None = n_batches

    def generate(self, requests, settings):
        if self.left is not None:
            if self.left == 0:
                raise Killed
            self.left -= 1
        return super().generate(requests, settings)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from medvqa.models import load_model

    return load_model(f"hf:{tiny_model_dir}")


@pytest.fixture(scope="module")
def reference_run(tiny, phantom_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "ref"
    scores = evaluate(_cfg(tiny.spec, phantom_root, out), model=tiny, log=lambda m: None)
    return out, scores


def test_run_files_follow_the_contract(reference_run, tiny) -> None:
    out, scores = reference_run
    on_disk = json.loads((out / "scores.json").read_text())
    assert on_disk == scores
    for key in (
        "benchmark",
        "benchmark_version",
        "split",
        "closed_rule",
        "prompt_policy",
        "model",
        "generation",
    ):
        assert key in scores
    portable_spec = "hf:" + os.path.relpath(tiny.spec.removeprefix("hf:"), out)  # no absolute local path
    assert scores["model"] == {**scores["model"], "spec": portable_spec, "fingerprint": tiny.fingerprint}
    assert scores["generation"]["max_new_tokens"] == 4 and scores["generation"]["do_sample"] is False
    assert scores["prompt_policy"] == "short-answer" and "transformers" in scores["versions"]
    assert scores["n"] == LIMIT == scores["n_open"] + scores["n_closed"]
    for scorer in ("llava-med", "strict"):
        m = scores["scorers"][scorer]
        assert {"closed_accuracy", "open_recall", "open_f1"} <= set(m)
        assert set(m["closed_accuracy"]) == {"value", "n", "ci_low", "ci_high"}
    preds = read_jsonl(out / "predictions.jsonl")
    assert len(preds) == LIMIT
    assert {"question_id", "prompt", "text", "answer_id", "model_id", "metadata", "key"} <= set(preds[0])
    assert preds[0]["prompt"].endswith("Answer with a single word or phrase.")
    scored = read_jsonl(out / "scored.jsonl")
    assert [r["id"] for r in scored] == [p["question_id"] for p in preds]
    closed = [r["strict"]["closed_accuracy"] for r in scored if r["answer_type"] == "CLOSED"]
    assert scores["scorers"]["strict"]["closed_accuracy"]["value"] == pytest.approx(sum(closed) / len(closed))
    # the answer file scores the same with `medvqa score` (no model)
    gt = out / "gt.jsonl"
    from medvqa.benchmarks.phantom import Phantom

    samples = Phantom().load("test", out / scores["root"])[:LIMIT]  # the root, relative to the run folder
    gt.write_text("".join(json.dumps(s.to_json()) + "\n" for s in samples))
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "medvqa.cli",
            "score",
            "--gt",
            str(gt),
            "--pred",
            str(out / "predictions.jsonl"),
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["scorers"]["strict"]["closed_accuracy"]["value"] == pytest.approx(
        scores["scorers"]["strict"]["closed_accuracy"]["value"]
    )


def test_batch_size_does_not_change_scores(reference_run, tiny, phantom_root, tmp_path) -> None:
    ref_out, ref = reference_run
    scores = evaluate(
        _cfg(tiny.spec, phantom_root, tmp_path / "b1", batch_size=1), model=tiny, log=lambda m: None
    )
    assert scores["scorers"] == ref["scorers"]
    assert (tmp_path / "b1" / "predictions.jsonl").read_text() == (ref_out / "predictions.jsonl").read_text()


def test_resume_after_kill_and_torn_line(reference_run, tiny, phantom_root, tmp_path) -> None:
    ref_out, ref = reference_run
    out = tmp_path / "killed"
    counting = DiesAfter(tiny, n_batches=3)
    with pytest.raises(Killed):
        evaluate(_cfg(tiny.spec, phantom_root, out), model=counting, log=lambda m: None)
    counting.left = None
    assert counting.asked == 24 and not (out / "scores.json").exists()
    # a kill in the middle of a write leaves half a line behind
    data = (out / "predictions.jsonl").read_bytes()
    (out / "predictions.jsonl").write_bytes(data[: len(data) - 40])
    counting.asked = 0
    messages: list[str] = []
    scores = evaluate(_cfg(tiny.spec, phantom_root, out), model=counting, log=messages.append)
    assert counting.asked == LIMIT - 23  # the 23 intact rows were reused, the torn 24th redone
    assert any("resuming: 23 of 48" in m for m in messages)
    assert scores["scorers"] == ref["scorers"]
    assert (out / "predictions.jsonl").read_text() == (ref_out / "predictions.jsonl").read_text()


def test_finished_run_is_not_recomputed(reference_run, tiny, monkeypatch) -> None:
    out, ref = reference_run
    import medvqa.models

    def refuse(*a, **k):
        raise AssertionError("a finished eval must not load the model")

    monkeypatch.setattr(medvqa.models, "load_model", refuse)
    messages: list[str] = []
    again = evaluate(_cfg(tiny.spec, out / ref["root"], out), log=messages.append)
    assert again == ref and "already done" in messages[-1]


def test_new_checkpoint_never_reuses_predictions(reference_run, tiny, phantom_root, tmp_path) -> None:
    from medvqa.models import load_model
    from medvqa.models.tiny import init_tiny, preset_config

    ref_out, ref = reference_run
    out = tmp_path / "run"
    shutil.copytree(ref_out, out)
    # "retrain" into a new folder: different weights, same everything else
    other = load_model(f"hf:{init_tiny(tmp_path / 'ckpt2', preset_config('phantom', seed=1))}")
    assert other.fingerprint != tiny.fingerprint
    counting = Counting(other)
    messages: list[str] = []
    scores = evaluate(_cfg(other.spec, phantom_root, out), model=counting, log=messages.append)
    assert counting.asked == LIMIT
    assert scores["model"]["fingerprint"] == other.fingerprint and scores["key"] != ref["key"]
    rows = read_jsonl(out / "predictions.jsonl")
    assert len(rows) == LIMIT and {r["fingerprint"] for r in rows} == {other.fingerprint}
    (stale,) = (out / "stale").glob("*.jsonl")  # the old model's answers are kept aside, not mixed in
    assert len(read_jsonl(stale)) == LIMIT
    assert any("another model" in m for m in messages)
    # a different prompt policy or decoding is a different key too
    counting.asked = 0
    evaluate(_cfg(other.spec, phantom_root, out, prompt_policy="plain"), model=counting, log=lambda m: None)
    assert counting.asked == LIMIT


def test_cli_eval_and_bad_input_exit_2(tiny_model_dir, phantom_root, tmp_path, capsys) -> None:
    from medvqa.benchmarks.phantom import PhantomConfig, write_phantom

    root = tmp_path / "ph"
    write_phantom(root, PhantomConfig(seed=5, train_images=0, test_images=6, size=32, captions=False))
    rows = [json.loads(line) for line in (root / "test" / "samples.jsonl").read_text().splitlines()]
    bad_image = root / rows[12]["image"]  # an image of the second batch (batch size 4)
    bad_image.write_bytes(b"not an image")
    out = tmp_path / "out"
    args = ["eval", "--model", f"hf:{tiny_model_dir}", "--benchmark", "phantom", "--root", str(root)]
    args += ["--out", str(out), "--batch-size", "4", "--max-new-tokens", "2"]
    assert main(args) == 2  # found by the loader's image check, or when the batch reads it
    err = capsys.readouterr().err
    assert str(bad_image) in err and "image" in err and not (out / "scores.json").exists()
    assert main([*args, "--skip-bad"]) == 0
    scores = json.loads((out / "scores.json").read_text())
    n_bad = sum(1 for r in rows if root / r["image"] == bad_image)
    at = scores["n_skipped_at_load"] + scores["n_skipped_at_generation"]
    assert n_bad and scores["n_skipped"] == at == n_bad and scores["n"] == len(rows) - n_bad
    listed = read_jsonl(out / "skipped.jsonl")  # each skipped record, with where and why
    assert len(listed) == n_bad and len({r["stage"] for r in listed}) == 1
    assert all(str(bad_image) in r["error"] for r in listed)
    capsys.readouterr()
    assert main([*args, "--skip-bad"]) == 0  # finished: the broken image is not retried
    assert "already done" in capsys.readouterr().err
    capsys.readouterr()
    args[2] = f"hf:{tmp_path / 'no-model'}"
    assert main([*args[:3], "--benchmark", "phantom", "--root", str(root), "--skip-bad"]) == 2
    assert "model path does not exist" in capsys.readouterr().err
    assert main([*args[:5], "--root", str(tmp_path / "nowhere")]) == 2
    assert main([*args, "--split", "validation"]) == 2
    assert main([*args, "--prompt-policy", "nope"]) == 2


def test_accelerate_two_processes_equal_one(reference_run, tiny_model_dir, phantom_root, tmp_path) -> None:
    ref_out, ref = reference_run
    accelerate = Path(sys.executable).with_name("accelerate")
    out = tmp_path / "ddp"
    # `--cpu` makes accelerate (1.15) start ONE process whatever --num_processes says; --multi_gpu
    # starts two (torchrun), and medvqa.distributed sets up a gloo group on CPU.
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", "-m", "medvqa.cli", "eval"]
    cmd += ["--model", f"hf:{tiny_model_dir}", "--benchmark", "phantom", "--root", str(phantom_root)]
    cmd += ["--out", str(out), "--limit", str(LIMIT), "--batch-size", "8", "--max-new-tokens", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"{LIMIT} questions sharded across 2 processes" in res.stdout + res.stderr  # two ranks really ran
    scores = json.loads((out / "scores.json").read_text())
    assert scores["scorers"] == ref["scorers"] and scores["key"] == ref["key"]
    assert (out / "predictions.jsonl").read_text() == (ref_out / "predictions.jsonl").read_text()
    assert not list(out.glob("predictions.rank*.jsonl"))


def test_light_commands_do_not_import_torch(reference_run, tmp_path) -> None:
    out, scores = reference_run
    from medvqa.benchmarks.phantom import Phantom

    gt = tmp_path / "gt.jsonl"
    samples = Phantom().load("test", out / scores["root"])[:LIMIT]
    gt.write_text("".join(json.dumps(s.to_json()) + "\n" for s in samples))
    code = (
        "import sys\n"
        "from medvqa.cli import main, build_parser\n"
        "build_parser().format_help()\n"
        "for a in (['eval', '--help'], ['model', 'init-tiny', '--help']):\n"
        "    try:\n"
        "        main(a)\n"
        "    except SystemExit:\n"
        "        pass\n"
        f"assert main(['score', '--gt', {str(gt)!r}, '--pred', {str(out / 'predictions.jsonl')!r}]) == 0\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'accelerate') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[]"


def test_eval_openai_endpoint_on_loopback(phantom_root, tmp_path, fake_openai, fake_key, capsys) -> None:  # noqa: F811
    """`medvqa eval --model openai:...@http://127.0.0.1`: same run files; resumes without requests."""
    from tests._openai_server import Fault, files_containing

    fake_openai.reply = lambda body: "yes"
    fake_openai.faults.append(Fault(status=500))  # retried, not fatal
    spec = (
        f"openai:test-vlm@{fake_openai.base_url},api_key_env=MEDVQA_TEST_KEY,backoff=0.01,max_concurrency=4"
    )
    out = tmp_path / "gpt"
    args = ["eval", "--model", spec, "--benchmark", "phantom", "--root", str(phantom_root), "--out", str(out)]
    args += ["--limit", "20", "--batch-size", "8", "--n-boot", "0"]
    assert main(args) == 0
    assert fake_openai.n_requests == 21  # 20 questions + the retried 500
    scores = json.loads((out / "scores.json").read_text())
    n_closed_yes = sum(
        1 for r in read_jsonl(out / "scored.jsonl") if r["answer_type"] == "CLOSED" and r["gold"] == "yes"
    )
    assert scores["scorers"]["strict"]["closed_accuracy"]["value"] == pytest.approx(
        100 * n_closed_yes / scores["n_closed"]
    )
    body = fake_openai.bodies[-1]
    assert body["model"] == "test-vlm" and body.get("temperature", 0) == 0
    assert files_containing(out, fake_key) == []  # the key is never written to a run file
    capsys.readouterr()
    assert main(args) == 0 and fake_openai.n_requests == 21  # finished: nothing asked again
    assert "already done" in capsys.readouterr().err


def test_resume_from_rank_shards_of_a_killed_multiprocess_run(
    reference_run, tiny, phantom_root, tmp_path
) -> None:
    """Shards left by a killed N-process run are merged and reused by a rerun with any process count."""
    ref_out, ref = reference_run
    out = tmp_path / "shards"
    counting = DiesAfter(tiny, n_batches=2)
    with pytest.raises(Killed):
        evaluate(_cfg(tiny.spec, phantom_root, out), model=counting, log=lambda m: None)
    counting.left = None
    rows = read_jsonl(out / "predictions.jsonl")
    (out / "predictions.jsonl").unlink()
    for rank in (0, 1):  # what two ranks would have left: every other question each
        text = "".join(json.dumps(r) + "\n" for r in rows[rank::2])
        (out / f"predictions.rank{rank}.jsonl").write_text(text + '{"question_id": "torn')
    counting.asked = 0
    scores = evaluate(_cfg(tiny.spec, phantom_root, out), model=counting, log=lambda m: None)
    assert counting.asked == LIMIT - 16
    assert scores["scorers"] == ref["scorers"] and not list(out.glob("predictions.rank*"))
    assert (out / "predictions.jsonl").read_text() == (ref_out / "predictions.jsonl").read_text()


def test_sigkill_mid_run_then_resume(fake_openai, fake_key, phantom_root, tmp_path) -> None:  # noqa: F811
    """A real `kill -9` of `medvqa eval` at a known point, whatever the machine's speed: the loopback
    endpoint holds every request after the 3rd, so the process is killed while it waits for the 4th
    answer with exactly 3 rows flushed. The rerun asks only for the rest and writes the reference bytes."""
    import hashlib
    import signal
    import threading
    import time

    n, held_after = 12, 3
    release = threading.Event()

    def reply(body: dict) -> str:  # an answer that depends on the question only, not on timing
        if len(fake_openai.bodies) > held_after and not release.is_set():
            release.wait(120)
        digest = hashlib.sha256(json.dumps(body["messages"], sort_keys=True).encode()).digest()
        return ("yes", "no", "left lung", "ct")[digest[0] % 4]

    fake_openai.reply = reply
    spec = f"openai:test-vlm@{fake_openai.base_url},api_key_env=MEDVQA_TEST_KEY,max_concurrency=1"
    cmd = [sys.executable, "-m", "medvqa.cli", "eval", "--model", spec, "--benchmark", "phantom"]
    cmd += ["--root", str(phantom_root), "--limit", str(n), "--no-progress", "--n-boot", "10"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    release.set()
    ref = tmp_path / "ref"
    done = subprocess.run([*cmd, "--out", str(ref)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    ref_rows = (ref / "predictions.jsonl").read_text().splitlines(keepends=True)
    assert len(ref_rows) == n

    release.clear()
    fake_openai.bodies.clear()
    out = tmp_path / "sigkill"
    preds = out / "predictions.jsonl"
    proc = subprocess.Popen([*cmd, "--out", str(out), "--batch-size", "1"], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (
        len(fake_openai.bodies) > held_after and preds.is_file() and preds.read_bytes().count(b"\n") == 3
    ):
        assert proc.poll() is None, "eval ended although its 4th request is held"
        assert time.monotonic() < deadline, "eval never reached its 4th request"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    release.set()
    assert preds.read_text() == "".join(ref_rows[:held_after]) and not (out / "scores.json").exists()

    fake_openai.bodies.clear()
    res = subprocess.run(
        [*cmd, "--out", str(out), "--batch-size", "8"], env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert f"resuming: {held_after} of {n}" in res.stderr
    assert len(fake_openai.bodies) == n - held_after  # the flushed rows were not asked for again
    assert (
        json.loads((out / "scores.json").read_text())["scorers"]
        == json.loads((ref / "scores.json").read_text())["scorers"]
    )
    assert preds.read_text() == "".join(ref_rows)


def test_sigkill_of_an_hf_eval_leaves_no_worker_holding_the_output(
    tiny_model_dir, phantom_root, tmp_path
) -> None:
    """`kill -9` of an `hf:` eval mid-run: its batch-preparing worker process dies with it (it used
    to live on, waiting for a batch, holding the output's lock: the resumed eval was refused as a
    second writer), and the rerun resumes to the same bytes as a run never killed."""
    import signal
    import time

    cmd = [sys.executable, "-m", "medvqa.cli", "eval", "--model", f"hf:{tiny_model_dir}", "--benchmark"]
    cmd += ["phantom", "--root", str(phantom_root), "--no-progress", "--n-boot", "10", "--batch-size", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref"
    done = subprocess.run([*cmd, "--out", str(ref)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    n = len(read_jsonl(ref / "predictions.jsonl"))

    out = tmp_path / "killed"
    preds = out / "predictions.jsonl"
    proc = subprocess.Popen([*cmd, "--out", str(out)], env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (preds.is_file() and preds.read_bytes().count(b"\n") >= 8):
        assert proc.poll() is None and time.monotonic() < deadline, "eval ended before it was killed"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    kept = preds.read_bytes().count(b"\n")
    assert 8 <= kept < n

    res = subprocess.run([*cmd, "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"resuming: {kept} of {n}" in res.stderr
    assert preds.read_bytes() == (ref / "predictions.jsonl").read_bytes()


def test_benchmark_options_reach_the_loader_and_the_run_key(tiny, tmp_path) -> None:
    from tests.real_fixtures import make_slake

    root = make_slake(tmp_path / "data")
    english = evaluate(
        _cfg(tiny.spec, root, tmp_path / "en", benchmark="slake"), model=tiny, log=lambda m: None
    )
    every = evaluate(
        _cfg(tiny.spec, root, tmp_path / "all", benchmark="slake", benchmark_options=["lang=all"]),
        model=tiny,
        log=lambda m: None,
    )
    assert (english["n"], every["n"]) == (4, 6)
    assert every["benchmark_version"] != english["benchmark_version"]
    with pytest.raises(BadInput, match="lang"):
        evaluate(
            _cfg(tiny.spec, root, tmp_path / "x", benchmark="slake", benchmark_options=["lang=fr"]),
            model=tiny,
        )
    with pytest.raises(BadInput, match="KEY=VALUE"):
        evaluate(
            _cfg(tiny.spec, root, tmp_path / "y", benchmark="slake", benchmark_options=["zh"]), model=tiny
        )


def test_gold_derived_closed_questions_are_prompted_as_open(tiny, tmp_path) -> None:
    """Parquet layouts have no answer_type: CLOSED = gold is yes/no, so the prompt must not offer [yes, no]."""
    from tests.real_fixtures import make_vqa_rad_parquet

    root = make_vqa_rad_parquet(tmp_path / "data")
    out = tmp_path / "run"
    evaluate(
        _cfg(tiny.spec, root, out, benchmark="vqa-rad", prompt_policy="short-answer+options"),
        model=tiny,
        log=lambda m: None,
    )
    rows = read_jsonl(out / "predictions.jsonl")
    assert any(r["answer_type"] == "CLOSED" for r in rows)
    assert all("[yes, no]" not in r["prompt"] for r in rows)


def _refuse_model_loading(monkeypatch) -> None:
    import medvqa.models

    def refuse(*a, **k):
        raise AssertionError("this eval must not load the model")

    monkeypatch.setattr(medvqa.models, "load_model", refuse)


def test_changed_scoring_settings_rescore_without_generating(reference_run, tiny, tmp_path, monkeypatch):
    """Other --n-boot / --scorers or a new scorer version: rescored from predictions.jsonl, no model."""
    import medvqa.scoring

    ref_out, ref = reference_run
    out = tmp_path / "run"
    shutil.copytree(ref_out, out)
    predictions = (out / "predictions.jsonl").read_bytes()
    _refuse_model_loading(monkeypatch)
    root = ref_out / ref["root"]
    messages: list[str] = []
    fewer = evaluate(_cfg(tiny.spec, root, out, n_boot=0), log=messages.append)
    assert "already done" not in messages[-1] and fewer["scoring"]["n_boot"] == 0
    values = {(s, m): v["value"] for s, ms in ref["scorers"].items() for m, v in ms.items()}
    assert values == {(s, m): v["value"] for s, ms in fewer["scorers"].items() for m, v in ms.items()}
    ci = fewer["scorers"]["strict"]["closed_accuracy"]
    assert ci["ci_low"] is None and ref["scorers"]["strict"]["closed_accuracy"]["ci_low"] is not None
    assert fewer["model"].get("details") == ref["model"]["details"]  # kept from the scored run
    only = evaluate(_cfg(tiny.spec, root, out, scorers="strict"), log=lambda m: None)
    assert set(only["scorers"]) == {"strict"}
    monkeypatch.setattr(medvqa.scoring, "SCORER_VERSION", "999")  # a scorer fix
    fixed = evaluate(_cfg(tiny.spec, root, out), log=lambda m: None)
    assert fixed["scoring"]["scorer_version"] == "999" and fixed["scorers"] == ref["scorers"]
    messages.clear()
    assert evaluate(_cfg(tiny.spec, root, out), log=messages.append) == fixed
    assert "already done" in messages[-1]
    assert (out / "predictions.jsonl").read_bytes() == predictions


def _cli_args(model_dir, root) -> list[str]:
    """`medvqa eval` of the tiny model on the Phantom folder `root` (the rest is the test's)."""
    return ["eval", "--model", f"hf:{model_dir}", "--benchmark", "phantom", "--root", str(root)]


def test_cli_rescore_needs_complete_predictions(reference_run, tiny_model_dir, tmp_path, monkeypatch, capsys):
    ref_out, ref = reference_run
    out = tmp_path / "run"
    shutil.copytree(ref_out, out)
    _refuse_model_loading(monkeypatch)
    args = _cli_args(tiny_model_dir, ref_out / ref["root"])
    args += ["--out", str(out), "--limit", str(LIMIT), "--max-new-tokens", "4", "--rescore"]
    assert main([*args, "--n-boot", "20"]) == 0
    assert "(rescored)" in capsys.readouterr().err
    assert json.loads((out / "scores.json").read_text())["scoring"]["n_boot"] == 20
    rows = (out / "predictions.jsonl").read_text().splitlines(keepends=True)
    (out / "predictions.jsonl").write_text("".join(rows[:-5]))  # a killed run: 5 answers missing
    assert main([*args, "--n-boot", "30"]) == 2
    assert "5 of 48 questions have no prediction" in capsys.readouterr().err


class ThinkingModel(Counting):
    """Answers like a reasoning model: its reasoning says "no", then the answer."""

    def generate(self, requests, settings):
        self.asked += len(requests)
        return [
            f"<think>no, no: is there a lesion? {a}</think> yes"
            for a in self.inner.generate(requests, settings)
        ]


def test_think_policy_strips_reasoning_before_both_scorers(tiny, phantom_root, tmp_path) -> None:
    model = ThinkingModel(tiny)
    out = tmp_path / "think"
    plain = evaluate(_cfg(tiny.spec, phantom_root, out), model=model, log=lambda m: None)
    stripped = evaluate(
        _cfg(tiny.spec, phantom_root, out, prompt_policy="short-answer+think"),
        model=model,
        log=lambda m: None,
    )
    assert model.asked == LIMIT  # the same answers: switching +think rescores, it does not generate
    assert stripped["key"] == plain["key"] and stripped["prompt_policy"] == "short-answer+think"
    assert stripped["scoring"]["strip_think"] and stripped["prompt_policy_config"]["strip_think"]
    scored = read_jsonl(out / "scored.jsonl")
    assert {r["prediction"] for r in scored} == {"yes"}
    assert all(r["text"].startswith("<think>") for r in read_jsonl(out / "predictions.jsonl"))
    yes_gold = [r for r in scored if r["answer_type"] == "CLOSED" and r["gold"] == "yes"]
    n_closed = stripped["n_closed"]
    for scorer in ("llava-med", "strict"):
        assert stripped["scorers"][scorer]["closed_accuracy"]["value"] == pytest.approx(
            100 * len(yes_gold) / n_closed
        )
    # unstripped, the substring rule counts the reasoning's "no" as an answer
    assert plain["scorers"]["llava-med"]["closed_accuracy"]["value"] == 100.0


def test_strip_reasoning_rules() -> None:
    from medvqa.prompts import strip_reasoning

    assert strip_reasoning("<think>no</think> yes") == "yes"
    assert strip_reasoning("reasoning opened by the template</think>\nyes") == "yes"
    assert strip_reasoning("<think>still thinking about no") == ""  # no answer, not "no"
    assert strip_reasoning("plain answer") == "plain answer"


class FailsOn(Counting):
    """A model whose image reader fails for some questions, as a corrupt-but-verifiable file would."""

    def __init__(self, model, bad_ids):
        super().__init__(model)
        self.bad_ids = set(bad_ids)

    def generate(self, requests, settings):
        for r in requests:
            if r.id in self.bad_ids:
                raise BadInput("image does not decode (truncated)", path=r.image, record=r.id, field="image")
        return super().generate(requests, settings)


def test_generation_skips_are_counted_and_listed(tiny, phantom_root, tmp_path) -> None:
    from medvqa.benchmarks.phantom import Phantom

    ids = [s.id for s in Phantom().load("test", phantom_root)[:LIMIT]]
    bad = {ids[3], ids[20]}
    out = tmp_path / "run"
    scores = evaluate(
        _cfg(tiny.spec, phantom_root, out, skip_bad=True), model=FailsOn(tiny, bad), log=lambda m: None
    )
    assert scores["n"] == LIMIT - 2 and scores["n_skipped"] == scores["n_skipped_at_generation"] == 2
    listed = read_jsonl(out / "skipped.jsonl")
    assert [r["id"] for r in listed] == [ids[3], ids[20]] and {r["stage"] for r in listed} == {"generate"}
    # a rescore keeps the list though it generates nothing
    again = evaluate(
        _cfg(tiny.spec, phantom_root, out, skip_bad=True, n_boot=10),
        model=FailsOn(tiny, bad),
        log=lambda m: None,
    )
    assert again["n_skipped"] == 2 and [r["id"] for r in read_jsonl(out / "skipped.jsonl")] == [
        ids[3],
        ids[20],
    ]


def test_second_process_on_the_same_out_fails_at_once(
    tiny_model_dir, phantom_root, tmp_path, monkeypatch, capsys
):
    from medvqa.io import output_lock

    out = tmp_path / "run"
    out.mkdir()
    _refuse_model_loading(monkeypatch)
    args = ["eval", "--model", f"hf:{tiny_model_dir}", "--benchmark", "phantom", "--root", str(phantom_root)]
    args += ["--out", str(out), "--limit", "8"]
    with output_lock(out):  # what a running eval holds
        assert main(args) == 2
        assert main([*args, "--fresh"]) == 2
    err = capsys.readouterr().err
    assert err.count("another process") == 2 and str(out) in err and len(err.strip().splitlines()) == 2


def test_unwritable_out_is_one_line_before_the_model_loads(
    tiny_model_dir, phantom_root, tmp_path, monkeypatch, capsys
):
    _refuse_model_loading(monkeypatch)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    args = ["eval", "--model", f"hf:{tiny_model_dir}", "--benchmark", "phantom", "--root", str(phantom_root)]
    for out in (blocker, blocker / "under"):
        assert main([*args, "--out", str(out), "--limit", "8"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "is a file or lies under a file" in err and str(out) in err
    assert blocker.read_text() == "x"


def test_full_disk_mid_run_is_one_line_and_resumes(
    reference_run, tiny, phantom_root, tmp_path, monkeypatch
) -> None:
    import errno

    import medvqa.io

    ref_out, ref = reference_run
    out = tmp_path / "full"
    real_write = medvqa.io.JsonlAppender.write_lines
    calls = {"n": 0}

    def write(self, text):
        calls["n"] += 1
        if calls["n"] == 3:  # the disk fills up at the third batch
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        return real_write(self, text)

    monkeypatch.setattr(medvqa.io.JsonlAppender, "write_lines", write)
    with pytest.raises(BadInput, match="No space left on device") as exc:
        evaluate(_cfg(tiny.spec, phantom_root, out), model=tiny, log=lambda m: None)
    assert "\n" not in str(exc.value) and "--out" in str(exc.value)
    assert len(read_jsonl(out / "predictions.jsonl")) == 16  # two whole batches, intact
    monkeypatch.setattr(medvqa.io.JsonlAppender, "write_lines", real_write)
    scores = evaluate(_cfg(tiny.spec, phantom_root, out), model=tiny, log=lambda m: None)
    assert scores["scorers"] == ref["scorers"]
    assert (out / "predictions.jsonl").read_text() == (ref_out / "predictions.jsonl").read_text()


def test_several_benchmarks_one_call_one_table(tiny_model_dir, phantom_root, tmp_path, capsys) -> None:
    from tests.real_fixtures import make_slake

    slake = make_slake(tmp_path / "data")
    out = tmp_path / "runs"
    args = ["eval", "--model", f"hf:{tiny_model_dir}", "--benchmark", "phantom,slake"]
    args += ["--root", f"{phantom_root},{slake}", "--out", str(out), "--limit", "8", "--max-new-tokens", "2"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].startswith("| benchmark | split | n |")
    assert "| phantom | test | 8 |" in table and "| slake | test | 4 |" in table
    for name in ("phantom", "slake"):
        assert json.loads((out / f"{name}-test" / "scores.json").read_text())["benchmark"] == name
    assert main([*args[:5], "--root", str(phantom_root)]) == 2
    assert "one root per benchmark" in capsys.readouterr().err
    # a benchmark that does not load stops the call before any model runs on the others
    no_images = Path(__file__).parent / "data"  # a test.json whose images are not there
    late = tmp_path / "late"
    bad = [*args[:4], "phantom,llava-med-json", "--root", f"{phantom_root},{no_images}", "--out", str(late)]
    assert main(bad) == 2
    assert "image not found" in capsys.readouterr().err and not late.exists()


def test_scores_json_holds_no_absolute_path(reference_run, phantom_root, tmp_path) -> None:
    out, scores = reference_run
    text = (out / "scores.json").read_text()
    assert str(tmp_path.parents[1]) not in text and '"/' not in text
    assert (out / scores["root"]).resolve() == phantom_root.resolve()  # relative to the run folder
    assert len(scores["data_hash"]) == 16
    # the same questions give the same data hash wherever the data lives
    moved = tmp_path / "moved"
    shutil.copytree(out / scores["root"], moved)
    from medvqa.evaluation.plan import make_plan

    cfg = _cfg(scores["model"]["spec"], moved, tmp_path / "x")
    assert make_plan(cfg, cfg.model).data_hash == scores["data_hash"]


def test_appender_flushes_every_batch_and_fsyncs_at_most_every_interval(tmp_path, monkeypatch) -> None:
    import medvqa.io

    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(medvqa.io.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    path = tmp_path / "rows.jsonl"
    with medvqa.io.JsonlAppender(path, sync_interval=3600) as appender:
        for i in range(5):
            appender.write([{"i": i}])
            assert len(read_jsonl(path)) == i + 1  # in the OS after each batch: a kill -9 keeps it
        assert synced == []
    assert len(synced) == 1  # on close
    synced.clear()
    with medvqa.io.JsonlAppender(path) as appender:  # the default: every batch
        for i in range(3):
            appender.write([{"i": i}])
    assert len(synced) == 4


def test_hand_corrupted_resume_row_is_one_line(reference_run, tiny_model_dir, tmp_path, monkeypatch, capsys):
    ref_out, ref = reference_run
    out = tmp_path / "run"
    shutil.copytree(ref_out, out)
    (out / "scores.json").unlink()
    rows = read_jsonl(out / "predictions.jsonl")
    rows[6]["text"] = None
    rows[9].pop("question_id")
    (out / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _refuse_model_loading(monkeypatch)
    args = _cli_args(tiny_model_dir, ref_out / ref["root"])
    args += ["--out", str(out), "--limit", str(LIMIT), "--max-new-tokens", "4"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "predictions.jsonl" in err and "line 7" in err and "'text'" in err
