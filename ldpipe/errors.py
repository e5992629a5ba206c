"""The one base of ldpipe's errors, and the one-line form of any exception.

Every error ldpipe raises for bad input (a config key, a data file, a checkpoint, a cache,
a work dir, an export, a chain) is an :class:`LdpipeError`; the CLI turns one into a single
``Error: <message>`` line and exit code 1 (``ldpipe/cli.py``).  It is a ``ValueError``, so
code that caught ``ValueError`` around these calls still does.
"""
from __future__ import annotations

import re


class LdpipeError(ValueError):
    """Bad input that ldpipe names (file, key, value) in its message."""


def first_line(exc: BaseException, typed: bool = True) -> str:
    """``Type: first line of the message`` of an exception, for one-line errors (``typed=False``:
    the first line alone); the type's name for an empty message."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if typed else text.splitlines()[0]


_WORKER = re.compile(r"^Caught (\w+) in DataLoader worker process \d+\.\n")


def original_message(exc: BaseException) -> str:
    """The message of ``exc`` as it was raised: an error raised inside a DataLoader worker
    reaches the training process re-raised with the same type but the message
    ``Caught X in DataLoader worker process N.`` + the worker's traceback; this returns the
    worker's own message (what follows the traceback's ``...X: `` line), the message itself
    otherwise."""
    text = str(exc)
    m = _WORKER.match(text)
    if not m:
        return text
    last = None
    for last in re.finditer(rf"^(?:[A-Za-z_][\w.]*\.)?{re.escape(m.group(1))}: ", text, re.M):
        pass
    return text[last.end():].rstrip("\n") if last else text
