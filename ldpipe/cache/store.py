"""The teacher cache on disk: a Zarr v3 group of sharded, compressed units.

Layout (``docs/cache-format.md`` is the full, versioned spec)::

    CACHE/                     root group; attrs["ldpipe_cache"] = manifest
    CACHE/units/000042/        one work unit = ``samples_per_shard`` consecutive samples
        samples   int64  [n, 13]     per-sample table (SAMPLE_FIELDS)
        scale     float64[n, 2]      resize scale factor (w, h)
        anchor    int32  [rows]      own-grid flat anchor index, sorted per sample (delta filter)
        box       [4, B', rows]      edge log-probabilities, rows last (B' = reg_max+1, +2 for int8)
        cls       [C', rows]         class log-probabilities, rows last (C' = C, +2 for int8)
        attrs["commit"]              written last: counts and content sha256 per array
    CACHE/index/               consolidated table of every sample (written when complete)

Every array of a unit is one shard (zarr's sharding codec) of inner chunks of
``chunk_rows`` rows, each chunk compressed (Zstd or Blosc) and checksummed
(crc32c).  A unit is visible to readers only once its ``commit`` attribute
exists; the commit is written after all of its arrays, and zarr's local store
writes every object atomically, so a killed writer leaves either a complete,
committed unit or one that the next run deletes and writes again.  Units are
assigned to ranks round-robin: no two writers touch the same shard.

With the int8 codec the float16 per-row scale is stored in the two extra
trailing bytes of each row (little-endian), so a row is self-contained; 8-bit
arrays are delta-filtered along the rows, where neighbouring anchors of one
object have alike distributions (``_filters``).
"""
from __future__ import annotations

import hashlib
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec
from zarr.codecs.numcodecs import Delta

from . import codec as C

# zarr warns on every numcodecs codec (here: Delta) that other zarr implementations may lack
# it; the format spec names the codec, and readers of this format use zarr-python.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3")

FORMAT = "ldpipe-teacher-cache"
FORMAT_VERSION = 2
SAMPLE_FIELDS = ("sample", "image_index", "image_id", "variant", "row_start", "row_count",
                 "img_h", "img_w", "pad_h", "pad_w", "flip", "ori_h", "ori_w")
F = {name: i for i, name in enumerate(SAMPLE_FIELDS)}


class CacheError(ValueError):
    """A cache is missing, corrupt, incomplete or incompatible; the message says which."""


def open_root(url: str, mode: str = "r") -> zarr.Group:
    try:
        return zarr.open_group(url, mode=mode, zarr_format=3)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeNotFoundError):
        raise CacheError(f"no teacher cache at {url}") from None


def unit_name(u: int) -> str:
    return f"{u:06d}"


