"""Views in a cache: whether a cache's inputs are the ones a student's pipeline makes.

A cache holds the teacher's outputs either for the fixed variants (``data.train_scales`` x
flip) or for seeded *views* of ``[[data.augment]]`` (the manifest's ``views`` entry,
docs/cache-format.md).  A student is only ever shown inputs the teacher saw, so a pipeline
that declares augmentation cannot read a fixed-variant cache, and a view cache serves only the
augmentation settings it was drawn with.
"""
from __future__ import annotations

import json

from ..config import DataConfig, to_dict
from .manifest import Manifest


def augment_entry(data: DataConfig) -> list[dict]:
    """The ``[[data.augment]]`` steps as plain data (what a view cache's manifest records)."""
    return [to_dict(s) for s in data.augment]


def _short(v) -> str:
    s = json.dumps(v, sort_keys=True)
    return s if len(s) <= 160 else s[:157] + "..."


def views_problems(m: Manifest, data: DataConfig) -> list[str]:
    """Why the inputs of the cache of manifest ``m`` are not the ones ``data`` makes."""
    ours = augment_entry(data)
    if not ours:
        return []
    types = ", ".join(s["type"] for s in ours)
    return [f"augmentation: the cache holds the teacher's outputs for the fixed variants "
            f"{m.variants} (data.train_scales x flip), the pipeline declares data.augment "
            f"[{types}] = {_short(ours)}: a student is only shown inputs its teacher saw; train "
            f"with --online-teacher, or without the augmentation (-o data.augment=[])"]


__all__ = ["augment_entry", "views_problems"]
