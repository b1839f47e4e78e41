"""What one `medvqa` job pays besides its work: garbage collection over the imported heap (issue 15).

A sweep is ~45 short processes, each importing torch, transformers and trl; these tests pin the
choices that keep that fixed cost down without changing what a job computes.
"""

from __future__ import annotations

import gc
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import pytest


def test_a_command_runs_without_automatic_full_collections_and_gives_them_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import medvqa.commands.registries as registries
    from medvqa.cli import main

    seen: list[tuple[int, int, int]] = []
    monkeypatch.setattr(registries, "run", lambda args: seen.append(gc.get_threshold()) or 0)
    before = gc.get_threshold()
    assert main(["benchmarks"]) == 0
    assert seen and seen[0][:2] == before[:2] and seen[0][2] >= 1_000_000
    assert gc.get_threshold() == before


def test_the_medvqa_process_leaves_its_heap_frozen_for_the_exit() -> None:
    # atexit handlers run after exit_process froze the heap, and before the interpreter's teardown
    code = (
        "import atexit, gc, runpy, sys\n"
        "atexit.register(lambda: print('FROZEN', gc.get_freeze_count()))\n"
        "sys.argv = ['medvqa', '{cmd}', '--json']\n"
        "runpy.run_module('{module}', run_name='__main__')\n"
    )
    for module in ("medvqa", "medvqa.cli"):
        out = subprocess.run(
            [sys.executable, "-c", code.format(module=module, cmd="benchmarks")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert '"phantom"' in out
        frozen = int(out.split("FROZEN")[1])
        assert frozen > 10_000, (module, out[-200:])


class _FakeTrainer:
    """What `run_trainer` touches of a trl trainer; `train()` records the collector's state."""

    def __init__(self, device: str):
        self.args = SimpleNamespace(device=SimpleNamespace(type=device))
        self.state = SimpleNamespace(global_step=0)
        self.frozen_while_training = -1
        self.removed: list[Any] = []

    def remove_callback(self, callback: Any) -> None:
        self.removed.append(callback)

    def train(self, resume_from_checkpoint: Any = None) -> str:
        self.frozen_while_training = gc.get_freeze_count()
        self.state.global_step = 3
        return "done"


def test_training_on_cpu_skips_the_heap_built_before_it_then_hands_it_back(tmp_path) -> None:
    from medvqa.trainers.trl_run import run_trainer

    assert gc.get_freeze_count() == 0
    cpu = _FakeTrainer("cpu")
    assert run_trainer(cpu, tmp_path / "out") == "done"
    assert cpu.frozen_while_training > 10_000  # modules, samples, the model: skipped by free_memory()
    assert gc.get_freeze_count() == 0
    cuda = _FakeTrainer("cuda")  # there the full collection frees device memory held by dead cycles
    run_trainer(cuda, tmp_path / "out")
    assert cuda.frozen_while_training == 0 and gc.get_freeze_count() == 0


def test_a_training_that_fails_still_hands_the_heap_back(tmp_path) -> None:
    from medvqa.trainers.trl_run import run_trainer

    broken = _FakeTrainer("cpu")
    broken.train = lambda resume_from_checkpoint=None: 1 / 0  # type: ignore[method-assign]
    with pytest.raises(ZeroDivisionError):
        run_trainer(broken, tmp_path / "out")
    assert gc.get_freeze_count() == 0
