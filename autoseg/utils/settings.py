"""Typed settings: nested dataclasses built from plain data and checked against their type hints and allowed ranges.

Every problem raises :class:`ConfigError` with one line that names the key by its full path, where it came from and
what is allowed, e.g. ``configs/x.yaml: bboost.k_min: expected an integer >= 1, got 'six'``. Types are read from the
dataclasses' hints (so new fields are checked without more code); ranges are :class:`Rule` tables, one per dataclass.

A field whose metadata holds ``FLAT_OPTIONS`` (a function of the parent's raw data giving a dataclass type, or None)
collects the parent's keys that are not its own fields: they are built as that dataclass, written back flat by
:func:`to_dict` and reported under the parent's path (``segmenter.box_threshold``). The segmenter backends use it: each
backend has its own options, given beside the common segmenter settings.

Nothing here imports the rest of AutoSeg.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")
FLAT_OPTIONS = "flat_options"


class ConfigError(ValueError):
    """An invalid setting. The message is one line: ``SOURCE: KEY: what is allowed, got VALUE``.

    Attributes:
        key: dotted path of the bad setting (e.g. ``bboost.k_min``); empty when the problem is the whole file.
        source: where the value came from (a YAML path, "overrides", ...).
        problem: the message without its source and key.
    """

    def __init__(self, message: str, key: str = "", source: str = "", problem: str = ""):
        super().__init__(message)
        self.key = key
        self.source = source
        self.problem = problem or message


def config_error(key: str, problem: str, source: str = "config") -> ConfigError:
    """A :class:`ConfigError` whose message reads ``SOURCE: KEY: PROBLEM`` (on one line)."""
    problem = " ".join(problem.split())  # never more than one line
    return ConfigError(f"{source}: {key}: {problem}", key=key, source=source, problem=problem)


# ---------------------------------------------------------------------------------------------------- allowed ranges
@dataclass(frozen=True)
class Rule:
    """What a field allows beyond its type.

    Attributes:
        ok: ``ok(value, parent)``; only called on values of the right type (never on None).
        allowed: ``allowed(parent)`` says what is allowed, e.g. ">= 1" (after the type) or "one of [...]".
        replaces_type: ``allowed`` is the whole description (the type is not named before it).
    """

    ok: Callable[[Any, Any], bool]
    allowed: Callable[[Any], str]
    replaces_type: bool = False


Rules = Mapping[type, Mapping[str, Rule]]


def rule(ok: Callable[[Any], bool], allowed: str, replaces_type: bool = False) -> Rule:
    """A :class:`Rule` that looks at the value only."""
    return Rule(lambda v, _: ok(v), lambda _: allowed, replaces_type)


def at_least(lo: float) -> Rule:
    """Numbers ``>= lo``."""
    return rule(lambda v: v >= lo, f">= {lo}")


def above(lo: float) -> Rule:
    """Numbers ``> lo``."""
    return rule(lambda v: v > lo, f"> {lo}")


def between(lo: float, hi: float) -> Rule:
    """Numbers in ``[lo, hi]``."""
    return rule(lambda v: lo <= v <= hi, f"in [{lo}, {hi}]")


def one_of(choices: Iterable[Any]) -> Rule:
    """One of ``choices`` (the message lists them instead of the type)."""
    choices = tuple(choices)
    return rule(lambda v: v in choices, f"one of {list(choices)}", replaces_type=True)


NON_EMPTY = rule(lambda v: len(v) > 0, "(not empty)")


# ---------------------------------------------------------------------------------------------------- type checks
def _union_args(hint: Any) -> tuple[Any, ...]:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return typing.get_args(hint)
    return ()


def _is_tuple(hint: Any) -> bool:
    return typing.get_origin(hint) is tuple or any(typing.get_origin(a) is tuple for a in _union_args(hint))


def type_matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` has type ``hint`` as a config reads it: bool is not an int, an int is a float, NaN is not."""
    if _union_args(hint):
        return any(type_matches(value, a) for a in _union_args(hint))
    if hint is type(None) or hint is None:
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, tuple | list):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(type_matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(type_matches(v, a) for v, a in zip(value, args, strict=True))
    if typing.get_origin(hint) is typing.Literal:
        return value in typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, hint)
    return True  # a hint these configs do not use (Any): not checked here


def describe_type(hint: Any, plural: bool = False) -> str:
    """The type a config value needs, in words ("an integer", "a list of strings", "a number or null")."""
    if _union_args(hint):
        parts = [describe_type(a, plural) for a in _union_args(hint) if a is not type(None)]
        return " or ".join(parts + (["null"] if type(None) in _union_args(hint) else []))
    names = {int: ("an integer", "integers"), float: ("a number", "numbers"), str: ("a string", "strings")}
    if hint in names:
        return names[hint][plural]
    if hint is bool:
        return "true or false"
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {describe_type(args[0], plural=True)}"
        return f"a list of {len(args)}: [{', '.join(describe_type(a) for a in args)}]"
    if typing.get_origin(hint) is typing.Literal:
        return f"one of {list(typing.get_args(hint))}"
    if dataclasses.is_dataclass(hint):
        return f"a mapping of {hint.__name__} settings ({', '.join(f.name for f in dataclasses.fields(hint))})"
    return str(hint)


