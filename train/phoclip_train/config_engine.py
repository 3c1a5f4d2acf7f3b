"""Setting typed dataclass fields from YAML trees and `key=value` text, strictly: the
engine under the run config, generic over dataclasses (it knows no field of ours).

Each value is checked against its field's declared type by pydantic in strict mode (the
only conversions are lossless: an int where a float is declared, a list where a tuple is),
so a refusal is one line naming the dotted key. YAML is read safely with YAML 1.2 floats;
aliases and deep nesting are refused before anything is built.
"""
from __future__ import annotations

import dataclasses
import functools
import re
import typing
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError


class ConfigError(ValueError):
    """An impossible or inconsistent setting; the message says what to change."""


MAX_YAML_DEPTH = 64
"""Nesting levels a YAML value may have (PyYAML composes nodes recursively: deeper
input would end in a RecursionError; a run config needs a handful)."""


class _Refused(yaml.MarkedYAMLError):
    """Valid YAML that a run config does not accept (an alias, nesting too deep)."""


class _Loader(yaml.SafeLoader):
    """Safe YAML with YAML 1.2 floats: PyYAML follows YAML 1.1, where `1e-5` (no dot)
    is a string, so `optim.eps=1e-6` or a JSON override written by json.dumps would
    arrive as text. Aliases are refused before anything is built: a few lines of
    aliases of aliases stand for billions of nodes once a value is copied or merged
    ("billion laughs"), and nesting is capped at MAX_YAML_DEPTH."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _Refused(problem=f"an alias (*{event.anchor}) is not accepted in a run config: write the value out",
                           problem_mark=event.start_mark)
        if self._depth >= MAX_YAML_DEPTH:
            raise _Refused(problem=f"nested deeper than {MAX_YAML_DEPTH} levels", problem_mark=self.peek_event().start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def load_yaml(text: Any, where: str = "") -> Any:
    """YAML → Python; a syntax error is one ConfigError naming `where` (a file, or the
    override `key=value`), the line and column, and how to quote; an alias or too deep
    a nesting is refused the same way."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "?"
        problem = getattr(e, "problem", None) or type(e).__name__
        if isinstance(e, _Refused):
            raise ConfigError(f"{where or 'YAML'}: {problem} (at {at})") from None
        hint = ("; a value with braces, colons or commas (a brace pattern inside a mapping) needs "
                "quotes, e.g. train.eval_sets='{ktvic: \"shards/val-{000000..000004}.tar\"}'"
                if where.startswith("override") else "")
        raise ConfigError(f"{where or 'YAML'}: not valid YAML at {at}: {problem}{hint}") from None



_STRICT = ConfigDict(strict=True)
"""Pydantic's strict mode: no text read as a number, no number as a boolean; a field
annotated Strict(False) (a tuple, which YAML writes as a list) takes pydantic's lax rules."""

_EXPECTED = {"int": "an integer", "float": "a number", "bool": "true or false", "string": "text",
             "list": "a list ([a, b])", "tuple": "a list ([a, b])", "dict": "a mapping ({key: value})"}
"""What a refusal asks for, by the first word of pydantic's error type (int_type, dict_type, ...)."""


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """The fields of a config dataclass and their declared types (Annotated kept)."""
    return typing.get_type_hints(cls, include_extras=True)


@functools.cache
def _adapter(typ: Any) -> TypeAdapter:
    return TypeAdapter(typ, config=_STRICT)


def _plain_type(typ: Any) -> tuple[Any, bool]:
    """(the type without Annotated and Optional, whether it was Optional)."""
    if typing.get_origin(typ) is Annotated:
        typ = typing.get_args(typ)[0]
    args = typing.get_args(typ)
    if typing.get_origin(typ) is typing.Union and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return typ, False


def _choices(typ: Any) -> Optional[tuple]:
    typ = _plain_type(typ)[0]
    return typing.get_args(typ) if typing.get_origin(typ) is Literal else None


def _list_choices(typ: Any) -> Optional[tuple]:
    """The choices of each item of a list of choices (train.report_to), else None."""
    typ = _plain_type(typ)[0]
    args = typing.get_args(typ)
    return _choices(args[0]) if typing.get_origin(typ) is list and args else None


def _choice_error(key: str, val: Any, choices: tuple) -> ConfigError:
    return ConfigError(f"{key}={val!r}: choose {', '.join(choices[:-1])} or {choices[-1]}")


