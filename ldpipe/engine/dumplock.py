"""One dump per cache at a time: a lock next to the cache that a killed dump cannot leave stuck.

The lock is the object ``OUT.ldpipe-lock`` beside the cache (not inside it, where
``--overwrite`` would delete it), holding JSON ``{pid, host, job, started, heartbeat}``.
``OUT`` is the cache's resolved location (:func:`lock_url`), so a second dump through a
symlink alias, a ``file://`` URL or another relative spelling of one cache finds the lock.
The process that takes it (rank 0 of a torchrun job; the other ranks of that job write
their own units under it and never lock) rewrites ``heartbeat`` every
:data:`HEARTBEAT_S` seconds and removes the lock when the dump ends, also on an error.

A second dump into the same ``--out`` is refused up front, naming the holder, unless the
lock is *stale*: its process is gone (same host: no such pid), or its heartbeat is older
than :data:`STALE_AFTER_S` (another host, where the pid cannot be checked).  A stale lock
is taken over with a warning, so a ``kill -9`` never blocks the resuming rerun.

Local paths are locked with an exclusive create (``O_CREAT | O_EXCL``).  Object stores
(``s3://``, ``memory://``, ...) have no such primitive in fsspec: there the lock is written
after checking that none exists and read back, which stops a second dump started any
time after the first but not two started within the same fraction of a second.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

import fsspec

from ..cache.manifest import CacheError
from ..files import atomic_write, canonical_location

log = logging.getLogger("ldpipe.dump")
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0
SUFFIX = ".ldpipe-lock"


def lock_url(out: str) -> str:
    """The lock of cache ``out``, named by the cache's resolved location
    (:func:`ldpipe.files.canonical_location`): every spelling of one cache - a relative
    path, a ``file://`` URL, a path through a symlinked folder - has the same lock."""
    return canonical_location(out).rstrip("/") + SUFFIX


def _job() -> str:
    """What the ranks of one torchrun job share (empty outside torchrun)."""
    return os.environ.get("TORCHELASTIC_RUN_ID", "") or (
        f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ else "")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def stale_reason(holder: dict, now: float | None = None) -> str | None:
    """Why the lock ``holder`` is stale, or None if its dump may still be running."""
    now = time.time() if now is None else now
    pid, host = holder.get("pid"), holder.get("host")
    if not isinstance(pid, int) or not isinstance(host, str):
        return "it is unreadable"
    if host == socket.gethostname():
        return None if _pid_alive(pid) else f"process {pid} on {host} is gone"
    beat = holder.get("heartbeat")
    if not isinstance(beat, (int, float)) or now - beat > STALE_AFTER_S:
        return f"its heartbeat from {host} is older than {STALE_AFTER_S:.0f} s"
    return None


class DumpLock:
    """``with DumpLock(out):`` - hold the dump lock of cache ``out`` (see the module doc)."""

    def __init__(self, out: str) -> None:
        self.url = lock_url(out)
        self.out = out
        self.fs, self.path = fsspec.core.url_to_fs(self.url)
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple)
                                else (self.fs.protocol,))
        self.me = {"pid": os.getpid(), "host": socket.gethostname(), "job": _job(),
                   "started": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ the lock object
    def _record(self) -> bytes:
        return json.dumps({**self.me, "heartbeat": time.time()}).encode()

    def _read(self) -> dict | None:
        try:
            raw = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        try:
            value = json.loads(raw)
            return value if isinstance(value, dict) else {}
        except ValueError:
            return {}

    def _create(self) -> bool:
        """Write the lock if none exists; False if one does."""
        if self.local:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as fh:
                fh.write(self._record())
            return True
        if self.fs.exists(self.path):
            return False
        self.fs.pipe_file(self.path, self._record())
        mine = self._read() or {}
        return mine.get("pid") == self.me["pid"] and mine.get("host") == self.me["host"]

    def _overwrite(self) -> None:
        data = self._record()
        if self.local:
            atomic_write(self.path, data)
        else:
            self.fs.pipe_file(self.path, data)

    # ------------------------------------------------------------ acquire / release
    def acquire(self) -> None:
        if self.fs.isdir(self.path):  # not a lock ldpipe wrote: its contents are not ours
            raise CacheError(f"{self.out}: its dump lock {self.url} is a directory, not a lock "
                             "file; move it away, or use another --out")
        if self._create():
            self._start_heartbeat()
            return
        holder = self._read()
        if holder is None and self._create():  # released in between
            self._start_heartbeat()
            return
        holder = holder or {}
        reason = stale_reason(holder)
        if reason is None:
            started = holder.get("started")
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) \
                if isinstance(started, (int, float)) else "?"
            raise CacheError(
                f"{self.out} is being written by another dump (pid {holder.get('pid')} on "
                f"{holder.get('host')}, started {when}; lock {self.url}); wait for it to finish, "
                f"or use another --out. If that dump is dead, delete {self.url}")
        log.warning("%s: taking over the dump lock %s (%s)", self.out, self.url, reason)
        self._overwrite()
        mine = self._read() or {}
        if mine.get("pid") != self.me["pid"] or mine.get("host") != self.me["host"]:
            raise CacheError(f"{self.out}: another dump took the stale lock {self.url} at the same "
                             "time; wait for it to finish, or use another --out")
        self._start_heartbeat()

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._overwrite()
            except OSError as exc:  # a full disk must not kill the dump through its lock
                log.debug("lock heartbeat failed: %s", exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder = self._read() or {}
        if holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]:
            try:
                self.fs.rm_file(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "DumpLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


__all__ = ["DumpLock", "lock_url", "stale_reason"]
