"""STLLaVA-Med's stage cache (`stage_cache`): stage 1, questions and answers paid once by the runs
that share them, never reused by a run they do not belong to.

- The key: every config field outside `AFTER_ANSWERS` changes it (so a field added later does too),
  and so do the seed, the fraction, the base model's files, the labeled samples, the pool and the
  rank count; the judge's, the pairs' and DPO's fields do not.
- Real runs on the tiny LLaVA: a second run with another judge reuses the entry (no stage-1
  training, no sampling, the entry's bytes untouched); a run without the cache writes the same
  final weights; a run killed mid-questions is finished by the next one inside the entry; two
  processes started together compute once (the second waits for the first's lock).
- The demo config: both STLLaVA-Med lines share `{out}/stage-cache`, a reserved run-folder name,
  and the job keys still do not depend on where the run folder lives.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
from medvqa.distributed import Dist
from medvqa.errors import BadInput
from medvqa.fractions import fraction_request
from medvqa.io import output_lock, read_json, read_jsonl

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def train_samples(phantom_root):
    from medvqa.benchmarks.phantom import Phantom

    return Phantom().load("train", Path(phantom_root))


def _cfg(**over):
    from medvqa.trainers.stllava_med import STLLaVAMedTrainer

    small = {
        "max_steps": 150,  # a stage 1 that asks parseable questions (~50% at T 0.7)
        "question_temperature": 0.7,
        "k_questions": 2,
        "n_answers": 4,
        "max_unlabeled_images": 16,
        "generation_batch_size": 16,
        "question_max_new_tokens": 12,
        "answer_max_new_tokens": 6,
        "dpo_max_steps": 4,
        "dpo_batch_size": 8,
        "logging_steps": 20,
        "pair_min_margin": 0.0,
    }
    return dataclasses.replace(STLLaVAMedTrainer.make_config("phantom"), **{**small, **over})


def _request(samples, model_dir, out, cfg, *, seed=0, fraction=0.5):
    return fraction_request(samples, fraction, seed, base_model=f"hf:{model_dir}", out_dir=out, config=cfg)


def _key(request, cfg, dist=None):
    from medvqa.trainers.stllava_med.questions import unlabeled_pool
    from medvqa.trainers.stllava_med.stagecache import cache_key, key_inputs

    images = unlabeled_pool(request.unlabeled_images, cfg, request.seed)
    return cache_key(key_inputs(request, cfg, images, dist or Dist()))


# --- the key ---------------------------------------------------------------------------------


def _other_value(f: dataclasses.Field, value: typing.Any) -> typing.Any:
    """A valid value of a config field other than `value`."""
    choices = typing.get_args(f.type if not isinstance(f.type, str) else eval(f.type, vars(typing)))
    if choices and all(isinstance(c, str) for c in choices):
        return next(c for c in choices if c != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 2  # -1 (no limit) -> 1
    if isinstance(value, float):
        return value / 2 if value else 0.5
    if isinstance(value, str):
        return {"lr_scheduler_type": "linear", "dpo_lr_scheduler_type": "linear", "report_to": "tensorboard",
                "attn_implementation": "eager", "prompt_policy": "plain"}.get(f.name, value + " x")  # fmt: skip
    raise AssertionError(f"no other value for {f.name}={value!r}")


def test_every_field_but_the_after_answers_ones_is_in_the_key(tiny_model_dir, train_samples, tmp_path):
    from medvqa.trainers.stllava_med import STLLaVAMedConfig
    from medvqa.trainers.stllava_med.stagecache import AFTER_ANSWERS

    fields = {f.name: f for f in dataclasses.fields(STLLaVAMedConfig)}
    assert set(fields) >= AFTER_ANSWERS  # a misspelt exclusion would silently stay in the key
    cfg = _cfg()
    base = _key(_request(train_samples, tiny_model_dir, tmp_path, cfg), cfg)
    for name, f in fields.items():
        if name in ("expert", "expert_options", "answering_model"):  # below (they need other fields)
            continue
        other = dataclasses.replace(cfg, **{name: _other_value(f, getattr(cfg, name))})
        key = _key(_request(train_samples, tiny_model_dir, tmp_path, other), other)
        assert (key == base) == (name in AFTER_ANSWERS), name
    judge = dataclasses.replace(cfg, expert="noisy-phantom", expert_options={"error_rate": 0.2})
    assert _key(_request(train_samples, tiny_model_dir, tmp_path, judge), judge) == base


def test_seed_fraction_base_model_data_and_ranks_are_in_the_key(tiny_model_dir, train_samples, tmp_path):
    import shutil

    cfg = _cfg()
    request = _request(train_samples, tiny_model_dir, tmp_path / "a", cfg)
    base = _key(request, cfg)
    assert _key(_request(train_samples, tiny_model_dir, tmp_path / "b", cfg), cfg) == base  # not the out dir
    assert _key(_request(train_samples, tiny_model_dir, tmp_path, cfg, seed=1), cfg) != base
    assert _key(_request(train_samples, tiny_model_dir, tmp_path, cfg, fraction=0.25), cfg) != base
    assert _key(request, cfg, Dist(rank=0, world=2)) != base  # stage 1 trains data-parallel
    # the labeled samples' content (same ids, so the same manifest hash) and the pool
    edited = [
        dataclasses.replace(s, answer="no") if i == 0 else s for i, s in enumerate(request.train_samples)
    ]
    assert _key(dataclasses.replace(request, train_samples=edited), cfg) != base
    whole_pool = _cfg(max_unlabeled_images=0)
    fewer = dataclasses.replace(request, unlabeled_images=request.unlabeled_images[1:])
    assert _key(fewer, whole_pool) != _key(request, whole_pool)
    # the base model's files, not only its spec: the same folder with other weights misses
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    moved = _request(train_samples, copy, tmp_path, cfg)
    before = _key(moved, cfg)
    separate = _cfg(sq_schedule="separate")
    adopted = dataclasses.replace(separate, answering_model=str(copy))  # an SFT checkpoint's folder
    assert _key(request, adopted) != _key(request, separate)
    adopted_before = _key(request, adopted)
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert _key(moved, cfg) != before
    assert _key(request, adopted) != adopted_before  # a retrained answering model misses too


def test_only_the_main_rank_locks_and_a_held_entry_times_out(tiny_model_dir, train_samples, tmp_path):
    """Rank 1 never blocks on the lock (it would leave rank 0 alone at a barrier); rank 0 waits at
    most `dist_timeout_s` for another process's hold, then says so."""
    from medvqa.trainers.stllava_med.questions import unlabeled_pool
    from medvqa.trainers.stllava_med.stagecache import open_entry

    cfg = _cfg(dist_timeout_s=1)
    request = _request(train_samples, tiny_model_dir, tmp_path / "out", cfg)
    images = unlabeled_pool(request.unlabeled_images, cfg, request.seed)
    entry_dir = tmp_path / "cache" / _key(request, cfg, Dist(rank=0, world=2))
    entry_dir.mkdir(parents=True)
    with output_lock(entry_dir):  # another process computing this entry
        started = time.monotonic()
        with open_entry(tmp_path / "cache", request, cfg, images, Dist(rank=1, world=2)) as entry:
            assert entry.dir == entry_dir and not entry.reused
        assert time.monotonic() - started < 5
        with (
            pytest.raises(BadInput, match="still, after 1 s"),
            open_entry(tmp_path / "cache", request, cfg, images, Dist(rank=0, world=2)),
        ):
            pass


