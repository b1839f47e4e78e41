"""Config dataclasses → CLI flags and TOML tables, written once (the trl way).

A trainer, expert or generator declares one dataclass; each field has a type, a default and
`metadata={"help": ...}`. `add_dataclass_arguments` derives the argparse flags from it,
`dataclass_from_args` builds the instance back, and `dataclass_from_mapping` validates a TOML
table against it (unknown keys and wrong types are BadInput naming the key).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from medvqa.errors import BadInput

C = TypeVar("C")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(the scalar type, whether None is allowed) for `int`, `int | None`, `Literal[...]`, `list[str]`..."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner, _ = _base_type(args[0]) if len(args) == 1 else (str, False)
        return inner, True
    return tp, False


@functools.cache
def _fields(cls: type) -> tuple[tuple[dataclasses.Field[Any], Any], ...]:
    """(field, resolved type) of each init field; cached: resolving string annotations is the slow
    part of building `medvqa --help` (every command adds its configs' flags)."""
    hints = typing.get_type_hints(cls)
    return tuple((f, hints[f.name]) for f in dataclasses.fields(cls) if f.init)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@functools.cache
def field_help(cls: type, name: str) -> str:
    """The help of field `name`: its own, else the nearest base class's.

    A subclass that only changes a default (`learning_rate: float = 1e-3`) writes no metadata; the
    help written once on the base class still describes the field.
    """
    for klass in cls.__mro__:
        if not dataclasses.is_dataclass(klass):
            continue
        own = {f.name: f for f in dataclasses.fields(klass)}
        if name in own and own[name].metadata.get("help"):
            return str(own[name].metadata["help"])
    return ""


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _parse_mapping(text: str) -> dict[str, str]:
    """`"a=1,b=x"` → `{"a": "1", "b": "x"}` (a dict field on the command line)."""
    out: dict[str, str] = {}
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE[,KEY=VALUE...], got {text!r}")
        out[key.strip()] = value.strip()
    return out


class _IntoDict(argparse.Action):
    """Stores a flag's value as `namespace.<dest>[key]` (one dict for a nested config's flags)."""

    def __init__(self, option_strings: list[str], dest: str, *, key: str, **kwargs: Any):
        super().__init__(option_strings, dest, **kwargs)
        self.key = key

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        bucket = dict(getattr(namespace, self.dest, None) or {})
        bucket[self.key] = not str(option_string).startswith("--no-") if self.nargs == 0 else values
        setattr(namespace, self.dest, bucket)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, plus `--flag_name` accepted wherever `--flag-name` is defined (what trl users type).

    Sub-parsers made with `add_subparsers().add_parser` are of the same class, so every command gets it.
    """

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:  # type: ignore[override]
        import sys

        argv = list(sys.argv[1:] if args is None else args)
        known = self._option_string_actions
        for i, token in enumerate(argv):
            if token == "--":
                break
            if token.startswith("--") and "_" in token:
                name, sep, value = token.partition("=")
                dashed = name.replace("_", "-")
                if name not in known and dashed in known:
                    argv[i] = dashed + sep + value
        return super().parse_known_args(argv, namespace)


def add_dataclass_arguments(
    parser: argparse.ArgumentParser | Any,
    *classes: type,
    prefix: str = "",
    dest_prefix: str | None = None,
    title: str | None = None,
    description: str | None = None,
    show_defaults: bool = True,
    into: str | None = None,
) -> list[str]:
    """Add one flag per field of the dataclasses (a field several of them share, once).

    Defaults are left to the dataclass (argparse default None), so `dataclass_from_args` can tell a
    flag that was given from one that was not. `prefix` goes in front of flag and dest
    (`prefix="expert-"`: `--expert-seed`); `dest_prefix`, when given, in front of the dest only.
    `show_defaults=False` where the effective default is not the field's (e.g. a preset sets it).

    `into="dest"`: the flags of a nested config (a plug-in's own dataclass, e.g. the chosen
    expert's) — each given flag is stored under its field name in one dict `args.dest` (None when
    none is given), to be checked against the plug-in's class once it is known
    (`dataclass_from_mapping`); a flag the parser already has is left to it. Returns the field
    names added.
    """
    if title is not None:
        group = parser.add_argument_group(title, description)
    elif prefix:
        group = parser.add_argument_group(f"{classes[0].__name__} ({prefix})")
    else:
        group = parser
    dest_prefix = prefix if dest_prefix is None else dest_prefix
    added: list[str] = []
    helps: dict[str, dict[str, str]] = {}  # field → {class: help}: a field several classes share
    for cls in classes:
        for f, _ in _fields(cls):
            helps.setdefault(f.name, {}).setdefault(cls.__name__, field_help(cls, f.name))
    for cls in classes:
        for f, tp in _fields(cls):
            if f.name in added:
                continue
            added.append(f.name)
            base, _ = _base_type(tp)
            help_text = field_help(cls, f.name)
            if len(set(helps[f.name].values())) > 1:  # say what it means for each of them
                owners: dict[str, list[str]] = {}
                for owner, text in helps[f.name].items():
                    owners.setdefault(text, []).append(owner)
                help_text = "; ".join(f"{', '.join(who)}: {text}" for text, who in owners.items() if text)
            if show_defaults and "(default" not in help_text:  # a help that states its default says it once
                default = _default(f)
                help_text = f"{help_text} (default: {default})" if help_text else f"(default: {default})"
            help_text = help_text.replace("%", "%%")  # argparse formats help with %: "50%" must survive
            flag = _flag(prefix + f.name)
            kwargs: dict[str, Any] = {"dest": dest_prefix + f.name, "default": None, "help": help_text}
            if into is not None:
                if flag in getattr(parser, "_option_string_actions", {}):
                    added.pop()
                    continue
                kwargs.update(dest=into, action=_IntoDict, key=f.name)
            origin = typing.get_origin(base)
            if base is bool and into is not None:
                group.add_argument(flag, "--no-" + flag[2:], nargs=0, **kwargs)
            elif base is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            elif origin is typing.Literal:
                choices = typing.get_args(base)
                group.add_argument(flag, choices=choices, type=type(choices[0]), **kwargs)
            elif origin in (list, tuple):
                (item,) = typing.get_args(base)[:1]
                parse_list = lambda s, item=item: [item(x) for x in s.split(",") if x]  # noqa: E731
                group.add_argument(flag, type=parse_list, metavar=f.name.upper(), **kwargs)
            elif origin is dict:
                group.add_argument(flag, type=_parse_mapping, metavar="KEY=VALUE,...", **kwargs)
            else:
                scalar = base if base in (int, float, str) else str
                group.add_argument(flag, type=scalar, metavar=f.name.upper(), **kwargs)
    return added


def dataclass_from_args(
    cls: type[C], args: argparse.Namespace, *, prefix: str = "", base: C | None = None
) -> C:
    """Instance of `cls` from parsed flags; flags not given keep `base`'s values (or the defaults)."""
    values = dataclasses.asdict(base) if base is not None else {}  # type: ignore[call-overload]
    for f, _ in _fields(cls):
        given = getattr(args, prefix + f.name, None)
        if given is not None:
            values[f.name] = given
    return cls(**values)


def _is_a(value: Any, tp: Any) -> bool:
    """`value` fits the element type `tp` of a list or dict field (ints count as floats, bools as neither)."""
    if tp is Any:
        return True
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp) if isinstance(tp, type) else True


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _from_string(value: str, base: Any) -> Any:
    """A CLI string (`-O lang=zh`, `--benchmark-options max=3`) as the field's scalar type, if it parses."""
    if base is bool and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    if base in (int, float):
        try:
            return base(value)
        except ValueError:
            return value
    return value


