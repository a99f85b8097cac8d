"""Dataclass fields as command-line options: one place for each option's name, type, default and help.

A command's settings are a typed dataclass whose fields are documented by the string literal
under each field (as litgpt does). :func:`add_dataclass_arguments` turns the fields into
``--field-name`` options, the docstring being the ``--help`` text and the dataclass default the
shown default; :func:`dataclass_from_args` reads them back, coercing each value to the field's
annotation (:func:`coerce`) and naming the option on a bad value. ``smpo train`` (whose five
sections are five dataclasses), ``smpo generate``, ``smpo cache``, ``smpo demo`` and
``smpo study`` all read their options this way.

Defaults are suppressed in the parser, so what :func:`dataclass_from_args` sees is only what the
user typed: a YAML recipe or another base can sit between the defaults and the command line.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import operator
import textwrap
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the key and its source."""


def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` of a dataclass, from the string literal after each field, or a
    trailing ``# comment`` on the field's line when there is no literal."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        lines = source.splitlines()
        body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
        for node, after in zip(body, body[1:] + [None]):
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            text = ""
            if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) \
                    and isinstance(after.value.value, str):
                text = after.value.value
            elif "#" in lines[node.lineno - 1]:
                text = lines[node.lineno - 1].split("#", 1)[1]
            docs[node.target.id] = " ".join(text.split())
    return docs


def field_types(cls: type) -> dict[str, Any]:
    """``{field: annotation}`` of a dataclass, with string annotations resolved."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def is_optional(tp: Any) -> tuple[bool, Any]:
    """``(True, T)`` for ``T | None``; ``(False, tp)`` otherwise."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return True, rest[0] if len(rest) == 1 else functools.reduce(operator.or_, rest)
    return False, tp


def _is_sequence(tp: Any) -> bool:
    return typing.get_origin(is_optional(tp)[1]) in (tuple, list)


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` to type ``tp`` (bool/int/float/str/Literal/Optional/tuple/list).

    A sequence is given as a list or as comma-separated text (``"0,1,2"``, spaces around the
    commas ignored); both may be mixed.
    """
    optional, inner = is_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{where}: null is not allowed")
    origin = typing.get_origin(inner)
    if origin is Literal:
        choices = typing.get_args(inner)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin in (tuple, list):
        item_tp = (typing.get_args(inner) or (Any,))[0]
        parts = [value] if isinstance(value, str) else list(value)
        items = [p.strip() if isinstance(part, str) else p for part in parts
                 for p in (part.split(",") if isinstance(part, str) else [part])]
        out = [coerce(v, item_tp, where) for v in items if v != ""]
        return tuple(out) if origin is tuple else out
    try:
        if inner is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "yes", "1", "on"):
                    return True
                if value.lower() in ("false", "no", "0", "off"):
                    return False
                raise ValueError(value)
            if isinstance(value, (bool, int)):
                return bool(value)
            raise ValueError(value)
        if inner is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if inner is float:
            return float(value)  # also parses YAML's "1e-8" string (YAML 1.1 wants "1.0e-8")
        if inner is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {value!r} is not a valid {getattr(inner, '__name__', inner)}") from None
    return value


def check_known(option: str, values: Sequence[str], known: Sequence[str]) -> None:
    """Raise :class:`ConfigError` naming ``option`` and the values of ``values`` not in ``known``
    (for a sequence option whose items have a fixed set of names)."""
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{option}: unknown {unknown}; choose from {', '.join(known)}")


def option_name(name: str) -> str:
    """``--field-name`` for the field ``field_name``."""
    return "--" + name.replace("_", "-")


def add_dataclass_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
                            dest_prefix: str = "", aliases: Mapping[str, Sequence[str]] | None = None,
                            choices: Mapping[str, Sequence[str]] | None = None,
                            exclude: Sequence[str] = (), positional: Sequence[str] = (),
                            metavars: bool = True) -> None:
    """One ``--field-name`` option per field of ``cls`` (``dest`` = ``dest_prefix + field``).

    Help is the field's docstring and its default; booleans are ``--x/--no-x``; a ``Literal`` or
    an entry of ``choices`` restricts the values; sequences take one or more values. A field
    without a default is a required option, or a positional argument when named in ``positional``.
    ``aliases``: extra spellings per field.
    """
    docs, defaults = field_docs(cls), {f.name: f for f in dataclasses.fields(cls)}
    for name, tp in field_types(cls).items():
        if name in exclude:
            continue
        spec = defaults[name]
        has_default = spec.default is not dataclasses.MISSING or spec.default_factory is not dataclasses.MISSING
        default = spec.default if spec.default is not dataclasses.MISSING else (
            spec.default_factory() if spec.default_factory is not dataclasses.MISSING else None)
        shown = "" if default is None or not has_default else f" (default: {_shown(default)})"
        help_text = f"{docs.get(name, '')}{shown}".strip().replace("%", "%%")
        _, inner = is_optional(tp)
        kwargs: dict[str, Any] = dict(default=argparse.SUPPRESS, help=help_text, dest=dest_prefix + name)
        if not has_default:
            kwargs["required"] = True
        if name in positional:
            parser.add_argument(dest_prefix + name, help=help_text)
            continue
        names = [option_name(name), *(aliases or {}).get(name, ())]
        allowed = (choices or {}).get(name)
        if inner is bool:
            parser.add_argument(*names, action=argparse.BooleanOptionalAction, **kwargs)
        elif allowed is not None or typing.get_origin(inner) is Literal:
            parser.add_argument(*names, choices=list(allowed if allowed is not None else typing.get_args(inner)),
                                **kwargs)
        elif _is_sequence(tp):
            parser.add_argument(*names, nargs="+", metavar=name.upper() if metavars else None, **kwargs)
        else:
            parser.add_argument(*names, metavar=name.upper() if metavars else None, **kwargs)


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def overrides_from_args(args: argparse.Namespace, cls: type, *, dest_prefix: str = "") -> dict[str, Any]:
    """The fields of ``cls`` the user gave on the command line (raw, not yet coerced)."""
    names = {f.name for f in dataclasses.fields(cls)}
    given = vars(args)
    return {name: given[dest_prefix + name] for name in names if dest_prefix + name in given}


def apply_overrides(base: Any, values: Mapping[str, Any], *, source: str,
                    choices: Mapping[str, Sequence[str]] | None = None, section: str = "") -> Any:
    """A copy of the dataclass ``base`` with ``values`` coerced to each field's type; an unknown
    field or a bad value raises :class:`ConfigError` naming it (``section.field``) and ``source``."""
    types_ = field_types(type(base))
    updated: dict[str, Any] = {}
    for key, value in values.items():
        label = f"{section}.{key}" if section else key
        if key not in types_:
            where = f" of {section}" if section else ""
            shown = f"{section}.{key!r}" if section else repr(key)
            raise ConfigError(f"unknown key {shown} in {source}; valid keys{where}: {', '.join(types_)}")
        where = f"{source}: {label}"
        coerced = coerce(value, types_[key], where)
        allowed = (choices or {}).get(key)
        if allowed is not None and coerced is not None and coerced not in allowed:
            raise ConfigError(f"{where}: {coerced!r} is not one of {', '.join(map(str, allowed))}")
        updated[key] = coerced
    return dataclasses.replace(base, **updated)


def dataclass_from_args(cls: type, args: argparse.Namespace, *, dest_prefix: str = "", base: Any = None,
                        choices: Mapping[str, Sequence[str]] | None = None) -> Any:
    """``base`` (default: ``cls`` built from the required options) overlaid with the options given."""
    given = overrides_from_args(args, cls, dest_prefix=dest_prefix)
    if base is None:
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        types_ = field_types(cls)
        base = cls(**{n: coerce(given[n], types_[n], option_name(n)) for n in required})
    return apply_overrides(base, given, source="the command line", choices=choices)