# --- the demo config and the sweep -------------------------------------------------------------


def test_demo_lines_share_a_cache_in_a_reserved_folder_and_keys_stay_portable(tmp_path):
    from medvqa.layout import is_reserved
    from medvqa.registry import trainers
    from medvqa.sweeps import Sweep, load_config
    from medvqa.trainers.config import resolve_trainer_config
    from medvqa.trainers.stllava_med.stagecache import AFTER_ANSWERS

    plans = []
    for where in ("a", "b"):
        cfg, run_dir = load_config(REPO / "configs" / "phantom-full.toml", out=tmp_path / where / "run")
        lines = {t.label: t for t in cfg.trainers if t.name == "stllava-med"}
        assert set(lines) == {"stllava-med", "stllava-med-model-judge"}
        assert {t.config["stage_cache"] for t in lines.values()} == {str(run_dir / "stage-cache")}
        assert lines["stllava-med-model-judge"].priority < lines["stllava-med"].priority
        shared = [  # what the two lines' configs put in the key: the same, or they share nothing
            {k: v for k, v in dataclasses.asdict(c).items() if k not in AFTER_ANSWERS}
            for c in (resolve_trainer_config(trainers.get(t.name), preset=t.preset, settings=t.config)
                      for t in lines.values())
        ]  # fmt: skip
        assert shared[0] == shared[1]
        assert (lines["stllava-med"].fractions, lines["stllava-med"].seeds) == (
            lines["stllava-med-model-judge"].fractions,
            lines["stllava-med-model-judge"].seeds,
        )
        sweep = Sweep(cfg, run_dir)
        jobs = {j.id: j for j in sweep.jobs(with_manifests=False)}
        settings = [t for p, t in sweep.planner.files.items() if "stllava-med__" in p.name]
        assert settings and all(str(run_dir / "stage-cache") in t for t in settings)  # `{out}` substituted
        plans.append({i: j.key for i, j in jobs.items()})
    assert is_reserved("stage-cache")  # the report never reads it as a trainer line
    assert plans[0] == plans[1]  # a moved run keeps its finished jobs though the settings name the folder


