"""Name → class registries, with lazy built-ins and entry-point plug-ins.

Modelled on lm-evaluation-harness's registry: one generic `Registry`, one instance per kind.
Built-ins are declared as "module:attr" strings so that listing names (or `medvqa --help`)
imports nothing heavy; the module is imported on first `get`, and its `@registry.register`
decorator then replaces the string with the class. Third-party packages add entries through the
entry-point groups `medvqa.benchmarks`, `medvqa.trainers`, `medvqa.experts`, `medvqa.models`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from medvqa.errors import BadInput

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, entry_point_group: str, builtins: dict[str, str] | None = None):
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._targets: dict[str, T | str] = dict(builtins or {})
        self._plugins_loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: `@benchmarks.register("vqa-rad")` on a class (or factory)."""

        def decorate(obj: T) -> T:
            current = self._targets.get(name)
            if current is not None and not isinstance(current, str) and current is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered to {current!r}")
            self._targets[name] = obj
            return obj

        return decorate

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in entry_points(group=self.entry_point_group):
            self._targets.setdefault(ep.name, ep.value)

    def names(self) -> list[str]:
        self._load_plugins()
        return sorted(self._targets)

    def __contains__(self, name: str) -> bool:
        self._load_plugins()
        return name in self._targets

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str) -> T:
        """The registered object; an unknown name is a BadInput that lists the known ones."""
        self._load_plugins()
        if name not in self._targets:
            known = ", ".join(self.names()) or "(none)"
            raise BadInput(f"unknown {self.kind} {name!r}; known: {known}")
        target = self._targets[name]
        if isinstance(target, str):
            module_name, _, attr = target.partition(":")
            module = importlib.import_module(module_name)
            obj: Any = getattr(module, attr) if attr else module
            # The import normally ran the decorator; keep whatever it registered, else the attr.
            resolved = self._targets.get(name)
            self._targets[name] = obj if isinstance(resolved, str) else resolved
            target = self._targets[name]
        return target  # type: ignore[return-value]

    def describe(self, name: str) -> str:
        """First line of the target's docstring (imports the module: use for listing only)."""
        doc = getattr(self.get(name), "__doc__", None) or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""


benchmarks: Registry[Any] = Registry(
    "benchmark",
    "medvqa.benchmarks",
    {
        "vqa-rad": "medvqa.benchmarks.vqa_rad:VQARad",
        "slake": "medvqa.benchmarks.slake:Slake",
        "pathvqa": "medvqa.benchmarks.pathvqa:PathVQA",
        "llava-med-json": "medvqa.benchmarks.llava_med_json:LlavaMedJson",
        "phantom": "medvqa.benchmarks.phantom:Phantom",
    },
)

trainers: Registry[Any] = Registry(
    "trainer",
    "medvqa.trainers",
    {
        "align": "medvqa.trainers.align:AlignTrainer",
        "sft": "medvqa.trainers.sft:SFTTrainerPlugin",
        "stllava-med": "medvqa.trainers.stllava_med:STLLaVAMedTrainer",
    },
)

experts: Registry[Any] = Registry(
    "expert",
    "medvqa.experts",
    {
        "phantom": "medvqa.trainers.experts.phantom:PhantomExpert",
        "openai": "medvqa.trainers.experts.openai:OpenAIExpert",
        "reference": "medvqa.trainers.experts.reference:ReferenceExpert",
    },
)

models: Registry[Any] = Registry(
    "model adapter",
    "medvqa.models",
    {
        "hf": "medvqa.models.hf:HFModel",
        "openai": "medvqa.models.openai:OpenAIModel",
    },
)
