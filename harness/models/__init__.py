"""Model specs → model adapters.

A model spec is `ADAPTER:TARGET[,key=value...]`, the adapter being a name in the `models`
registry (`hf`, `openai`, or a plug-in). A spec without a known prefix is a local path or hub id
for the `hf` adapter.

    hf:PATH_OR_ID[,adapter=DIR][,dtype=float32|bfloat16|float16|auto][,device=cpu|cuda:0][,trust_remote_code=1]
    openai:MODEL[@BASE_URL][,key_env=VAR][,concurrency=N]...

This module imports nothing heavy: the adapter's module is imported by `load_model`.
"""

from __future__ import annotations

from typing import Any

from medvqa.errors import BadInput
from medvqa.registry import models


def parse_model_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """`"hf:runs/x,adapter=a,dtype=bfloat16"` → `("hf", "runs/x", {"adapter": "a", "dtype": "bfloat16"})`.

    Options are the comma-separated `key=value` items after the target. A prefix that is not a
    registered adapter (e.g. a Windows drive, or no prefix at all) means `hf`.
    """
    spec = spec.strip()
    if not spec:
        raise BadInput("empty model spec", field="--model")
    adapter, sep, rest = spec.partition(":")
    if not sep or adapter not in models or (len(adapter) == 1 and rest.startswith("\\")):
        adapter, rest = "hf", spec
    items = rest.split(",")
    target = items[0].strip()
    options: dict[str, str] = {}
    for item in items[1:]:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise BadInput(
                f"model spec {spec!r}: option {item!r} is not key=value "
                "(e.g. hf:DIR,adapter=ADAPTER_DIR,dtype=bfloat16)",
                field="--model",
            )
        options[key] = value.strip()
    if not target:
        raise BadInput(f"model spec {spec!r} names no model", field="--model")
    return adapter, target, options


def load_model(spec: str, **overrides: Any) -> Any:
    """Instantiate the adapter named by `spec`; `overrides` (e.g. `device="cuda:1"`) win over options.

    Every adapter class is constructed as `Class(target, spec=spec, **options)`.
    """
    adapter, target, options = parse_model_spec(spec)
    cls = models.get(adapter)
    merged: dict[str, Any] = {**options, **{k: v for k, v in overrides.items() if v is not None}}
    try:
        return cls(target, spec=spec, **merged)
    except TypeError as exc:
        if "unexpected keyword" in str(exc):
            raise BadInput(f"model spec {spec!r}: {exc}", field="--model") from None
        raise


def spec_flag(value: Any) -> bool:
    """A boolean spec option: 1/true/yes/on → True, 0/false/no/off/empty → False."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise BadInput(f"expected a boolean (1/0, true/false), got {value!r}", field="--model")
