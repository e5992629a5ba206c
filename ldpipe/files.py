"""Shared file helpers (imported by the cache and the engine alike).

* Atomic file writes: the new content goes to a temporary file in the target's folder and
  replaces the target in one ``os.replace``, so a reader sees the old file or the new one,
  never a torn one (a kill in between leaves ``<path>.tmp.<pid>`` beside it; no fsync).
* Locations: :func:`canonical_location` spells one place one way (a local path or
  ``file://`` URL resolved through its symlinks; another protocol's URL normalised), and
  :func:`location_relation` compares two by it - what every "would this write delete or
  nest into that input?" check uses.
"""
from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from contextlib import contextmanager


def temp_path(path: str) -> str:
    """``<path>.tmp.<pid>``: the temporary name the writes below use (same folder)."""
    return f"{path}.tmp.{os.getpid()}"


@contextmanager
def replacing(path: str) -> Iterator[str]:
    """Yields :func:`temp_path` of ``path`` for the caller to write; on a normal exit it
    replaces ``path``, on an exception it is removed and the exception propagates."""
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def atomic_write(path: str, data: bytes | str) -> None:
    """Write ``data`` (bytes as they are, text as ``open(..., "w")`` writes it) to ``path``
    atomically."""
    with replacing(path) as tmp:
        with open(tmp, "wb" if isinstance(data, bytes) else "w") as fh:
            fh.write(data)


# ---------------------------------------------------------------------- locations
LOCAL_PROTOCOLS = ("file", "local")


def local_path(url: str) -> str | None:
    """The file-system path of a local location (a plain path, ``file://`` or ``local://``
    URL), None for any other protocol."""
    if "::" in url:  # a chained URL (simplecache::s3://...) is not a local place
        return None
    if "://" not in url:
        return url
    protocol, rest = url.split("://", 1)
    return rest if protocol.lower() in LOCAL_PROTOCOLS else None


def canonical_location(url: str) -> str:
    """One spelling per place, for comparing locations: a local path or ``file://`` URL ->
    :func:`os.path.realpath` of the path (absolute, every symlink resolved); another
    protocol -> ``protocol://path`` as its fsspec file system names the path (``memory://c``
    and ``memory:///c`` are one place), without a trailing slash, ``.`` or doubled ``/``."""
    path = local_path(url)
    if path is not None:
        return os.path.realpath(path or ".")
    if "::" in url:
        return url.rstrip("/")
    protocol, rest = url.split("://", 1)
    protocol = protocol.lower()
    try:
        import fsspec
        rest = fsspec.get_filesystem_class(protocol)._strip_protocol(f"{protocol}://{rest}")
    except Exception:  # an unknown protocol or one whose package is absent: as written
        pass
    rest = posixpath.normpath("/" + rest).lstrip("/") if rest.strip("/") else ""
    return f"{protocol}://{rest}"


def location_relation(a: str, b: str) -> str | None:
    """How location ``a`` lies to location ``b`` (paths or URLs, compared by
    :func:`canonical_location`): ``"same"``, ``"inside"`` (``a`` is below ``b``),
    ``"contains"`` (``b`` is below ``a``), or None (apart)."""
    ca, cb = canonical_location(a), canonical_location(b)
    if ca == cb:
        return "same"
    pa, pb = _parts(ca), _parts(cb)
    if pa[:len(pb)] == pb:
        return "inside"
    if pb[:len(pa)] == pa:
        return "contains"
    return None


def _parts(canonical: str) -> tuple[str, ...]:
    """``("", "tmp", "x")`` for ``/tmp/x``; ``("s3:", "b", "c")`` for ``s3://b/c``."""
    if "://" in canonical:
        protocol, rest = canonical.split("://", 1)
        return (f"{protocol}:", *[p for p in rest.split("/") if p])
    return ("", *[p for p in canonical.split(os.sep) if p])


def blocking_file(path: str) -> str | None:
    """The existing non-folder strictly above the local ``path`` (its parent, grandparent,
    ...) that stops ``path`` being made, or None: ``a.txt`` for ``a.txt/out``."""
    parent = os.path.dirname(os.path.abspath(path))
    while True:
        if os.path.lexists(parent):
            return None if os.path.isdir(parent) else parent
        up = os.path.dirname(parent)
        if up == parent:
            return None
        parent = up
