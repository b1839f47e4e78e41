"""What a `medvqa` job pays besides its work (issue 15): garbage collection over the imported heap,
and trl's LM-head tiles sized for a vocabulary 240 times the tiny model's.

A sweep is ~45 short processes, each importing torch, transformers and trl; these tests pin the
choices that keep that cost down without changing what a job computes.
"""

from __future__ import annotations

import gc
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import pytest


def test_a_command_runs_with_rarer_full_collections_and_gives_the_thresholds_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import medvqa.commands.registries as registries
    from medvqa.cli import OLD_GENERATION_THRESHOLD, main

    seen: list[tuple[int, int, int]] = []
    monkeypatch.setattr(registries, "run", lambda args: seen.append(gc.get_threshold()) or 0)
    before = gc.get_threshold()
    assert main(["benchmarks"]) == 0
    assert seen and seen[0][:2] == before[:2] and seen[0][2] == OLD_GENERATION_THRESHOLD > before[2]
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

    def __init__(self, device: str, model: Any = None):
        self.args = SimpleNamespace(device=SimpleNamespace(type=device))
        self.model = model
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


def _model_with_vocabulary(vocab: int) -> Any:
    import torch

    head = SimpleNamespace(weight=torch.empty(vocab, 4))
    return SimpleNamespace(get_output_embeddings=lambda: head)


class _TileRecorder(_FakeTrainer):
    def train(self, resume_from_checkpoint: Any = None) -> str:
        import trl.trainer.utils as trl_utils

        self.tile_width = trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE
        return super().train(resume_from_checkpoint)


def test_trls_lm_head_tiles_are_as_wide_as_a_small_vocabulary_while_training(tmp_path) -> None:
    import trl.trainer.utils as trl_utils
    from medvqa.trainers.trl_run import run_trainer

    default = trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE  # the constant trl reads at every fused forward
    tiny = _TileRecorder("cpu", _model_with_vocabulary(136))
    run_trainer(tiny, tmp_path / "out")
    assert (tiny.tile_width, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE) == (136, default)  # put back after
    large = _TileRecorder("cpu", _model_with_vocabulary(default + 1))  # several tiles: trl's width
    run_trainer(large, tmp_path / "out")
    assert large.tile_width == default


def test_a_tile_as_wide_as_the_vocabulary_computes_the_same_bits() -> None:
    # log-probabilities, entropy, top-1 and both gradients, as trl's SFT head asks for them
    import torch
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as default

    gen = torch.Generator().manual_seed(0)
    hidden0, weight0 = torch.randn(300, 32, generator=gen), torch.randn(136, 32, generator=gen) * 0.1
    targets = torch.randint(0, 136, (300,), generator=gen)
    outs = []
    for width in (default, 136):
        hidden, weight = hidden0.clone().requires_grad_(), weight0.clone().requires_grad_()
        log_probs, entropy, _, _, top1 = ChunkedLogProbFunction.apply(
            hidden, weight, None, targets, 1.0, width, None, 1.0, ("log_probs", "entropy", "is_top1")
        )
        (-log_probs.sum() / 300).backward()
        outs.append([log_probs.detach(), entropy.detach(), top1, hidden.grad, weight.grad])
    assert all(torch.equal(a, b) for a, b in zip(*outs))