def _as_written(typ: Any, val: Any, raw: Optional[str]) -> Any:
    """YAML 1.1 reads true/false/on/off/yes/no as booleans and 0123 as a number: a choice
    field takes the word back (`train.channels_last=no`, `compile: off`), and a plain text
    field (not a path or pattern, which are Optional) the scalar as written (`raw`, the
    override's text, else the value's text)."""
    plain, optional = _plain_type(typ)
    choices = _choices(plain)
    if choices and isinstance(val, bool):
        words = ([str(raw).strip().lower()] if raw is not None else []) + (
            ["true", "on", "yes"] if val else ["false", "off", "no"])
        return next((w for w in words if w in choices), val)
    if isinstance(val, str) and _list_choices(plain):  # one choice for a list of them: train.report_to=wandb
        return [val]
    if plain is str and not optional and isinstance(val, (bool, int, float)):
        return raw if raw is not None else str(val)
    return val


def _checked(cls: type, name: str, val: Any, key: str, raw: Optional[str] = None) -> Any:
    """`val` as field `name` of config class `cls` holds it, validated by pydantic against
    the declared type in strict mode, or a one-line ConfigError naming `key` and the value
    as given (`raw`, the override's text, when there is one)."""
    typ = _hints(cls)[name]
    try:
        return _adapter(typ).validate_python(_as_written(typ, val, raw))
    except ValidationError as e:
        shown = raw if raw is not None else val
        choices = _choices(typ)
        if choices:
            raise _choice_error(key, shown, choices) from None
        err = e.errors(include_url=False)[0]
        if err["type"] == "literal_error" and _list_choices(typ):
            item = _list_choices(typ)
            raise ConfigError(f"{key}: {err['input']!r} is unknown; choose from {', '.join(item[:-1])} "
                              f"and {item[-1]}") from None
        expected = _EXPECTED.get(err["type"].split("_")[0])
        raise ConfigError(f"{key} must be {expected}, not {shown!r}" if expected
                          else f"{key}: {err['msg']}, not {shown!r}") from None


def check_types(obj: Any, prefix: str = "") -> None:
    """Every field of the config tree holds a value of its type (fields set in code rather
    than through `_set_field` are caught here)."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            check_types(v, f"{prefix}{f.name}.")
        else:
            _checked(type(obj), f.name, v, prefix + f.name)


def _is_field(obj: Any, name: Any) -> bool:
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type) and name in _hints(type(obj))


def apply_override(obj: Any, dotted: str, raw: str) -> None:
    """Set `a.b.c` from a command-line string (parsed as YAML)."""
    *path, last = dotted.split(".")
    for p in path:
        if not _is_field(obj, p):
            raise ConfigError(f"unknown config key {dotted!r}")
        obj = getattr(obj, p)
    shown = raw if len(raw) <= 200 else raw[:200] + "..."  # a refusal stays a line one can read
    value = load_yaml(raw, f"override {dotted}={shown}")
    if isinstance(obj, dict):  # inside a free-form field, e.g. model.overrides.vision
        obj[last] = value
    else:
        _set_field(obj, last, value, dotted, raw)


def apply_tree(cfg: Any, tree: dict, prefix: str = "", sources: Optional[dict] = None, origin: str = "") -> None:
    """Set every field of a nested dict (a YAML file, a checkpoint's saved config);
    with `sources`, record `origin` under each dotted key set."""
    for k, v in tree.items():
        _set_field(cfg, k, v, f"{prefix}{k}", sources=sources, origin=origin)


def _set_field(obj: Any, name: Any, val: Any, key: str, raw: Optional[str] = None,
               sources: Optional[dict] = None, origin: str = "") -> None:
    """The one place a field is set, whether the value came from a YAML file, a
    `key=value` override (`raw`: the text as typed) or a checkpoint's saved config: a
    section takes a mapping of its fields; any other field a value its declared type
    allows (`_checked`). A mapping field is updated, so that `model.overrides.vision=...`
    and a later `model.overrides={...}` add up."""
    if not _is_field(obj, name):
        raise ConfigError(f"unknown config key {key!r}")
    cur = getattr(obj, name)
    if dataclasses.is_dataclass(cur):
        if not isinstance(val, dict):
            raise ConfigError(f"{key} is a section: set its fields ({key}.FIELD=VALUE), "
                              f"not {raw if raw is not None else val!r}")
        apply_tree(cur, val, key + ".", sources, origin)
        return
    val = _checked(type(obj), name, val, key, raw)
    if isinstance(cur, dict) and isinstance(val, dict):
        cur.update(val)
    else:
        setattr(obj, name, val)
    if sources is not None:
        sources[key] = origin
