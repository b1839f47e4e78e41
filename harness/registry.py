"""Name → class registries, with lazy built-ins and entry-point plug-ins.

Modelled on lm-evaluation-harness's registry: one generic `Registry`, one instance per kind.
Built-ins are declared as "module:attr" strings so that listing names (or `medvqa --help`)
imports nothing heavy; the module is imported on first `get`, and its `@registry.register`
decorator then replaces the string with the class. Third-party packages add entries through the
entry-point groups `medvqa.benchmarks`, `medvqa.trainers`, `medvqa.experts`, `medvqa.models`.

A registry with a `base` accepts only subclasses of it (lm-eval checks its models against `LM`
the same way): a benchmark that is not a `Benchmark` is refused where it is registered, so callers
can rely on the base class's contract instead of probing with `getattr`. A name declared lazily
("module:attr") can only be taken by that target: another class registering the name is an error,
not a silent replacement.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from medvqa.errors import BadInput

T = TypeVar("T")


def _is_target(obj: Any, target: str) -> bool:
    """Whether `obj` is what the lazy `"module:attr"` names (defined in that module or a submodule)."""
    module_name, _, attr = target.partition(":")
    module = getattr(obj, "__module__", None) or ""
    in_module = module == module_name or module.startswith(module_name + ".")
    return in_module and (not attr or getattr(obj, "__name__", None) == attr)


class Registry(Generic[T]):
    def __init__(
        self,
        kind: str,
        entry_point_group: str,
        builtins: dict[str, str] | None = None,
        *,
        base: type | str | None = None,
    ):
        """`base`: the class every entry must subclass, or its "module:attr" (imported on first check)."""
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._targets: dict[str, T | str] = dict(builtins or {})
        self._plugins_loaded = False
        self._base = base

    def _base_class(self) -> type | None:
        if isinstance(self._base, str):
            module_name, _, attr = self._base.partition(":")
            self._base = getattr(importlib.import_module(module_name), attr)
        return self._base

    def _problem(self, name: str, obj: Any) -> str | None:
        base = self._base_class()
        if base is None or (isinstance(obj, type) and issubclass(obj, base)):
            return None
        shown = getattr(obj, "__qualname__", repr(obj))
        return f"{self.kind} {name!r}: {shown} is not a subclass of {base.__module__}.{base.__qualname__}"

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: `@benchmarks.register("vqa-rad")` on a class (or factory)."""

        def decorate(obj: T) -> T:
            current = self._targets.get(name)
            if isinstance(current, str) and not _is_target(obj, current):
                shown = f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', obj)}"
                raise ValueError(
                    f"{self.kind} {name!r} is declared as {current!r}; {shown} may not replace it "
                    "(register it under another name)"
                )
            if current is not None and not isinstance(current, str) and current is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered to {current!r}")
            problem = self._problem(name, obj)
            if problem is not None:
                raise TypeError(problem)
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
            if isinstance(resolved, str):  # not registered by a decorator (e.g. an entry-point plug-in)
                problem = self._problem(name, obj)
                if problem is not None:
                    raise BadInput(f"{problem} (from {target!r})")
                self._targets[name] = obj
            target = self._targets[name]
        return target  # type: ignore[return-value]

    def describe(self, name: str) -> str:
        """First line of the target's docstring (imports the module: use for listing only)."""
        doc = getattr(self.get(name), "__doc__", None) or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""


benchmarks: Registry[Any] = Registry(
    "benchmark",
    "medvqa.benchmarks",
    base="medvqa.types:Benchmark",
    builtins={
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
    base="medvqa.trainers.base:TrainerPlugin",
    builtins={
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
        "noisy-phantom": "medvqa.trainers.experts.noisy:NoisyPhantomExpert",
        "model": "medvqa.trainers.experts.model:ModelExpert",
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
