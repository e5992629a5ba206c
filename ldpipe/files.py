"""Atomic file writes: the new content goes to a temporary file in the target's folder and
replaces the target in one ``os.replace``, so a reader sees the old file or the new one,
never a torn one (a kill in between leaves ``<path>.tmp.<pid>`` beside it; no fsync)."""
from __future__ import annotations

import os
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
