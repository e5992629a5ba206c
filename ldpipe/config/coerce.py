"""Typed building: a plain dict (a merged pipeline file) into one of the schema's frozen
dataclasses, checking every key, type and vocabulary word and naming the file and the dotted
key of anything wrong (:func:`build`; ``ldpipe.config.load`` reads the file)."""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

from .schema import RENAMED, ConfigError, Pipeline


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(tp: Any, value: Any, where: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:  # a vocabulary: exactly one of its words (True is not 1)
        choices = typing.get_args(tp)
        if not any(type(value) is type(c) and value == c for c in choices):
            raise ConfigError(f"{source}: {where} must be {'|'.join(str(c) for c in choices)}, "
                              f"got {value!r}")
        return value
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {where} must be a table, got {value!r}")
        return _build(tp, value, where, source)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {where} must be a table, got {value!r}")
        args = typing.get_args(tp)
        if args and _is_dataclass_type(args[1]):
            return {k: _coerce(args[1], v, f"{where}.{k}", source) for k, v in value.items()}
        return dict(value)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {where} must be a list, got {value!r}")
        (inner,) = typing.get_args(tp) or (Any,)
        return [_coerce(inner, v, f"{where}[{i}]", source) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):  # "X | None": None only as the default
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) == 1:
            return _coerce(inner[0], value, where, source)
        tagged = _tagged(inner)
        if tagged:  # a tagged union of tables (data.augment): its "type" word picks the table
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {where} must be a table, got {value!r}")
            kind = value.get("type")
            if not isinstance(kind, str) or kind not in tagged:
                raise ConfigError(f"{source}: {where}.type must be {'|'.join(tagged)}, got {kind!r}")
            return _build(tagged[kind], value, where, source)
        return value  # several types: the validation checks the value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {where} must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {where} must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {where} must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {where} must be a string, got {value!r}")
        return value
    return value


def _tagged(types_: list) -> dict[str, type]:
    """``{word: dataclass}`` when every type is a dataclass whose ``type`` field is a one-word
    ``Literal`` (a tagged union), else empty."""
    out = {}
    for tp in types_:
        if not _is_dataclass_type(tp):
            return {}
        hint = typing.get_type_hints(tp).get("type")
        words = typing.get_args(hint) if typing.get_origin(hint) is Literal else ()
        if len(words) != 1:
            return {}
        out[words[0]] = tp
    return out


_LOADER_SET = ("source", "raw", "bases", "overridden", "schedules")  # never read from a file


def _build(cls: type, values: dict, where: str, source: str):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        if (cls.__name__, key) in RENAMED:
            new = RENAMED[cls.__name__, key]
            raise ConfigError(f"{source}: {path} was renamed: use "
                              f"{f'{where}.{new}' if where else new}")
        if key not in known or (cls is Pipeline and key in _LOADER_SET):
            raise ConfigError(f"{source}: unknown key {path!r}")
        kwargs[key] = _coerce(hints[key], value, path, source)
    return cls(**kwargs)