# --- real runs ---------------------------------------------------------------------------------


def _train(request):
    from medvqa.trainers.stllava_med import STLLaVAMedTrainer

    return STLLaVAMedTrainer().train(request)


def _files(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _log_stages(out: Path) -> set[str]:
    return {r.get("stage") for r in read_jsonl(out / "train_log.jsonl")}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_model_dir, train_samples):
    """The oracle-judged run that computes the entry."""
    tmp = tmp_path_factory.mktemp("stage-cache")
    cfg = _cfg(stage_cache=str(tmp / "cache"))
    checkpoint = _train(_request(train_samples, tiny_model_dir, tmp / "oracle", cfg))
    return checkpoint, tmp


@pytest.mark.slow
def test_a_run_with_another_judge_reuses_the_entry(first_run, tiny_model_dir, train_samples, monkeypatch):
    from medvqa.trainers.stllava_med import trainer

    first, tmp = first_run
    record = first.meta["stage_cache"]
    assert {record[k] for k in ("stage1", "questions", "answers")} == {"computed"}
    entry = Path(record["dir"])
    assert entry.parent == tmp / "cache" and entry.name == record["key"]
    assert (entry / "complete.json").is_file() and (entry / "stage1" / "checkpoint.json").is_file()
    assert {"stage1", "questions", "answers"} <= _log_stages(first.path)
    stages = first.path / "stages"
    assert not (stages / "stage1").exists() and not (stages / "questions.jsonl").exists()
    assert (stages / "judged.jsonl").is_file() and (stages / "pairs.jsonl").is_file()
    assert first.meta["stage1"] == str(entry / "stage1") == first.meta["dpo"]["reference"]  # DPO's reference
    before = _files(entry)

    def never(*args, **kwargs):
        raise AssertionError("a reused entry trains and samples nothing")

    monkeypatch.setattr(trainer, "train_stage1", never)
    monkeypatch.setattr(trainer, "load_generator", never)
    cfg = _cfg(
        stage_cache=str(tmp / "cache"),
        expert="noisy-phantom",
        expert_options={"error_rate": 0.2},
        tie_policy="second",
        dpo_learning_rate=1e-4,
        logging_steps=10,
    )
    second = _train(_request(train_samples, tiny_model_dir, tmp / "noisy", cfg))
    assert second.meta["stage_cache"] == {
        **record,
        "stage1": "reused",
        "questions": "reused",
        "answers": "reused",
    }
    assert not {"stage1", "questions", "answers"} & _log_stages(second.path)  # no stage-1 steps logged
    assert _files(entry) == before  # a complete entry is never written again (bytes and mtimes)
    answers = read_jsonl(entry / "answers.jsonl")
    judged = read_jsonl(second.path / "stages" / "judged.jsonl")
    assert [(r["id"], r["answers"]) for r in judged] == [(r["id"], r["answers"]) for r in answers]
    for k in ("images", "questions", "distinct_questions", "answered"):
        assert second.meta["counts"][k] == first.meta["counts"][k]
    assert second.meta["counts"]["judge"] != first.meta["counts"]["judge"]  # the judge did change


@pytest.mark.slow
def test_the_cache_changes_no_byte_of_the_result(first_run, tiny_model_dir, train_samples, tmp_path):
    """Without the cache (and at other logging steps, a field outside the key): the same weights,
    stage-1 model, questions, answers, judgments and pairs."""
    first, _ = first_run
    entry = Path(first.meta["stage_cache"]["dir"])
    plain = _train(_request(train_samples, tiny_model_dir, tmp_path / "plain", _cfg(logging_steps=7)))
    assert "stage_cache" not in plain.meta
    stages = plain.path / "stages"
    for name in ("questions.jsonl", "answers.jsonl"):
        assert (stages / name).read_bytes() == (entry / name).read_bytes(), name
    for name in ("judged.jsonl", "pairs.jsonl"):
        assert (stages / name).read_bytes() == (first.path / "stages" / name).read_bytes(), name
    weights = sorted(p.name for p in first.path.glob("*.safetensors"))
    assert weights and weights == sorted(p.name for p in plain.path.glob("*.safetensors"))
    for name in weights:
        assert (plain.path / name).read_bytes() == (first.path / name).read_bytes(), name
        assert (stages / "stage1" / name).read_bytes() == (entry / "stage1" / name).read_bytes(), name


