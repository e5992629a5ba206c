"""Where a cache may be written: never onto, around or into what the command reads.

``dump-teacher --out`` and ``cache merge --out`` create (and with ``--overwrite`` delete)
a folder or prefix.  Before anything is locked, read or written, :func:`check_cache_out`
refuses, in one :class:`CacheError` line naming both places:

* an ``--out`` that is, contains or lies inside one of the command's :class:`Input` s
  (a merge's source caches; a dump's checkpoint; a dump's data folder, annotation file and
  image folders, which may hold the cache below them but not be it or lie inside it).
  Places are compared by :func:`ldpipe.files.canonical_location`: a path, its ``file://``
  URL and any symlink alias are one place;
* a local ``--out`` below a regular file, an ``--out`` that is a regular file (a cache is a
  folder; ``--overwrite`` deletes caches and folders only), and a symlink ``--out`` with
  ``--overwrite`` (nothing is deleted through a link; without ``--overwrite`` the cache is
  written into the link's target).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..files import blocking_file, canonical_location, local_path, location_relation
from .manifest import CacheError


@dataclass(frozen=True)
class Input:
    """Something the command reads, which its ``--out`` must keep apart from."""

    label: str  # "cache 1 (a.zarr)", "the checkpoint", "data.root", ...
    url: str  # path or URL
    may_contain_out: bool = False  # an --out below it is fine (a data folder), not onto or around it


def check_cache_out(out: str, overwrite: bool, inputs: list[Input] = ()) -> None:
    """Refuse ``out`` as the module docstring says (nothing is touched)."""
    for item in inputs:
        how = location_relation(out, item.url)
        if how is None or (how == "inside" and item.may_contain_out):
            continue
        resolved = canonical_location(out)
        alias = "" if resolved in (out, out.rstrip("/")) else f" (resolved: {resolved})"
        what = {"same": "is", "contains": "contains", "inside": "lies inside"}[how]
        danger = {"same": "writing there would destroy it",
                  "contains": "--overwrite would delete it, and the cache would enclose it",
                  "inside": "the cache would nest into it"}[how]
        raise CacheError(f"--out {out}{alias} {what} {item.label} ({item.url}): {danger}; "
                         "choose another --out")
    path = local_path(out)
    if path is None:
        return
    above = blocking_file(path)
    if above is not None:
        raise CacheError(f"--out {out}: {above} is a file, not a folder; choose another --out")
    if os.path.islink(path.rstrip("/") or path):
        if overwrite:
            raise CacheError(f"--out {out} is a symbolic link (to {os.path.realpath(path)}); "
                             "--overwrite does not delete through a link: give the target itself, "
                             "or remove the link")
    elif os.path.lexists(path) and not os.path.isdir(path):
        raise CacheError(f"--out {out} is a file, not a cache (a cache is a folder); "
                         "remove it or choose another --out")


def creation_path(out: str) -> str:
    """Where a new cache at ``out`` is created: a local symlink's target (zarr's create
    cannot clear a link), ``out`` itself otherwise."""
    path = local_path(out)
    if path is not None and os.path.islink(path.rstrip("/") or path):
        return os.path.realpath(path)
    return out


__all__ = ["Input", "check_cache_out", "creation_path"]