def dataclass_from_mapping(
    cls: type[C],
    data: Mapping[str, Any],
    *,
    where: str = "config",
    what: str = "key",
    from_strings: bool = False,
) -> C:
    """Instance of `cls` from a TOML/JSON table, checking keys and scalar types.

    The one mapping → dataclass converter: `from_strings=True` also accepts the text a command line
    gives (`"true"`, `"3"`, `"0.5"`) for bool/int/float fields. `what` names a key in messages
    ("option" for benchmark options).
    """
    known = {f.name: tp for f, tp in _fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise BadInput(f"{where}: unknown {what}(s) {unknown}; known: {sorted(known) or 'none'}")
    values = {}
    for key, value in data.items():
        base, nullable = _base_type(known[key])
        if value is None and nullable:
            values[key] = None
            continue
        if from_strings and isinstance(value, str):
            value = _from_string(value, base)
        origin = typing.get_origin(base)
        ok = True
        if origin is typing.Literal:
            ok = value in typing.get_args(base)
            if not ok:
                choices = list(typing.get_args(base))
                raise BadInput(f"{where}: {what} {key!r} must be one of {choices}, got {value!r}")
        elif origin in (list, tuple):
            item = (typing.get_args(base) or (Any,))[0]
            ok = isinstance(value, list) and all(_is_a(v, item) for v in value)
            value = (tuple(value) if origin is tuple else list(value)) if ok else value
        elif origin is dict:
            key_tp, val_tp = typing.get_args(base) or (Any, Any)
            ok = isinstance(value, Mapping) and all(
                _is_a(k, key_tp) and _is_a(v, val_tp) for k, v in value.items()
            )
        elif base is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            value = float(value) if ok else value
        elif base in (int, str, bool):
            ok = isinstance(value, base) and not (base is int and isinstance(value, bool))
        if not ok:
            shown = getattr(base, "__name__", base)
            raise BadInput(f"{where}: {what} {key!r} must be {shown}, got {value!r}")
        values[key] = value
    return cls(**values)
