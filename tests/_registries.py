"""Process-wide registries, put back as they were: a test that registers a benchmark, trainer,
expert, model adapter or prompt policy leaves no entry behind for the tests that run after it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def registry_snapshot() -> Iterator[None]:
    """Snapshot every `medvqa.registry.Registry` instance and the prompt policies; restore on exit."""
    from medvqa import prompts, registry

    regs = [r for r in vars(registry).values() if isinstance(r, registry.Registry)]
    saved = [(r, dict(r._targets), r._plugins_loaded) for r in regs]
    policies = dict(prompts._POLICIES)
    try:
        yield
    finally:
        for reg, targets, loaded in saved:
            reg._targets.clear()
            reg._targets.update(targets)
            reg._plugins_loaded = loaded
        prompts._POLICIES.clear()
        prompts._POLICIES.update(policies)
