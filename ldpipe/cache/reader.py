"""Reading a teacher cache: decoded rows of one sample, for the student's loader.

:class:`UnitArrays` keeps a few units' arrays open (or decoded) and is shared by the
reader and by ``ldpipe cache info|diff``; :class:`CacheReader` serves one sample at a
time and is safe to pickle into DataLoader workers.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import torch
import zarr

from ..config.sample import SampleGeometry, sample_number
from ..errors import first_line
from .codec import codec_for
from .integrity import (check_index, check_unit, check_unit_arrays, check_unit_entries,
                        commit_bindings, missing_objects)
from .headpart import read_head_part  # noqa: F401 (re-exported)
from .headspec import FEATSTATS
from .manifest import F, CacheError, Manifest
from .shards import ShardBinding, ShardRows, shard_rows
from .store import (ROWS_LAST, content_sha, from_disk, index_complete, load_index, open_cache,
                    unit_name)

VALUE_ARRAYS = ("anchor", "box", "cls")
PRELOAD_BYTES = 128 << 20  # CacheReader's default: caches whose decoded rows fit are read whole


class UnitArrays:
    """The ``anchor``/``box``/``cls`` arrays of recently used units (LRU).

    ``decoded=True`` reads a unit whole into memory when first used (numpy arrays in
    the stored orientation); otherwise the arrays are kept open and slices are read on
    demand.  Either way an array in the layout ldpipe writes is read through
    :class:`~ldpipe.cache.shards.ShardRows` (one byte-range read per slice), any other
    through zarr.  ``keep=None`` never evicts.  A unit that cannot be read is a
    :class:`CacheError` naming the unit and array; so is one whose committed arrays or
    shards are missing or empty (zarr would read them as zeros), and, read whole, one
    whose content differs from its commit checksum (``ldpipe.cache.integrity``).  A unit
    committed with shard bindings has every shard index and chunk read checked against them
    (``ldpipe.cache.shards``); given ``entries`` (unit -> its samples' rows of the cache's
    table and scale factors), the table's entries are checked against the commit's sha256.
    A unit whose commit lists ``featstats`` (CrossKD) also has it opened, with its own table
    ``samples`` read whole and checked against the commit (to find a sample's statistics).
    """

    def __init__(self, root: zarr.Group, url: str, decoded: bool, keep: int | None = 64,
                 manifest: Manifest | None = None,
                 entries: Callable[[int], tuple[np.ndarray, np.ndarray]] | None = None) -> None:
        self.root, self.url, self.decoded, self.keep = root, url, decoded, keep
        self.manifest, self.entries = manifest, entries
        self.units: OrderedDict[int, dict] = OrderedDict()

    def get(self, u: int) -> dict:
        if u in self.units:
            self.units.move_to_end(u)
            return self.units[u]
        where = f"units/{unit_name(u)}"
        arrays, name = {}, "group"
        try:
            g = self.root[where]
        except Exception:
            raise CacheError(f"{self.url}: {where} is missing (a deleted unit; the index lists "
                             f"its samples); run `ldpipe cache verify {self.url}`") from None
        commit = check_unit(g, self.url, u, self.manifest)
        bindings = commit_bindings(commit, self.url, u) or {}
        if self.entries is not None:
            check_unit_entries(*self.entries(u), commit, self.url, u)
        try:
            for name in VALUE_ARRAYS:
                if name in commit["sha256"]:
                    arrays[name] = self._open_array(g[name], name, f"{self.url}: {where}/{name}",
                                                    bindings.get(name))
            if FEATSTATS in commit["sha256"]:
                name = FEATSTATS
                arrays[name] = self._open_array(g[name], name, f"{self.url}: {where}/{name}",
                                                bindings.get(name))
                name = "samples"
                arrays[name] = np.asarray(g[name][...])
                if content_sha(arrays[name]) != commit["sha256"].get(name):
                    raise CacheError(f"{self.url}: {where}/{name} does not match its commit checksum "
                                     f"(damaged or edited shard); run `ldpipe cache verify {self.url}`")
        except CacheError:
            raise
        except Exception as exc:
            raise CacheError(f"{self.url}: {where}/{name} cannot be read ({first_line(exc)}); "
                             f"run `ldpipe cache verify {self.url}`") from None
        if self.decoded:
            check_unit_arrays(arrays, commit, self.url, u)
        self.units[u] = arrays
        while self.keep is not None and len(self.units) > self.keep:
            self.units.popitem(last=False)
        return arrays

    def _open_array(self, z: zarr.Array, name: str, where: str, binding: ShardBinding | None = None):
        fast = shard_rows(z, z.ndim - 1 if name in ROWS_LAST else 0, where, binding)
        if fast is None and binding is not None:
            raise CacheError(f"{where}: its layout is not the one its unit's commit binds (edited "
                             f"array metadata); run `ldpipe cache verify {self.url}`")
        if not self.decoded:
            return fast or z
        return fast.rows(0, fast.shape[fast.axis]) if fast is not None else z[...]


def _take(arr, name: str, sl: slice) -> np.ndarray:
    """Rows ``sl`` of a unit array (decoded numpy, :class:`ShardRows` or zarr), stored orientation."""
    if isinstance(arr, ShardRows):
        return arr.rows(sl.start, sl.stop)
    return arr[sl] if name not in ROWS_LAST else arr[..., sl]


def _featstats(arrays: dict, s: int, where: str) -> torch.Tensor:
    """The feature statistics of sample ``s`` (its position from the unit's own table)."""
    numbers = arrays["samples"][:, F["sample"]]
    i = int(np.searchsorted(numbers, s))
    if i >= numbers.shape[0] or int(numbers[i]) != s:
        raise CacheError(f"{where}/samples does not list sample {s}, which the index puts in it")
    raw = _take(arrays[FEATSTATS], FEATSTATS, slice(i, i + 1))
    return torch.from_numpy(np.array(raw[0], dtype=np.float64, order="C"))  # own, writable copy


def sample_rows(arrays: dict, rec: np.ndarray, codec: str, with_cls: bool = True,
                url: str = "", unit: int | None = None, decode: bool = True) -> dict:
    """Decoded rows of the sample ``rec`` (an index row) from its unit's arrays.

    ``decode=False``: ``box`` / ``cls`` as stored (rows first, contiguous; ``int8`` rows keep
    their scale bytes), with ``codec`` naming how to decode them
    (:func:`ldpipe.cache.codec.decode_packed`).  Either way a unit with feature statistics
    (CrossKD) adds ``featstats``: float64 ``[L, 2, 2, C]`` (level, tower 0 cls / 1 reg, moment
    0 sum / 1 sum of squares, channel); for a unit without them the key is absent."""
    start, count = int(rec[F["row_start"]]), int(rec[F["row_count"]])
    sl = slice(start, start + count)
    where = f"{url}: units/{unit_name(unit)}" if unit is not None else f"{url}: a unit"
    for name in VALUE_ARRAYS:
        if name in arrays and arrays[name].shape[-1 if name != "anchor" else 0] < start + count:
            raise CacheError(f"{where}/{name} has fewer rows than sample {int(rec[F['sample']])} "
                             f"needs ({start}+{count}); run `ldpipe cache verify {url}`")
    if "anchor" not in arrays or "box" not in arrays:  # (cls: absent when not stored)
        raise CacheError(f"{where} lacks an array the sample needs "
                         f"({', '.join(n for n in ('anchor', 'box') if n not in arrays)})")
    out, name = {"cls": None}, "anchor"
    try:
        coder = codec_for(codec) if decode else None
        out["anchor"] = torch.from_numpy(np.asarray(_take(arrays["anchor"], "anchor", sl)).astype(np.int64))
        for name in ("box", "cls") if with_cls and "cls" in arrays else ("box",):
            raw = from_disk(name, _take(arrays[name], name, sl))
            out[name] = coder.unpack(raw) if decode else torch.from_numpy(np.array(raw, order="C"))  # own, writable copy
        if not decode:
            out["codec"] = codec
        if FEATSTATS in arrays:
            name = FEATSTATS
            out[name] = _featstats(arrays, int(rec[F["sample"]]), where)
    except CacheError as exc:
        raise CacheError(f"{exc}; run `ldpipe cache verify {url}`") from None
    except Exception as exc:
        raise CacheError(f"{where}/{name}: rows of sample {int(rec[F['sample']])} cannot be read "
                         f"({first_line(exc)}); run `ldpipe cache verify {url}`") from None
    return out


def read_index(root: zarr.Group, url: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`~ldpipe.cache.store.load_index` with a one-line error for a damaged table."""
    try:
        return load_index(root)
    except Exception as exc:
        raise CacheError(f"{url}: the sample table cannot be read ({first_line(exc)}); "
                         f"run `ldpipe cache verify {url}`") from None


def read_checked_index(root: zarr.Group, url: str, m: Manifest) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`read_index`, refusing a table whose arithmetic a missing shard broke."""
    table, scale, unit_of = read_index(root, url)
    if index_complete(root):
        for name in ("samples", "scale", "unit"):
            lost = missing_objects(root["index"][name])
            if lost:
                raise CacheError(f"{url}: index/{name}: chunk {lost[0]} is missing or empty "
                                 f"(deleted or not copied); run `ldpipe cache verify {url}`")
    check_index(table, scale, unit_of, m, url)
    return table, scale, unit_of


class CacheReader:
    """Random access to committed samples; safe to pickle into DataLoader workers.

    Opens lazily in each process.  A cache whose stored rows fit in ``preload_bytes`` (per
    process; default :data:`PRELOAD_BYTES`) is read a whole unit at a time and kept decoded in
    memory, so later reads are array slices; larger caches read each sample's rows from the
    shards (no read amplification) through a small LRU of open units.
    """

    def __init__(self, url: str, max_open_units: int = 64, preload_bytes: int | None = None) -> None:
        self.url = url
        self.max_open_units = max_open_units
        self.preload_bytes = PRELOAD_BYTES if preload_bytes is None else preload_bytes
        self._state = None
        self._lock = threading.Lock()

    def __getstate__(self):
        return {"url": self.url, "max_open_units": self.max_open_units,
                "preload_bytes": self.preload_bytes}

    def __setstate__(self, state):
        self.__init__(state["url"], state["max_open_units"], state.get("preload_bytes"))

    # -------------------------------------------------------------- opening
    def _open(self) -> dict:
        if self._state is None:
            root, manifest = open_cache(self.url)
            table, scale, unit_of = read_checked_index(root, self.url, manifest)
            preload = manifest.row_bytes() * int(table[:, F["row_count"]].sum()) <= self.preload_bytes
            self._state = {"manifest": manifest, "table": table, "scale": scale, "unit_of": unit_of,
                           "position": SamplePositions(table[:, F["sample"]]),
                           "units": UnitArrays(root, self.url, decoded=preload,
                                               keep=None if preload else self.max_open_units,
                                               manifest=manifest,
                                               entries=UnitEntries(table, scale, unit_of))}
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

    def has(self, image_index: int, variant: int) -> bool:
        return self._open()["position"](sample_number(image_index, variant, self.num_variants)) is not None

    # -------------------------------------------------------------- reading
    def _locate(self, image_index: int, variant: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Index row, scale factor and unit of one sample."""
        st = self._open()
        s = sample_number(image_index, variant, self.num_variants)
        i = st["position"](s)
        if i is None:
            raise CacheError(f"{self.url}: sample (image {image_index}, variant {variant}) "
                             f"is not in the cache, which holds {len(st['table'])} of "
                             f"{st['manifest'].num_samples} samples (an unfinished dump: rerun it)")
        return st["table"][i], st["scale"][i], int(st["unit_of"][i])

    def read(self, image_index: int, variant: int, with_cls: bool = True, decode: bool = True) -> dict:
        """Decoded targets of one sample: anchor index, box and class log-probs, ``geometry``
        (a :class:`~ldpipe.data.meta.SampleGeometry`; ``decode=False``: the rows as stored, see :func:`sample_rows`)."""
        rec, scale, u = self._locate(image_index, variant)
        with self._lock:
            arrays = self._open()["units"].get(u)
        out = sample_rows(arrays, rec, self.manifest.codec, with_cls, self.url, u, decode)
        out["geometry"] = geometry_of(rec, scale)
        return out


class UnitEntries:
    """Unit -> the rows of the cache's table and scale factors that list its samples (a slice
    where the table is ordered by unit, as every written index is; else a search)."""

    def __init__(self, table: np.ndarray, scale: np.ndarray, unit_of: np.ndarray) -> None:
        self.table, self.scale, self.unit_of = table, scale, unit_of
        self.sorted = bool((np.diff(unit_of) >= 0).all())

    def __call__(self, u: int) -> tuple[np.ndarray, np.ndarray]:
        if self.sorted:
            rows = slice(*np.searchsorted(self.unit_of, [u, u + 1]).tolist())
        else:
            rows = np.flatnonzero(self.unit_of == u)
        return self.table[rows], self.scale[rows]


class SamplePositions:
    """Sample number -> row of the index table, without a per-sample Python object.

    A complete cache's table is sorted and holds samples ``0..N-1``, so the row is the sample
    number itself; any other (sorted) table is searched (``np.searchsorted``).  Opening a
    COCO-sized cache (236k samples) this way costs no time and no memory beyond the table.
    """

    def __init__(self, samples: np.ndarray) -> None:
        self.samples = np.ascontiguousarray(samples, dtype=np.int64)
        n = self.samples.shape[0]
        self.dense = bool(n) and int(self.samples[0]) == 0 and int(self.samples[-1]) == n - 1 and (
            bool((np.diff(self.samples) == 1).all()))
        if not self.dense and n and not (np.diff(self.samples) > 0).all():
            order = np.argsort(self.samples, kind="stable")  # partial tables: sort once
            self.order, self.samples = order, self.samples[order]
        else:
            self.order = None

    def __call__(self, s: int) -> int | None:
        n = self.samples.shape[0]
        if self.dense:
            return s if 0 <= s < n else None
        i = int(np.searchsorted(self.samples, s))
        if i >= n or int(self.samples[i]) != s:
            return None
        return i if self.order is None else int(self.order[i])


def geometry_of(rec: np.ndarray, scale: np.ndarray) -> SampleGeometry:
    """The stored geometry of the sample of index row ``rec`` and scale row ``scale``."""
    return SampleGeometry(img_shape=(int(rec[F["img_h"]]), int(rec[F["img_w"]])),
                          pad_shape=(int(rec[F["pad_h"]]), int(rec[F["pad_w"]])),
                          ori_shape=(int(rec[F["ori_h"]]), int(rec[F["ori_w"]])),
                          flip=bool(rec[F["flip"]]),
                          scale_factor=(float(scale[0]), float(scale[1])))
