"""Reading a teacher cache: decoded rows of one sample, for the student's loader.

:class:`UnitArrays` keeps a few units' arrays open (or decoded) and is shared by the
reader and by ``ldpipe cache info|diff``; :class:`CacheReader` serves one sample at a
time and is safe to pickle into DataLoader workers.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import torch
import zarr

from .manifest import F, CacheError, Manifest
from .store import first_line, from_disk, load_index, open_cache, unit_name, unpack_rows

VALUE_ARRAYS = ("anchor", "box", "cls")


class UnitArrays:
    """The ``anchor``/``box``/``cls`` arrays of recently used units (LRU).

    ``decoded=True`` reads a unit whole into memory when first used (numpy arrays in
    the stored orientation); otherwise the zarr arrays are kept open and slices are
    read on demand.  ``keep=None`` never evicts.  A unit that cannot be read is a
    :class:`CacheError` naming the unit and array.
    """

    def __init__(self, root: zarr.Group, url: str, decoded: bool, keep: int | None = 64) -> None:
        self.root, self.url, self.decoded, self.keep = root, url, decoded, keep
        self.units: OrderedDict[int, dict] = OrderedDict()

    def get(self, u: int) -> dict:
        if u in self.units:
            self.units.move_to_end(u)
            return self.units[u]
        where = f"units/{unit_name(u)}"
        arrays, name = {}, "group"
        try:
            g = self.root[where]
            for name in VALUE_ARRAYS:
                if name in g:
                    arrays[name] = g[name][...] if self.decoded else g[name]
        except Exception as exc:
            raise CacheError(f"{self.url}: {where}/{name} cannot be read ({first_line(exc)}); "
                             f"run `ldpipe cache verify {self.url}`") from None
        self.units[u] = arrays
        while self.keep is not None and len(self.units) > self.keep:
            self.units.popitem(last=False)
        return arrays


def sample_rows(arrays: dict, rec: np.ndarray, codec: str, with_cls: bool = True) -> dict:
    """Decoded rows of the sample ``rec`` (an index row) from its unit's arrays."""
    start, count = int(rec[F["row_start"]]), int(rec[F["row_count"]])
    sl = slice(start, start + count)
    return {
        "anchor": torch.from_numpy(np.asarray(arrays["anchor"][sl]).astype(np.int64)),
        "box": unpack_rows(from_disk("box", arrays["box"][..., sl]), codec),
        "cls": (unpack_rows(from_disk("cls", arrays["cls"][..., sl]), codec)
                if with_cls and "cls" in arrays else None),
    }


def read_index(root: zarr.Group, url: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`~ldpipe.cache.store.load_index` with a one-line error for a damaged table."""
    try:
        return load_index(root)
    except Exception as exc:
        raise CacheError(f"{url}: the sample table cannot be read ({first_line(exc)}); "
                         f"run `ldpipe cache verify {url}`") from None


class CacheReader:
    """Random access to committed samples; safe to pickle into DataLoader workers.

    Opens lazily in each process.  A cache whose stored rows fit in ``preload_bytes``
    (per process) is read a whole unit at a time and kept decoded in memory, so later
    reads are array slices; larger caches read each sample's rows from the shards (no
    read amplification) through a small LRU of open units.
    """

    def __init__(self, url: str, max_open_units: int = 64, preload_bytes: int = 128 << 20) -> None:
        self.url = url
        self.max_open_units = max_open_units
        self.preload_bytes = preload_bytes
        self._state = None
        self._lock = threading.Lock()

    def __getstate__(self):
        return {"url": self.url, "max_open_units": self.max_open_units,
                "preload_bytes": self.preload_bytes}

    def __setstate__(self, state):
        self.__init__(state["url"], state["max_open_units"], state.get("preload_bytes", 128 << 20))

    # -------------------------------------------------------------- opening
    def _open(self) -> dict:
        if self._state is None:
            root, manifest = open_cache(self.url)
            table, scale, unit_of = read_index(root, self.url)
            lookup = {int(s): i for i, s in enumerate(table[:, F["sample"]])}
            preload = manifest.row_bytes() * int(table[:, F["row_count"]].sum()) <= self.preload_bytes
            self._state = {"manifest": manifest, "table": table, "scale": scale, "unit_of": unit_of,
                           "lookup": lookup,
                           "units": UnitArrays(root, self.url, decoded=preload,
                                               keep=None if preload else self.max_open_units)}
        return self._state

    @property
    def manifest(self) -> Manifest:
        return self._open()["manifest"]

    @property
    def table(self) -> np.ndarray:
        return self._open()["table"]

    @property
    def scale(self) -> np.ndarray:
        return self._open()["scale"]

    @property
    def num_variants(self) -> int:
        return self.manifest.num_variants

    def sample_number(self, image_index: int, variant: int) -> int:
        return image_index * self.num_variants + variant

    def has(self, image_index: int, variant: int) -> bool:
        return self.sample_number(image_index, variant) in self._open()["lookup"]

    # -------------------------------------------------------------- reading
    def _locate(self, image_index: int, variant: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Index row, scale factor and unit of one sample."""
        st = self._open()
        s = self.sample_number(image_index, variant)
        if s not in st["lookup"]:
            raise CacheError(f"{self.url}: sample (image {image_index}, variant {variant}) "
                             "is not in the cache (incomplete dump, or another data set?)")
        i = st["lookup"][s]
        return st["table"][i], st["scale"][i], int(st["unit_of"][i])

    def read(self, image_index: int, variant: int, with_cls: bool = True) -> dict:
        """Decoded targets of one sample: anchor index, box and class log-probs, geometry."""
        rec, scale, u = self._locate(image_index, variant)
        with self._lock:
            arrays = self._open()["units"].get(u)
        out = sample_rows(arrays, rec, self.manifest.codec, with_cls)
        out["geometry"] = geometry_of(rec, scale)
        return out


def geometry_of(rec: np.ndarray, scale: np.ndarray) -> dict:
    return {"img_shape": (int(rec[F["img_h"]]), int(rec[F["img_w"]])),
            "pad_shape": (int(rec[F["pad_h"]]), int(rec[F["pad_w"]])),
            "ori_shape": (int(rec[F["ori_h"]]), int(rec[F["ori_w"]])),
            "flip": bool(rec[F["flip"]]),
            "scale_factor": (float(scale[0]), float(scale[1]))}
