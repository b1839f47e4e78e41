"""The layering of docs/architecture.md, checked: every import in the package points down a layer.

A static scan (ast), so function-local imports count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {
    "harness": "medvqa",
    "benchmarks": "medvqa.benchmarks",
    "trainers": "medvqa.trainers",
    "reports": "medvqa.reports",
}

# Lower number = lower layer. A module may import its own layer and the layers below it.
LAYERS: dict[str, int] = {
    "medvqa": 0,  # the core: types, errors, io, config, registry, scoring, prompts, safety, cache, ...
    "medvqa.benchmarks": 1,
    "medvqa.models": 1,
    "medvqa.trainers": 2,  # trainers use model adapters (stage-2 sampling, model judges) and benchmarks
    "medvqa.evaluate": 2,
    "medvqa.evaluation": 2,
    "medvqa.reports": 2,
    "medvqa.sweeps": 3,  # orchestrates trainers and evals as jobs, then the report
    "medvqa.commands": 4,
    "medvqa.cli": 4,
    "medvqa.__main__": 4,
}
# The one upward import, by design: a sweep job IS a command line, so the sweep checks every job's
# arguments with the CLI's own parser before any job runs (issue 11: fail before a week of GPU time).
UPWARD_ALLOWED = {("medvqa.sweeps", "medvqa.cli")}
# Same-layer imports that are one-way by design (the other direction would be a cycle).
SIDEWAYS = {
    ("medvqa.models", "medvqa.benchmarks"): False,
    ("medvqa.benchmarks", "medvqa.models"): False,
    ("medvqa.reports", "medvqa.trainers"): False,
    ("medvqa.reports", "medvqa.evaluation"): False,
    ("medvqa.reports", "medvqa.evaluate"): False,
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = [FOLDERS[rel.parts[0]], *rel.with_suffix("").parts[1:]]
    name = ".".join(parts)
    return name.removesuffix(".__init__")


def _part(module: str) -> str:
    """The longest LAYERS key that `module` is in."""
    best = ""
    for key in LAYERS:
        if (module == key or module.startswith(key + ".")) and len(key) > len(best):
            best = key
    return best


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, node.module)]
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names if node.module == "medvqa"]
    return [(line, m) for line, m in found if m == "medvqa" or m.startswith("medvqa.")]


def _violations() -> list[str]:
    bad = []
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            src = _part(_module_name(path))
            for line, target in _imports(path):
                dst = _part(target)
                if dst == src or not dst:
                    continue
                if (src, dst) in UPWARD_ALLOWED:
                    continue
                if LAYERS[dst] > LAYERS[src] or SIDEWAYS.get((src, dst)) is False:
                    bad.append(
                        f"{path.relative_to(ROOT)}:{line}: {src} (layer {LAYERS[src]}) imports {target}"
                    )
    return bad


def test_imports_point_down_the_layers() -> None:
    assert _violations() == []


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch) -> None:
    """The scan is not vacuous: an upward import planted in a copy of the core is reported."""
    fake = tmp_path / "harness"
    fake.mkdir()
    (fake / "scoring.py").write_text("def f():\n    from medvqa.reports.tables import build_table\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", tmp_path)
    for other in ("benchmarks", "trainers", "reports"):
        (tmp_path / other).mkdir()
    assert _violations() == ["harness/scoring.py:2: medvqa (layer 0) imports medvqa.reports.tables"]
