"""`medvqa benchmarks | trainers | experts | models`: what is registered (built-ins and plug-ins)."""

from __future__ import annotations

import argparse
import json

ORDER = 0
KINDS = {
    "benchmarks": "list the registered benchmarks",
    "trainers": "list the registered trainers",
    "experts": "list the registered experts (judges for self-training)",
    "models": "list the registered model adapters (the prefix of a model spec)",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    for kind, help_text in KINDS.items():
        p = sub.add_parser(kind, help=help_text, description=help_text)
        p.add_argument("--json", action="store_true", help="print a JSON object name → description")
        p.set_defaults(func=run, kind=kind)


def run(args: argparse.Namespace) -> int:
    from medvqa import registry

    reg = getattr(registry, args.kind)
    rows = {}
    for name in reg.names():
        try:
            rows[name] = reg.describe(name)
        except ImportError as exc:  # a plug-in whose module is broken: list it, say why
            rows[name] = f"(cannot import: {exc})"
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        width = max(map(len, rows), default=0)
        for name, desc in rows.items():
            print(f"{name:<{width}}  {desc}")
    return 0
