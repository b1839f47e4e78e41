"""Declared dependencies tell the truth: an ast scan of the code against pyproject.toml.

Every third-party module the package imports is a declared runtime dependency, every declared runtime
dependency is imported by the package, and everything the tests import is declared (runtime or the
`test` extra). Import names are mapped to distributions by the installed metadata
(`importlib.metadata.packages_distributions`), so `PIL` is Pillow and `yaml` is PyYAML.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("harness", "benchmarks", "trainers", "reports")
LOCAL = {"medvqa", "tests"}


def _name(requirement: str) -> str:
    """The normalised distribution name of a requirement string (PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.split(r"[\s<>=!~;\[]", requirement.strip(), maxsplit=1)[0]).lower()


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def imported_modules(folders: tuple[str, ...]) -> dict[str, set[str]]:
    """Top-level third-party modules imported anywhere under `folders` → the files importing them."""
    found: dict[str, set[str]] = {}
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in LOCAL:
                        found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def distributions(modules: dict[str, set[str]]) -> dict[str, set[str]]:
    """Distribution name → files, for the imported modules (a module no installed dist provides is kept)."""
    mapping = packages_distributions()
    out: dict[str, set[str]] = {}
    for module, files in modules.items():
        for dist in mapping.get(module, [module]):
            out.setdefault(_name(dist), set()).update(files)
    return out


def _feature_extras(project: dict) -> set[str]:
    """Distributions of the optional features (e.g. `slurm`), imported only when the feature is used."""
    extras = project.get("optional-dependencies", {})
    return {_name(r) for name, reqs in extras.items() if name not in ("test", "lint") for r in reqs}


def test_every_package_import_is_a_declared_dependency():
    project = _pyproject()["project"]
    declared = {_name(r) for r in project["dependencies"]} | _feature_extras(project)
    used = distributions(imported_modules(PACKAGE_DIRS))
    undeclared = {dist: sorted(files)[:3] for dist, files in used.items() if dist not in declared}
    assert not undeclared, (
        f"imported but not declared (runtime dependencies or a feature extra): {undeclared}"
    )


def test_every_declared_runtime_dependency_is_imported():
    declared = {_name(r) for r in _pyproject()["project"]["dependencies"]}
    used = set(distributions(imported_modules(PACKAGE_DIRS)))
    unused = sorted(declared - used)
    assert not unused, f"declared but never imported by the package (move to an extra or drop): {unused}"


def test_every_test_import_is_declared():
    project = _pyproject()["project"]
    declared = {_name(r) for r in project["dependencies"]}
    declared |= {_name(r) for r in project["optional-dependencies"]["test"]}
    used = distributions(imported_modules(("tests",)))
    undeclared = {dist: sorted(files)[:3] for dist, files in used.items() if dist not in declared}
    assert not undeclared, f"tests import undeclared packages (add them to the test extra): {undeclared}"


def test_the_scan_sees_what_it_should(tmp_path):
    """The scanner itself: lazy imports inside functions count, relative and stdlib imports do not."""
    modules = imported_modules(("harness",))
    assert "torch" in modules  # imported lazily, inside functions only
    assert "json" not in modules and "medvqa" not in modules
    assert _name("Pillow>=10.0") == "pillow" and _name("huggingface_hub>=1.0") == "huggingface-hub"
    assert "pillow" in distributions({"PIL": {"x.py"}})