class _Killed(RuntimeError):
    pass


@pytest.mark.slow
def test_a_killed_entry_is_finished_by_the_next_run(
    first_run, tiny_model_dir, train_samples, tmp_path, monkeypatch
):
    from medvqa.trainers.stllava_med import trainer

    first, _ = first_run
    done = Path(first.meta["stage_cache"]["dir"])
    real = trainer.load_generator

    class Dies:
        def __init__(self, inner):
            self.inner, self.processor, self.calls = inner, inner.processor, 0

        def generate(self, requests, settings):
            if self.calls >= 1:
                raise _Killed("killed mid-questions")
            self.calls += 1
            return self.inner.generate(requests, settings)

    cfg = _cfg(stage_cache=str(tmp_path / "cache"))
    with monkeypatch.context() as mp:
        mp.setattr(trainer, "load_generator", lambda spec: Dies(real(spec)))
        with pytest.raises(_Killed):
            _train(_request(train_samples, tiny_model_dir, tmp_path / "killed", cfg))
    entry = tmp_path / "cache" / done.name  # the same key: the cache's folder is not part of it
    assert (entry / "stage1" / "checkpoint.json").is_file() and not (entry / "complete.json").exists()
    assert 0 < len(read_jsonl(entry / "questions.jsonl")) < len(read_jsonl(done / "questions.jsonl"))
    monkeypatch.setattr("medvqa.trainers.trl_run.fit_sft", lambda *a, **k: pytest.fail("stage 1 was done"))
    resumed = _train(_request(train_samples, tiny_model_dir, tmp_path / "next", cfg))
    record = resumed.meta["stage_cache"]
    assert (record["stage1"], record["questions"], record["answers"]) == ("reused", "computed", "computed")
    for name in ("questions.jsonl", "answers.jsonl", "stage1/model.safetensors"):
        assert (entry / name).read_bytes() == (done / name).read_bytes(), name
    assert (entry / "complete.json").is_file()


def _train_cli(tiny_model_dir: Path, root: Path, out: Path, cache: Path, expert: str) -> list[str]:
    cfg = _cfg()
    flags = {k: getattr(cfg, k) for k in ("max_steps", "k_questions", "n_answers", "max_unlabeled_images",
                                            "generation_batch_size", "question_max_new_tokens",
                                            "answer_max_new_tokens", "dpo_max_steps", "dpo_batch_size")}  # fmt: skip
    args = [sys.executable, "-m", "medvqa", "train", "--trainer", "stllava-med", "--model", f"hf:{tiny_model_dir}",
            "--benchmark", "phantom", "--root", str(root), "--fraction", "0.5", "--seed", "0", "--out", str(out),
            "--preset", "phantom", "--threads", "1", "--stage-cache", str(cache), "--expert", expert,
            "--pair-min-margin", "0"]  # fmt: skip
    for k, v in flags.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def _wait_for(what: str, ok: typing.Callable[[], bool], procs: list[subprocess.Popen], timeout: float = 240):
    deadline = time.monotonic() + timeout
    while not ok():
        for p in procs:
            assert p.poll() is None, f"exited ({p.returncode}) while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.slow
