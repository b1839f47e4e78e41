"""Phantom generation speed: the issue asks for thousands of images in seconds (numpy + pillow)."""

from __future__ import annotations

import shutil

import pytest
from medvqa.benchmarks.phantom import PhantomConfig, write_phantom


@pytest.mark.parametrize("size", [32, 64])
def test_write_2000_images(benchmark, tmp_path, size):
    config = PhantomConfig(train_images=2000, test_images=0, size=size)
    out = tmp_path / f"phantom{size}"

    def build():
        shutil.rmtree(out, ignore_errors=True)
        return write_phantom(out, config)

    summary = benchmark.pedantic(build, rounds=1, iterations=1)
    assert summary["splits"]["train"]["images"] == 2000
    assert summary["splits"]["train"]["samples"] == 2000 * 5