def _compressors(name: str):
    if name == "zstd":
        return [ZstdCodec(level=3), Crc32cCodec()]
    if name == "blosc":
        return [BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"), Crc32cCodec()]
    raise CacheError(f"unknown compressor {name!r} (zstd or blosc)")


ROWS_LAST = ("box", "cls")  # stored with the row axis last (columnar); see to_disk


def to_disk(name: str, arr: np.ndarray) -> np.ndarray:
    """The stored orientation of a unit array: ``box`` [rows, 4, B'] -> [4, B', rows] and
    ``cls`` [rows, C'] -> [C', rows], so one bin (or class) of consecutive rows is contiguous."""
    return np.ascontiguousarray(np.moveaxis(arr, 0, -1)) if name in ROWS_LAST else arr


def from_disk(name: str, arr: np.ndarray) -> np.ndarray:
    """Back to rows first (a view)."""
    return np.moveaxis(arr, -1, 0) if name in ROWS_LAST else arr


def _filters(arr: np.ndarray) -> list:
    """Array-to-array codecs before compression (measured in docs/benchmarks.md).

    * ``anchor`` (int32, sorted per sample): delta - stored anchors come in runs of
      neighbours, so most differences are 1.
    * 8-bit ``box`` / ``cls`` (stored rows last): delta along the rows - consecutive rows
      are neighbouring anchors of one object, whose distributions are alike.  On a trained
      BCCD teacher at 1333x800 this takes a box row from 71 to 56.5 bytes after zstd.
    Float values gain little from either and keep the compressor alone.
    """
    if arr.dtype == np.int32 or arr.dtype == np.uint8:
        return [Delta(dtype=arr.dtype.str)]
    return []


def content_sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def pack_rows(enc: C.Encoded) -> np.ndarray:
    """int8: append the float16 scale as two trailing bytes of each row."""
    if enc.scale is None:
        return enc.values
    scale_bytes = np.ascontiguousarray(enc.scale.astype("<f2")).view(np.uint8).reshape(*enc.scale.shape, 2)
    return np.concatenate([enc.values, scale_bytes], axis=-1)


def unpack_rows(raw: np.ndarray, codec: str) -> torch.Tensor:
    if codec != "int8":
        return C.decode(raw, None, codec)
    scale = np.ascontiguousarray(raw[..., -2:]).view("<f2")[..., 0]
    return C.decode(raw[..., :-2], scale, codec)


@dataclass
class UnitData:
    """Everything one unit holds, ready to write."""

    samples: np.ndarray  # int64 [n, len(SAMPLE_FIELDS)]
    scale: np.ndarray  # float64 [n, 2]
    anchor: np.ndarray  # int32 [rows]
    box: np.ndarray  # [rows, 4, B']
    cls: np.ndarray | None  # [rows, C'] or None


def write_unit(root: zarr.Group, u: int, data: UnitData, compressor: str, chunk_rows: int) -> None:
    """Write a unit's arrays, then its commit (the unit becomes visible last)."""
    path = f"units/{unit_name(u)}"
    if path in root:
        del root[path]
    g = root.create_group(path)
    comp = _compressors(compressor)
    arrays = {"samples": data.samples, "scale": data.scale, "anchor": data.anchor, "box": data.box}
    if data.cls is not None:
        arrays["cls"] = data.cls
    shas = {}
    for name, arr in arrays.items():
        rows = arr.shape[0]
        inner = max(1, min(chunk_rows, rows))
        shard_rows = max(inner, -(-rows // inner) * inner)
        arr = to_disk(name, arr)
        if name in ROWS_LAST:
            chunks, shards = (*arr.shape[:-1], inner), (*arr.shape[:-1], shard_rows)
        else:
            chunks, shards = (inner, *arr.shape[1:]), (shard_rows, *arr.shape[1:])
        z = g.create_array(name, shape=arr.shape, dtype=arr.dtype, chunks=chunks, shards=shards,
                           filters=_filters(arr), compressors=comp,
                           fill_value=0, config={"write_empty_chunks": True})
        if rows:
            z[...] = arr
        shas[name] = content_sha(arr)
    g.attrs["commit"] = {"samples": int(data.samples.shape[0]), "rows": int(data.anchor.shape[0]),
                         "sha256": shas}


def committed_units(root: zarr.Group) -> dict[int, dict]:
    """Unit number -> commit record, for every committed unit."""
    if "units" not in root:
        return {}
    out = {}
    for name, g in root["units"].groups():
        try:
            commit = g.attrs.get("commit")
        except Exception:  # a torn or unreadable group: not committed
            commit = None
        if isinstance(commit, dict):
            out[int(name)] = commit
    return out


class CacheReader:
    """Random access to committed samples; safe to pickle into DataLoader workers.

    Opens lazily in each process and keeps a small LRU of open unit arrays.  A cache
    whose stored rows fit in ``preload_bytes`` (per process) is read a whole unit at a
    time and kept decoded in memory, so later reads are array slices; larger caches
    read each sample's rows from the shards (no read amplification).
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
    def _open(self):
        if self._state is None:
            root = open_root(self.url, "r")
            manifest = root.attrs.get("ldpipe_cache")
            if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
                raise CacheError(f"{self.url} is not an ldpipe teacher cache (no manifest)")
            if manifest.get("format_version") != FORMAT_VERSION:
                raise CacheError(f"{self.url}: cache format version {manifest.get('format_version')} "
                                 f"is not supported by this ldpipe (reads version {FORMAT_VERSION})")
            table, scale, unit_of = load_index(root)
            lookup = {int(s): i for i, s in enumerate(table[:, F["sample"]])}
            self._state = {"root": root, "manifest": manifest, "table": table, "scale": scale,
                           "unit_of": unit_of, "lookup": lookup, "units": OrderedDict(),
                           "preload": _row_bytes(manifest) * int(table[:, F["row_count"]].sum())
                           <= self.preload_bytes}
        return self._state

    @property
    def manifest(self) -> dict:
        return self._open()["manifest"]

    @property
    def table(self) -> np.ndarray:
        return self._open()["table"]

    @property
    def scale(self) -> np.ndarray:
        return self._open()["scale"]

    @property
    def num_variants(self) -> int:
        return len(self.manifest["variants"])

    def sample_number(self, image_index: int, variant: int) -> int:
        return image_index * self.num_variants + variant

    def has(self, image_index: int, variant: int) -> bool:
        return self.sample_number(image_index, variant) in self._open()["lookup"]

    def _unit(self, u: int) -> dict:
        st = self._open()
        units = st["units"]
        if u in units:
            units.move_to_end(u)
            return units[u]
        g = st["root"][f"units/{unit_name(u)}"]
        arrays = {name: g[name] for name in ("anchor", "box", "cls") if name in g}
        if st["preload"]:  # small cache: decode the unit once, keep it (no eviction)
            arrays = {name: a[...] for name, a in arrays.items()}
        units[u] = arrays
        while not st["preload"] and len(units) > self.max_open_units:
            units.popitem(last=False)
        return arrays

    # -------------------------------------------------------------- reading
    def row(self, image_index: int, variant: int) -> tuple[np.ndarray, np.ndarray]:
        rec, scale, _ = self._locate(image_index, variant)
        return rec, scale

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
        codec = self.manifest["codec"]
        start, count = int(rec[F["row_start"]]), int(rec[F["row_count"]])
        with self._lock:
            arrays = self._unit(u)
        sl = slice(start, start + count)
        out = {
            "anchor": torch.from_numpy(arrays["anchor"][sl].astype(np.int64)),
            "box": unpack_rows(from_disk("box", arrays["box"][..., sl]), codec),
            "cls": (unpack_rows(from_disk("cls", arrays["cls"][..., sl]), codec)
                    if with_cls and "cls" in arrays else None),
            "geometry": geometry_of(rec, scale),
        }
        return out


def _row_bytes(manifest: dict) -> int:
    """Decoded bytes of one stored row (anchor index + box + class values)."""
    geo, codec = manifest["geometry"], manifest["codec"]
    extra = 2 if codec == "int8" else 0
    item = C.bytes_per_value(codec)
    cls = (geo["num_classes"] + extra) * item if manifest.get("store_cls") else 0
    return 4 + 4 * (geo["reg_max"] + 1 + extra) * item + cls


def geometry_of(rec: np.ndarray, scale: np.ndarray) -> dict:
    return {"img_shape": (int(rec[F["img_h"]]), int(rec[F["img_w"]])),
            "pad_shape": (int(rec[F["pad_h"]]), int(rec[F["pad_w"]])),
            "ori_shape": (int(rec[F["ori_h"]]), int(rec[F["ori_w"]])),
            "flip": bool(rec[F["flip"]]),
            "scale_factor": (float(scale[0]), float(scale[1]))}


def load_index(root: zarr.Group) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The per-sample table of the whole cache: consolidated if complete, else from committed units."""
    if "index" in root and root["index"].attrs.get("complete"):
        g = root["index"]
        return g["samples"][...], g["scale"][...], g["unit"][...]
    tables, scales, units = [], [], []
    for u in sorted(committed_units(root)):
        g = root[f"units/{unit_name(u)}"]
        t = g["samples"][...]
        tables.append(t)
        scales.append(g["scale"][...])
        units.append(np.full(t.shape[0], u, dtype=np.int64))
    if not tables:
        return (np.zeros((0, len(SAMPLE_FIELDS)), np.int64), np.zeros((0, 2)), np.zeros(0, np.int64))
    return np.concatenate(tables), np.concatenate(scales), np.concatenate(units)


def write_index(root: zarr.Group, compressor: str) -> int:
    """Consolidate the per-unit tables into ``index/`` (after every unit is committed)."""
    if "index" in root:
        del root["index"]
    table, scale, unit = load_index(root)
    order = np.argsort(table[:, F["sample"]], kind="stable") if len(table) else np.zeros(0, np.int64)
    g = root.create_group("index")
    comp = _compressors(compressor)
    for name, arr in (("samples", table[order]), ("scale", scale[order]), ("unit", unit[order])):
        rows = max(1, arr.shape[0])
        z = g.create_array(name, shape=arr.shape, dtype=arr.dtype, chunks=(rows, *arr.shape[1:]),
                           compressors=comp, fill_value=0, config={"write_empty_chunks": True})
        if arr.shape[0]:
            z[...] = arr
    g.attrs["complete"] = True
    return int(table.shape[0])
