"""The registry keeps the contract: only subclasses of the base, no silent replacement of a lazy name,
and every built-in benchmark takes the whole `Benchmark` API (no caller needs getattr/inspect)."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
from medvqa.errors import BadInput
from medvqa.registry import Registry, benchmarks, trainers
from medvqa.types import Benchmark, SkippedRecord


def test_a_class_that_is_not_a_benchmark_is_refused() -> None:
    reg: Registry[type] = Registry("benchmark", "medvqa.test-none", base=Benchmark)
    with pytest.raises(
        TypeError, match=r"benchmark 'loose': .*NotABenchmark is not a subclass of medvqa\.types\.Benchmark"
    ):

        @reg.register("loose")
        class NotABenchmark:
            name = "loose"

    @reg.register("fine")
    class Fine(Benchmark):
        name = "fine"

    assert reg.get("fine") is Fine and "loose" not in reg


def test_a_lazy_target_that_is_not_a_benchmark_is_a_bad_input_naming_it() -> None:
    reg: Registry[object] = Registry("benchmark", "medvqa.test-none", {"odd": "json:loads"}, base=Benchmark)
    with pytest.raises(BadInput, match=r"benchmark 'odd': loads is not a subclass .* \(from 'json:loads'\)"):
        reg.get("odd")


def test_a_lazily_declared_name_is_not_silently_replaced() -> None:
    reg: Registry[type] = Registry(
        "benchmark", "medvqa.test-none", {"slake": "medvqa.benchmarks.slake:Slake"}, base=Benchmark
    )
    with pytest.raises(
        ValueError, match=r"benchmark 'slake' is declared as 'medvqa\.benchmarks\.slake:Slake'"
    ):

        @reg.register("slake")
        class MySlake(Benchmark):
            name = "slake"

    from medvqa.benchmarks.slake import Slake

    reg.register("slake")(Slake)  # the declared target itself takes its name
    assert reg.get("slake") is Slake


def test_the_global_registries_check_their_bases() -> None:
    with pytest.raises(TypeError, match=r"is not a subclass of medvqa\.types\.Benchmark"):
        benchmarks.register("test-not-a-benchmark")(dict)
    with pytest.raises(TypeError, match=r"is not a subclass of medvqa\.trainers\.base\.TrainerPlugin"):
        trainers.register("test-not-a-trainer")(dict)
    assert "test-not-a-benchmark" not in benchmarks and "test-not-a-trainer" not in trainers


@pytest.mark.parametrize("name", ["vqa-rad", "slake", "pathvqa", "llava-med-json", "phantom"])
def test_every_builtin_benchmark_keeps_the_declared_contract(name: str, tmp_path: Path) -> None:
    cls = benchmarks.get(name)
    assert issubclass(cls, Benchmark) and cls.name == name
    assert dataclasses.is_dataclass(cls.Options)
    load = inspect.signature(cls.load).parameters
    assert {"skip_bad", "check_images", "max_pixels"} <= set(load)
    assert list(inspect.signature(cls.closed_rule).parameters) == ["self", "root", "split"]
    assert list(inspect.signature(cls.detect_layout).parameters) == ["self", "root", "split"]
    bench = cls()
    assert bench.skipped == [] and isinstance(bench.prompt_policy, str)
    assert isinstance(bench.has_captions, bool)
    if not bench.has_captions:
        with pytest.raises(BadInput, match="has no captions"):
            bench.load_captions(tmp_path, "train")


def test_skipped_record_names_where_and_why() -> None:
    rec = SkippedRecord.from_error(
        BadInput("image not found", path="/d/test.json", record="#3", field="image")
    )
    assert str(rec) == "/d/test.json, record #3, field 'image': image not found"
    assert rec.to_json() == {
        "stage": "load",
        "error": str(rec),
        "path": "/d/test.json",
        "record": "#3",
        "field": "image",
    }


def test_the_tiny_tokenizer_corpus_is_a_benchmark_capability() -> None:
    """`model init-tiny --corpus phantom` asks the benchmark for its texts; no generic code names it."""
    from medvqa.benchmarks.phantom import corpus_texts
    from medvqa.models.tiny import corpus_texts as tiny_corpus

    assert benchmarks.get("phantom")().vocabulary() == corpus_texts()
    assert tiny_corpus("phantom")[: len(corpus_texts())] == corpus_texts()
    assert benchmarks.get("vqa-rad")().vocabulary() == []
    with pytest.raises(BadInput, match="benchmark 'vqa-rad' cannot list its texts"):
        tiny_corpus("vqa-rad")


def test_registry_snapshot_puts_back_what_a_test_registered() -> None:
    """The autouse fixture in conftest.py runs this around every test: nothing registered leaks."""
    from medvqa.prompts import PromptPolicy, policy_names, register_policy

    from tests._registries import registry_snapshot

    with registry_snapshot():

        @benchmarks.register("test-snapshot")
        class Snapshot(Benchmark):
            name = "test-snapshot"

        register_policy(PromptPolicy(name="test-snapshot", description="a leak, unless put back"))
        assert benchmarks.get("test-snapshot") is Snapshot and "test-snapshot" in policy_names()
    assert "test-snapshot" not in benchmarks and "test-snapshot" not in policy_names()
    with pytest.raises(BadInput, match="unknown benchmark 'test-snapshot'"):
        benchmarks.get("test-snapshot")
