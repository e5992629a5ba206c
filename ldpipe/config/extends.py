"""``extends = "base.toml"``: a pipeline file built on one or more base files.

The top-level key ``extends`` names a base file (a path relative to the extending file) or a
list of them.  The bases are read in order (each may extend others), deep-merged one over the
other, and the extending file's own keys are merged last: tables merge key by key,
recursively; any other value, lists included, replaces what the bases had.  A cycle or a
missing base file is a :class:`ConfigError` naming the files; a base is read as the pipeline file
is (a regular file of at most ``files.PIPELINE_FILE_BOUND`` bytes, checked before it is opened).
"""
from __future__ import annotations

import copy
import os
import tomllib

from .. import files
from .schema import ConfigError

EXTENDS_KEY = "extends"


def deep_merge(base: dict, over: dict) -> dict:
    """A new dict: ``base`` with ``over`` merged in (tables recursively, other values replace)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_toml(path: str, named_by: str) -> dict:
    """The base file ``path`` parsed, read as a pipeline file is (``files.read_bounded``)."""
    try:
        return tomllib.loads(files.read_bounded(path, files.PIPELINE_FILE_BOUND, "extends base",
                                                ConfigError).decode())
    except FileNotFoundError:
        raise ConfigError(f"{named_by}: extends {path!r}: file not found") from None
    except ConfigError as exc:
        raise ConfigError(f"{named_by}: {exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{named_by}: extends {path!r}: cannot read it ({exc.strerror})") from None


def _bases(raw: dict, path: str) -> list[str]:
    value = raw.pop(EXTENDS_KEY, [])
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"{path}: extends must be a file name or a list of file names, got {value!r}")
    here = os.path.dirname(os.path.abspath(path))
    return [os.path.normpath(os.path.join(here, n)) for n in names]


def resolve_extends(raw: dict, path: str, files: list[str] | None = None,
                    _stack: tuple[str, ...] = ()) -> dict:
    """``raw`` (the parsed file ``path``) with its base files merged under it.

    ``files``, when given, collects every base file read, in merge order."""
    raw = copy.deepcopy(raw)
    stack = (*_stack, os.path.abspath(path))
    merged: dict = {}
    for base in _bases(raw, path):
        if base in stack:
            cycle = " -> ".join([*stack[stack.index(base):], base])
            raise ConfigError(f"{path}: extends cycle: {cycle}")
        base_raw = _read_toml(base, path)
        merged = deep_merge(merged, resolve_extends(base_raw, base, files, stack))
        if files is not None:
            files.append(base)
    return deep_merge(merged, raw)
