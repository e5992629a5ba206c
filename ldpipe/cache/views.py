"""Views in a cache: their stored records, and whether a cache's inputs are a student's.

A cache holds the teacher's outputs either for the fixed variants (``data.train_scales`` x
flip) or for seeded *views* of ``[[data.augment]]``: then the manifest (format version 3) has
a ``views`` entry ``{"schedule", "count", "seed", "augment", "sha256"}`` and the root holds the
array ``views``: the UTF-8 JSON list of every sample's view record (``ldpipe.data.views.View``
's ``to_dict`` form), image-major, sample ``image_index * count + slot``; ``sha256`` is that
JSON's digest (docs/cache-format.md, "Views").  The records are written once, before the first
unit, and checked against the digest on every read.

A student is only ever shown inputs the teacher saw, so a pipeline that declares augmentation
cannot read a fixed-variant cache, and a view cache serves only the augmentation settings it
was drawn with (and, for the ``epochs`` schedule, at most ``count`` epochs).
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from ..config import DataConfig, ViewsConfig, to_dict
from ..errors import first_line
from .manifest import CacheError, Manifest

VIEWS = "views"  # the root array of the records


def augment_entry(data: DataConfig) -> list[dict]:
    """The ``[[data.augment]]`` steps as plain data (what a view cache's manifest records)."""
    return [to_dict(s) for s in data.augment]


def records_blob(records: list[dict]) -> bytes:
    """The stored form of the view records: compact JSON, UTF-8."""
    return json.dumps(records, separators=(",", ":"), sort_keys=True).encode()


def views_entry(views: ViewsConfig, data: DataConfig, blob: bytes) -> dict:
    """The manifest's ``views`` entry of ``blob`` drawn with ``views`` from ``data.augment``."""
    return {"schedule": views.schedule, "count": int(views.count), "seed": int(views.seed),
            "augment": augment_entry(data), "sha256": hashlib.sha256(blob).hexdigest()}


def write_views(root: zarr.Group, blob: bytes) -> None:
    """Store the records (kept if an earlier run of the same dump stored them already)."""
    if VIEWS in root:
        arr = root[VIEWS]
        if arr.shape == (len(blob),) and bytes(np.asarray(arr[...]).tobytes()) == blob:
            return
        del root[VIEWS]
    data = np.frombuffer(blob, dtype=np.uint8)
    z = root.create_array(VIEWS, shape=data.shape, dtype=np.uint8, chunks=(max(1, min(len(blob), 1 << 24)),),
                          compressors=[ZstdCodec(level=3), Crc32cCodec()], fill_value=0,
                          config={"write_empty_chunks": True})
    if len(blob):
        z[...] = data


def read_views(root: zarr.Group, url: str, m: Manifest) -> list[dict]:
    """The stored view records of the cache of manifest ``m``, checked against its digest."""
    try:
        blob = np.asarray(root[VIEWS][...]).tobytes()
    except Exception as exc:
        raise CacheError(f"{url}: the view records ({VIEWS}) cannot be read ({first_line(exc)}); "
                         f"run `ldpipe cache verify {url}`") from None
    if hashlib.sha256(blob).hexdigest() != m.views["sha256"]:
        raise CacheError(f"{url}: the view records do not match the manifest's views.sha256 (damaged "
                         f"or edited); run `ldpipe cache verify {url}`")
    records = json.loads(blob)
    if not isinstance(records, list) or len(records) != m.num_samples:
        raise CacheError(f"{url}: the view records list {len(records) if isinstance(records, list) else '?'} "
                         f"views for {m.num_samples} samples (damaged)")
    return records


def stored_problems(root: zarr.Group, m: Manifest, url: str) -> list[str]:
    """``cache verify``: what is wrong with a view cache's stored records (empty: nothing)."""
    if m.views is None:
        return []
    try:
        read_views(root, url, m)
    except CacheError as exc:
        return [str(exc)]
    return []


def _short(v) -> str:
    s = json.dumps(v, sort_keys=True)
    return s if len(s) <= 160 else s[:157] + "..."


def _types(steps: list[dict]) -> str:
    return ", ".join(s.get("type", "?") for s in steps) or "none"


def views_problems(m: Manifest, data: DataConfig) -> list[str]:
    """Why the inputs of the cache of manifest ``m`` are not the ones ``data`` makes."""
    ours = augment_entry(data)
    if m.views is None:
        if not ours:
            return []
        return [f"augmentation: the cache holds the teacher's outputs for the fixed variants "
                f"{m.variants} (data.train_scales x flip), the pipeline declares data.augment "
                f"[{_types(ours)}] = {_short(ours)}: a student is only shown inputs its teacher saw; "
                f"dump a cache of views with this data.augment, train with --online-teacher, or "
                f"without the augmentation (-o data.augment=[])"]
    v, out = m.views, []
    theirs = v.get("augment") or []
    if theirs != ours:
        out.append(f"augmentation: the cache holds views of data.augment [{_types(theirs)}] = "
                   f"{_short(theirs)}, the pipeline declares [{_types(ours)}] = {_short(ours)}: "
                   f"set data.augment as the dump had it, or dump again with this one")
    return out


def epochs_problem(m: Manifest, epochs: int, model_name: str) -> str | None:
    """Why a view cache of the ``epochs`` schedule cannot serve ``epochs`` epochs, or None."""
    v = m.views
    if v is None or v.get("schedule") != "epochs" or epochs <= int(v.get("count", 0)):
        return None
    return (f"epochs: the cache's view schedule holds {v.get('count')} epochs (one view per image "
            f"per epoch, cache.views.count), model {model_name!r} asks for train.epochs = {epochs}: "
            f"train {v.get('count')} epochs, or dump a schedule of {epochs}")


__all__ = ["VIEWS", "augment_entry", "epochs_problem", "read_views", "records_blob", "stored_problems", "views_entry", "views_problems",
           "write_views"]