def show(value: Any, limit: int = 80) -> str:
    """A value as it appears in messages (tuples as lists), shortened to ``limit`` characters."""
    text = repr(list(value) if isinstance(value, tuple) else value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _flat_field(cls: type) -> dataclasses.Field | None:
    return next((f for f in dataclasses.fields(cls) if FLAT_OPTIONS in f.metadata), None)


def find_problem(config: Any, cls: type, rules: Rules, prefix: str = "") -> tuple[str, str] | None:
    """The first bad setting of dataclass instance ``config`` (checked as ``cls``), as ``(key, problem)``; or None.

    Types of all fields (recursively) are checked before any range, so a rule may compare fields of its parent.
    Flat options (see the module docstring) are checked as their own dataclass, under the parent's prefix.
    """
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    own_rules = rules.get(cls, {})
    flat = _flat_field(cls)
    for name in fields:
        value, hint, key = getattr(config, name), hints[name], f"{prefix}{name}"
        if flat is not None and name == flat.name:
            if dataclasses.is_dataclass(value):
                problem = find_problem(value, type(value), rules, prefix)
                if problem:
                    return problem
            continue
        if not type_matches(value, hint):
            return key, f"expected {_expected(hint, own_rules.get(name), config)}, got {show(value)}"
        if dataclasses.is_dataclass(hint):
            problem = find_problem(value, hint, rules, f"{key}.")
            if problem:
                return problem
    for name in fields:
        value, r = getattr(config, name), own_rules.get(name)
        if r is not None and value is not None and not r.ok(value, config):
            return f"{prefix}{name}", f"expected {_expected(hints[name], r, config)}, got {show(value)}"
    return None


def _expected(hint: Any, r: Rule | None, parent: Any) -> str:
    if r is None:
        return describe_type(hint)
    if r.replaces_type:
        return r.allowed(parent)
    args = _union_args(hint)
    if type(None) in args:  # "a string (not empty) or null"
        kept = " or ".join(describe_type(a) for a in args if a is not type(None))
        return f"{kept} {r.allowed(parent)} or null"
    return f"{describe_type(hint)} {r.allowed(parent)}"


# ---------------------------------------------------------------------------------------------------- building
def from_dict(cls: type[T], data: Mapping[str, Any] | None, where: str = "config") -> T:
    """Build dataclass ``cls`` from a (nested) dict; unknown keys raise a :class:`ConfigError` naming the allowed ones.

    Lists become tuples where the field is a tuple; values are not checked here (see :func:`find_problem`).

    Args:
        where: the source named in error messages (e.g. the YAML path).
    """
    return _build(cls, data, where, "")


def _build(cls: type[T], data: Mapping[str, Any] | None, where: str, prefix: str) -> T:
    if data is not None and not isinstance(data, Mapping):
        raise config_error(prefix[:-1] or "config", f"expected a mapping of settings, got {show(data)}", where)
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    flat = _flat_field(cls)
    options_cls = flat.metadata[FLAT_OPTIONS](data) if flat is not None else None
    option_names = [f.name for f in dataclasses.fields(options_cls)] if options_cls is not None else []
    own = [n for n in names if flat is None or n != flat.name]
    unknown = [k for k in data if k not in own and k not in option_names]
    if unknown:
        section = f" in {prefix[:-1]}" if prefix else ""
        raise config_error(
            f"{prefix}{unknown[0]}", f"unknown key; allowed{section}: {sorted(own + option_names)}", where
        )
    kwargs = {}
    for key, value in data.items():
        if key not in own:
            continue
        hint = hints[key]
        if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
            value = _build(hint, value, where, f"{prefix}{key}.")
        elif _is_tuple(hint) and isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    if options_cls is not None:
        kwargs[flat.name] = _build(options_cls, {k: data[k] for k in option_names if k in data}, where, prefix)
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """Plain-data view of a settings dataclass (tuples as lists, flat options beside their parent's fields)."""
    out: dict[str, Any] = {}
    flat = _flat_field(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if flat is not None and f.name == flat.name:
            out.update(to_dict(value) if dataclasses.is_dataclass(value) else {})
        elif dataclasses.is_dataclass(value):
            out[f.name] = to_dict(value)
        else:
            out[f.name] = _plain(value)
    return out


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x


def merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``top`` on top, recursively for mappings present in both."""
    out = dict(base)
    for k, v in top.items():
        out[k] = merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out
