"""The CrossKD additions to the cache format, as plain data: the manifest's ``head_part`` entry
and the names of the ``head_part/`` arrays (``docs/cache-format.md``, section 10).

It imports nothing from ldpipe, so :mod:`.manifest` checks its entry with it; the arrays are
written and read by :mod:`.headpart`.
"""
from __future__ import annotations

import re

HEAD_PART = "head_part"  # the root group holding the teacher's head part, one array per parameter
FEATSTATS = "featstats"  # the unit array of per-sample feature statistics
# bounds of a sane entry (a damaged or hostile manifest must not make a reader allocate terabytes)
MAX_LEVELS = 16
MAX_CHANNELS = 1 << 16
MAX_CONVS = 64
_PARAM = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
_SHA = re.compile(r"[0-9a-f]{64}")


def array_name(param: str) -> str | None:
    """The array name of parameter ``param`` under ``head_part/``: its dots become ``-``
    (``cls_convs.1.conv.weight`` -> ``cls_convs-1-conv-weight``).  Parameter names are
    dot-joined identifiers and numbers, which never hold a ``-``, so the mapping is one to
    one; ``None`` for a name outside that alphabet."""
    return param.replace(".", "-") if isinstance(param, str) and _PARAM.fullmatch(param) else None


def param_name(array: str) -> str:
    """The parameter name of a ``head_part/`` array (the inverse of :func:`array_name`)."""
    return array.replace("-", ".")


def head_part_problem(hp) -> tuple[str, object] | None:
    """``(field, value)`` of the first malformed field of a manifest's ``head_part`` entry, or
    ``None`` (also for an absent entry).  ``idx``, ``channels``, ``levels``, ``stacked_convs``
    (> ``idx``) and ``norm_groups`` (>= 1) are required ints, ``sha256`` maps parameter names to
    64 lowercase hex digits; readers ignore other keys."""
    if hp is None:
        return None
    if not isinstance(hp, dict):
        return "head_part", hp
    for key, low, high in (("idx", 0, MAX_CONVS), ("channels", 0, MAX_CHANNELS),
                           ("levels", 0, MAX_LEVELS), ("stacked_convs", 1, MAX_CONVS),
                           ("norm_groups", 1, MAX_CHANNELS)):
        v = hp.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
            return f"head_part.{key}", v
    if hp["idx"] >= hp["stacked_convs"]:
        return "head_part.idx", hp["idx"]
    shas = hp.get("sha256")
    if not isinstance(shas, dict):
        return "head_part.sha256", shas
    for name, sha in shas.items():
        if array_name(name) is None:
            return "head_part.sha256 parameter name", name
        if not isinstance(sha, str) or not _SHA.fullmatch(sha):
            return f"head_part.sha256[{name!r}]", sha
    return None
