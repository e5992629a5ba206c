"""The resolved pipeline: what a run really used, after ``extends`` and ``-o`` overrides.

:func:`resolved_dict` is plain data (str, int, float, bool, lists, tables) that
:func:`to_toml` writes as a pipeline file; loading that file gives the same pipeline again
(each model's ``train`` table holds exactly the values where its schedule differs from the
``[train]`` section).  ``ldpipe config show`` prints it, and every training run writes it
into its work dir and its checkpoints.

:func:`override_paths` lists the dotted leaf keys a set of ``-o KEY=VALUE`` overrides sets;
the schema uses it for precedence: ``-o train.KEY=V`` wins over a model's own
``train = {...}`` table, and ``-o models.NAME.train.KEY=V`` wins over both.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

from .load import override_paths, to_dict  # noqa: F401  (override_paths: re-exported)
from .schema import ConfigError, Pipeline

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def resolved_dict(pipe: Pipeline) -> dict:
    """The pipeline as plain data that loads back into an equal pipeline."""
    top = to_dict(pipe.train)
    models = {}
    for name, cfg in pipe.models.items():
        entry = to_dict(cfg)
        own = to_dict(pipe.schedules[name])
        entry["train"] = {k: v for k, v in own.items() if v != top[k]}
        models[name] = entry
    return _drop_none({"name": pipe.name, "data": to_dict(pipe.data), "train": top,
                       "models": models, "distill": to_dict(pipe.distill),
                       "cache": to_dict(pipe.cache), "chain": to_dict(dict(pipe.chain))})


def _drop_none(value: Any) -> Any:
    """None means "not given" (e.g. a backbone's ResNeXt keys on a ResNet); TOML has no null,
    so the resolved pipeline leaves such keys out - loading it gives the same None back."""
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def show(pipe: Pipeline) -> str:
    """``ldpipe config show``: a header naming the files and overrides, then the TOML."""
    head = [f"# resolved pipeline of {pipe.source}"]
    if pipe.bases:
        head.append(f"# extends: {', '.join(pipe.bases)}")
    if pipe.overridden:
        head.append(f"# overridden: {', '.join(pipe.overridden)}")
    return "\n".join(head) + "\n\n" + to_toml(resolved_dict(pipe))


# ---------------------------------------------------------------------- a small TOML writer
def to_toml(table: dict) -> str:
    """Plain data as TOML (tables as ``[a.b]`` sections, empty tables and tables in lists
    inline); ``tomllib.loads(to_toml(d)) == d``."""
    lines: list[str] = []
    _table(lines, [], table)
    return "\n".join(lines).rstrip() + "\n"


def _table(lines: list[str], prefix: list[str], table: dict) -> None:
    # None = "not given" (e.g. a backbone's ResNeXt keys on a ResNet): TOML has no null, so omit it
    table = {k: v for k, v in table.items() if v is not None}
    scalars = [(k, v) for k, v in table.items() if not (isinstance(v, dict) and v)]
    subs = [(k, v) for k, v in table.items() if isinstance(v, dict) and v]
    if prefix and (scalars or not subs):
        lines.append(f"[{'.'.join(_key(p) for p in prefix)}]")
    for k, v in scalars:
        lines.append(f"{_key(k)} = {_value(v)}")
    if scalars:
        lines.append("")
    for k, v in subs:
        _table(lines, [*prefix, k], v)


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _string(key)


def _string(text: str) -> str:
    return json.dumps(text).replace("\x7f", "\\u007f")


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()
                               if v is not None) + "}"
    raise ConfigError(f"cannot write {value!r} ({type(value).__name__}) as TOML")
