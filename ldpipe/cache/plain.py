"""Plain-data helpers of the manifest: JSON's view of a value and a short rendering of one."""
from __future__ import annotations

import json


def plain_value(v):
    """Nested lists for lists and tuples (JSON's view of a value)."""
    return [plain_value(x) for x in v] if isinstance(v, (list, tuple)) else v


def short(v) -> str:
    s = json.dumps(v, sort_keys=True, default=str)
    return s if len(s) <= 120 else s[:117] + "..."
