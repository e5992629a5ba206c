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
import stat
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import LdpipeError


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


# ---------------------------------------------------------------------- bounded reads
# The most ldpipe reads of a file named by a user path (README, "Data quality": files named by a path).
PIPELINE_FILE_BOUND = 1 << 20  # 1 MiB: a pipeline file and each of its `extends` bases (TOML)
ANNOTATION_FILE_BOUND = 2 << 30  # 2 GiB: a COCO annotation JSON (train2017: 448 MB), a VOC
#                                  XML file, an ImageSets/Main split list

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))
_READ_CHUNK = 1 << 24  # what a read past the size the stat gave asks for at a time


def _size_text(n: int) -> str:
    """``1 MiB``, ``5.0 GiB``: a byte count in binary units (whole numbers without a decimal)."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n // scale} {unit}" if n % scale == 0 else f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _named(path: str) -> str:
    """``path``, with the file a symbolic link leads to."""
    real = os.path.realpath(path)
    return f"{path} (a link to {real})" if os.path.islink(path) and real != path else path


def _check(st: os.stat_result, path: str, bound: int, kind: str, error: type[Exception]) -> None:
    for test, what in _KINDS:
        if test(st.st_mode):
            raise error(f"{kind} {_named(path)} is {what}, not a regular file")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{kind} {_named(path)} is not a regular file")
    if st.st_size > bound:
        exact = f" ({st.st_size} bytes)" if st.st_size >= 1 << 10 else ""
        raise error(f"{kind} {_named(path)} is {_size_text(st.st_size)}{exact}, above "
                    f"the {_size_text(bound)} bound for {kind}s")


def read_bounded(path: str | os.PathLike, bound: int, kind: str,
                 error: type[Exception] = LdpipeError) -> bytes:
    """The bytes of the regular file ``path``, at most ``bound`` of them.

    Checked before it is opened (``os.stat``, symbolic links followed): a directory, FIFO,
    device or socket, or a file over ``bound`` bytes, is ``error`` with a message naming the
    ``kind`` (``"pipeline file"``), the path and what it is.  It is opened non-blocking (a
    FIFO put in its place after the check does not block) and checked again on the open
    descriptor, and at most ``bound + 1`` bytes are read (a file that grows past the bound
    while being read is the same error).  A missing or unreadable file raises the
    :class:`OSError` of ``os.stat`` / ``os.open`` for the caller to name."""
    path = os.fspath(path)
    _check(os.stat(path), path, bound, kind, error)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        _check(st, path, bound, kind, error)
        parts = [fh.read(st.st_size + 1)]  # one allocation of the size the stat gave
        got = len(parts[0])
        while got > st.st_size and got <= bound:  # it grew, or a size the stat does not give
            more = fh.read(min(bound + 1 - got, _READ_CHUNK))
            if not more:
                break
            parts.append(more)
            got += len(more)
    if got > bound:
        raise error(f"{kind} {_named(path)} grew above the {_size_text(bound)} bound for {kind}s "
                    f"while it was read")
    return parts[0] if len(parts) == 1 else b"".join(parts)
