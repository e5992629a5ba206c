"""How a cache's stored bytes grow, read off a small real cache (``ldpipe cache plan``).

Every stored object of a cache grows with one of four things (``docs/cache-format.md``):

* ``row``    - the data of a unit's per-row arrays (``anchor``, ``box``, ``cls``): per stored row;
* ``sample`` - the data of a unit's per-sample arrays (``samples``, ``scale``, ``featstats``)
  and of ``index/``: per sample;
* ``unit``   - each unit's group and array metadata (``zarr.json``, with the commit): per unit;
* ``fixed``  - ``units/zarr.json``, ``index/``'s metadata, ``head_part/``: once.

The root ``zarr.json`` holds the manifest, whose image-id list grows with the split: it is
measured by writing the full manifest (:func:`root_metadata_bytes`), not scaled.  Parts are
named as ``ldpipe cache info`` names them (``stored_bytes_by_part``), so a plan and the info
of the real cache compare part by part.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import zarr
from zarr.core.sync import sync

from .headspec import FEATSTATS
from .info import stored_objects
from .manifest import F, Manifest
from .store import load_index, open_cache

Growth = Literal["row", "sample", "unit", "fixed", "root"]
ROW_ARRAYS = ("anchor", "box", "cls")
SAMPLE_ARRAYS = ("samples", "scale", FEATSTATS)


def classify(key: str) -> tuple[str, Growth]:
    """``(part, growth)`` of a stored object's key (relative to the cache root); the part is
    ``ldpipe cache info``'s: a unit array's name, ``index``, ``head_part`` or ``metadata``."""
    parts = key.split("/")
    if parts[0] == "units" and len(parts) > 3:  # units/000042/<array>/...
        if parts[-1] == "zarr.json":
            return parts[2], "unit"
        return parts[2], ("row" if parts[2] in ROW_ARRAYS else "sample")
    if parts[0] == "units":
        return "metadata", ("unit" if len(parts) == 3 else "fixed")  # a unit's group / units/
    if parts[0] == "index":
        return "index", ("fixed" if parts[-1] == "zarr.json" else "sample")
    if parts[0] == "head_part":
        return "head_part", "fixed"
    return "metadata", ("root" if key == "zarr.json" else "fixed")


@dataclass(frozen=True)
class SizeModel:
    """A small cache's stored bytes by ``(part, growth)``, and what it holds."""

    samples: int
    rows: int
    units: int
    total: int
    sums: dict[tuple[str, str], int] = field(default_factory=dict)

    def estimate(self, samples: int, rows: float, units: int, root_bytes: int) -> dict[str, int]:
        """Bytes per part of a cache of ``samples`` samples, ``rows`` stored rows in ``units``
        units, whose root metadata takes ``root_bytes``: each object class scaled by what it
        grows with (rows: by rows, so the region's rows per sample need not be sampled)."""
        scale = {"row": rows / max(self.rows, 1), "sample": samples / max(self.samples, 1),
                 "unit": units / max(self.units, 1), "fixed": 1.0}
        out: dict[str, float] = {}
        for (part, growth), size in self.sums.items():
            if growth != "root":
                out[part] = out.get(part, 0.0) + size * scale[growth]
        out["metadata"] = out.get("metadata", 0.0) + root_bytes
        return {part: int(round(v)) for part, v in sorted(out.items())}


def size_model(url: str) -> SizeModel:
    """The :class:`SizeModel` of the complete cache at ``url`` (every object listed)."""
    root, manifest = open_cache(url)
    table, _, _ = load_index(root)
    sums: dict[tuple[str, str], int] = {}
    total = 0
    for key, size in stored_objects(root).items():
        k = classify(key)
        sums[k] = sums.get(k, 0) + int(size)
        total += int(size)
    return SizeModel(int(table.shape[0]), int(table[:, F["row_count"]].sum()) if len(table) else 0,
                     manifest.num_units, total, sums)


def root_metadata_bytes(manifest: Manifest) -> int:
    """The size of the root ``zarr.json`` of a cache with ``manifest``, written as the dump
    writes it (a zarr v3 group whose ``ldpipe_cache`` attribute is the manifest)."""
    store = zarr.storage.MemoryStore()
    g = zarr.open_group(store, mode="w", zarr_format=3)
    g.attrs["ldpipe_cache"] = manifest.to_dict()
    return int(sync(store.getsize("zarr.json")))


__all__ = ["Growth", "SizeModel", "classify", "root_metadata_bytes", "size_model"]