def test_two_processes_with_one_key_compute_once(tiny_model_dir, phantom_root, tmp_path):
    """The first process holds the entry (stopped, SIGSTOP, while it computes); the second starts,
    waits for the lock, and reuses the entry once the first finishes it."""
    cache = tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = {n: open(tmp_path / f"{n}.log", "w") for n in ("first", "second")}  # noqa: SIM115
    first = subprocess.Popen(_train_cli(tiny_model_dir, phantom_root, tmp_path / "a", cache, "phantom"),
                             env=env, stdout=logs["first"], stderr=subprocess.STDOUT)  # fmt: skip
    procs = [first]
    try:

        def holds() -> bool:
            locks = list(cache.glob("*/.lock"))
            return bool(locks) and locks[0].read_text().strip() == str(first.pid)

        _wait_for("the first process to lock the entry", holds, procs)
        first.send_signal(signal.SIGSTOP)
        assert not list(cache.glob("*/complete.json"))
        second = subprocess.Popen(_train_cli(tiny_model_dir, phantom_root, tmp_path / "b", cache, "noisy-phantom"),
                                  env=env, stdout=logs["second"], stderr=subprocess.STDOUT)  # fmt: skip
        procs.append(second)
        waiting = f"stage cache: waiting for pid {first.pid}"
        _wait_for("the second to wait", lambda: waiting in (tmp_path / "second.log").read_text(), [second])
        first.send_signal(signal.SIGCONT)
        for p in procs:
            assert p.wait(timeout=600) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait()
        for fh in logs.values():
            fh.close()
    a, b = (read_json(tmp_path / n / "checkpoint.json")["stage_cache"] for n in ("a", "b"))
    assert a["key"] == b["key"] and len(list(cache.iterdir())) == 1
    assert {a[k] for k in ("stage1", "questions", "answers")} == {"computed"}
    assert {b[k] for k in ("stage1", "questions", "answers")} == {"reused"}
    assert "stage1" not in _log_stages(tmp_path / "b")
    key = json.loads((cache / a["key"] / "key.json").read_text())
    assert key["key"] == a["key"] and "expert" not in key["inputs"]["config"]


@pytest.mark.slow
def test_an_entry_edited_after_completion_is_refused(first_run, tiny_model_dir, train_samples, tmp_path):
    """A reuse checks the entry's files against the digests `complete.json` was written with."""
    import shutil

    from medvqa.trainers.stllava_med.questions import unlabeled_pool
    from medvqa.trainers.stllava_med.stagecache import open_entry

    first, _ = first_run
    done = Path(first.meta["stage_cache"]["dir"])
    cfg = _cfg(stage_cache=str(tmp_path / "cache"))
    request = _request(train_samples, tiny_model_dir, tmp_path / "out", cfg)
    images = unlabeled_pool(request.unlabeled_images, cfg, request.seed)
    for name in ("answers.jsonl", "stage1/model.safetensors"):
        entry = tmp_path / "cache" / done.name
        shutil.rmtree(entry, ignore_errors=True)
        shutil.copytree(done, entry)
        with open_entry(tmp_path / "cache", request, cfg, images, Dist()) as intact:
            assert intact.reused and intact.counts["questions"] == first.meta["counts"]["questions"]
        data = bytearray((entry / name).read_bytes())
        data[len(data) // 2] ^= 1
        (entry / name).write_bytes(bytes(data))
        with (
            pytest.raises(BadInput, match="changed after it was completed"),
            open_entry(tmp_path / "cache", request, cfg, images, Dist()),
        ):
            pass


@pytest.mark.slow
def test_a_separate_asker_samples_the_questions_and_is_part_of_the_entry(
    tiny_model_dir, train_samples, tmp_path, monkeypatch
):
    """`sq_schedule="separate"`: the asker samples the questions, the answering model the answers
    and DPO starts from it; the entry's digests cover the asker, so an edited asker is refused."""
    from medvqa.trainers.stllava_med import trainer
    from medvqa.trainers.stllava_med.questions import unlabeled_pool
    from medvqa.trainers.stllava_med.stagecache import open_entry

    loaded: list[str] = []
    real_load = trainer.load_generator
    monkeypatch.setattr(trainer, "load_generator", lambda spec: loaded.append(spec) or real_load(spec))
    cfg = _cfg(stage_cache=str(tmp_path / "cache"), sq_schedule="separate")
    request = _request(train_samples, tiny_model_dir, tmp_path / "out", cfg)
    checkpoint = _train(request)
    entry = Path(checkpoint.meta["stage_cache"]["dir"])
    assert loaded == [f"hf:{entry / 'stage1-asker'}", f"hf:{entry / 'stage1'}"]
    assert checkpoint.meta["stage1"] == str(entry / "stage1") == checkpoint.meta["dpo"]["reference"]
    assert {"stage1-asker", "stage1"} <= _log_stages(checkpoint.path)
    assert "stage1-asker" in read_json(entry / "complete.json")["digests"]

    weights = entry / "stage1-asker" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 1
    weights.write_bytes(bytes(data))
    images = unlabeled_pool(request.unlabeled_images, cfg, request.seed)
    with (
        pytest.raises(BadInput, match="changed after it was completed"),
        open_entry(tmp_path / "cache", request, cfg, images, Dist()),
    ):
        pass
