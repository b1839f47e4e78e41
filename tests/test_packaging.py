"""A wheel carries what the commands read at run time: `medvqa demo`'s presets and the cluster
configs are package data of `medvqa.configs`, found from an install that has no source tree."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHIPPED = [
    "medvqa/configs/phantom.toml",
    "medvqa/configs/phantom-full.toml",
    "medvqa/configs/phantom-smoke.toml",
    "medvqa/configs/real-gpu.toml",
    "medvqa/configs/slurm-zero3.toml",
    "medvqa/configs/accelerate/zero3-multinode.yaml",
    "medvqa/sweeps/executors/slurm.py",
]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel --no-deps` of a copy of the tree (the build must not write into the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(
        REPO,
        src,
        ignore=shutil.ignore_patterns(
            ".git", "runs", "build", "dist", ".tox", "*.egg-info", "__pycache__", ".*cache"
        ),
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return next((tmp / "dist").glob("medvqa_harness-*.whl"))


@pytest.mark.slow
def test_the_wheel_ships_the_configs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [n for n in SHIPPED if n not in names]
    assert not missing, missing
    assert not any(n.startswith(("harness/", "configs/", "reports/")) for n in names)  # one namespace


@pytest.mark.slow
def test_an_install_from_the_wheel_finds_the_demo_presets(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import medvqa; from medvqa.commands.demo import preset_config; "
        "print(medvqa.__file__); print(preset_config('default')); print(preset_config('smoke'))"
    )
    # -S: no site-packages, so not the editable install of the checkout; only the wheel's files
    proc = subprocess.run(
        [sys.executable, "-S", "-c", code],
        env={"PYTHONPATH": str(site)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    package, default, smoke = proc.stdout.split()
    for path in (package, default, smoke):
        assert Path(path).resolve().is_relative_to(site.resolve()), path
    assert Path(default).name == "phantom.toml" and Path(smoke).read_text().startswith("# The smoke preset")
