"""Shared test setup: never touch the network or a hub; build small data and models locally."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.pop("OPENAI_API_KEY", None)  # a test that needs a key sets a fake one for 127.0.0.1


# --- shared fixtures: a small Phantom and the tiny LLaVA on it (helper D; reused by F, G, H) ------

import pytest

PHANTOM_TEST_CONFIG = {"seed": 0, "train_images": 120, "test_images": 40, "size": 32}


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory: pytest.TempPathFactory):
    """A small Phantom folder: 120 train / 40 test images at 32 px (seed 0). Treat as read-only."""
    from medvqa.benchmarks.phantom import PhantomConfig, write_phantom

    root = tmp_path_factory.mktemp("phantom") / "phantom"
    write_phantom(root, PhantomConfig(**PHANTOM_TEST_CONFIG))
    return root


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, phantom_root):
    """`medvqa model init-tiny --preset phantom` (32 px, ~460k parameters, random init). Read-only."""
    from medvqa.models.tiny import init_tiny, preset_config

    out = tmp_path_factory.mktemp("tiny") / "tiny-llava"
    init_tiny(out, preset_config("phantom", seed=0))
    return out


@pytest.fixture(autouse=True)
def _restore_registries():
    """Every test gets the process-wide registries back as it found them (tests/_registries.py)."""
    from tests._registries import registry_snapshot

    with registry_snapshot():
        yield
