"""The teacher cache on disk: a Zarr v3 group of sharded, compressed units.

Layout (``docs/cache-format.md`` is the full, versioned spec)::

    CACHE/                     root group; attrs["ldpipe_cache"] = manifest
    CACHE/units/000042/        one work unit = ``samples_per_shard`` consecutive samples
        samples   int64  [n, 13]     per-sample table (SAMPLE_FIELDS)
        scale     float64[n, 2]      resize scale factor (w, h)
        anchor    int32  [rows]      own-grid flat anchor index, sorted per sample (delta filter)
        box       [4, B', rows]      edge log-probabilities, rows last (B' = reg_max+1, +2 for int8)
        cls       [C', rows]         class log-probabilities, rows last (C' = C, +2 for int8)
        featstats float64[n, L, 2, 2, C]  CrossKD caches only: per-sample head feature statistics
        attrs["commit"]              written last: counts and content sha256 per array (and,
                                     written with ``bind``, each array's shard binding)
    CACHE/index/               consolidated table of every sample (written when complete)
    CACHE/head_part/           CrossKD caches only: the teacher head part, float32 (.headpart)

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
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec
from zarr.codecs.numcodecs import Delta

from ..config import COMPRESSORS
from ..config.sample import SampleGeometry, sample_pair
from ..errors import first_line
from . import codec as C
from .headpart import head_part_shas, read_head_part, write_head_part  # noqa: F401 (re-exported)
from .headspec import FEATSTATS
from .manifest import F, SAMPLE_FIELDS, CacheError, Manifest
from .places import check_cache_out, creation_path
from .shards import shard_rows

# zarr warns on every numcodecs codec (here: Delta) that other zarr implementations may lack
# it; the format spec names the codec, and readers of this format use zarr-python.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3")

ROWS_LAST = ("box", "cls")  # stored with the row axis last (columnar); see to_disk
PER_SAMPLE = ("samples", "scale", FEATSTATS)  # one entry per sample (the others: per row)


def _storage_options(url: str) -> dict | None:
    """fsspec options for opening ``url`` (None for a local path).

    fsspec reuses one file-system instance per set of arguments and thread, and object-store
    ones (s3fs, gcsfs) cache directory listings in it: a cache reopened in the same process
    after another process wrote to it (a resumed dump, then ``verify``) would be judged on the
    old listing.  Each open therefore gets a fresh instance (its listings start empty)."""
    if "://" not in url or url.startswith("file://"):
        return None
    return {"skip_instance_cache": True}


def open_root(url: str, mode: str = "r") -> zarr.Group:
    try:
        return zarr.open_group(url, mode=mode, zarr_format=3, storage_options=_storage_options(url))
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeNotFoundError):
        raise CacheError(f"no teacher cache at {url}") from None


def open_cache(url: str) -> tuple[zarr.Group, Manifest]:
    """The root group and parsed manifest of a teacher cache, or a one-line :class:`CacheError`."""
    try:
        root = open_root(url, "r")
    except CacheError:
        raise
    except zarr.errors.ContainsArrayError:
        raise CacheError(f"{url} is a zarr array, not an ldpipe teacher cache") from None
    except Exception as exc:  # bad URL, unknown protocol, not a directory, ...
        raise CacheError(f"cannot open {url} as a teacher cache: {first_line(exc)}") from None
    try:
        raw = root.attrs.get("ldpipe_cache")
    except Exception as exc:
        raise CacheError(f"{url}: unreadable root metadata: {first_line(exc)}") from None
    return root, Manifest.parse(raw, url)


def unit_name(u: int) -> str:
    return f"{u:06d}"


def _compressors(name: str):
    if name == "zstd":
        return [ZstdCodec(level=3), Crc32cCodec()]
    if name == "blosc":
        return [BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"), Crc32cCodec()]
    raise CacheError(f"unknown compressor {name!r} ({' or '.join(COMPRESSORS)})")


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


@dataclass
class SampleRows:
    """What the teacher gave for one sample: its geometry and its stored rows."""

    sample: int  # ldpipe.data.sample_number(image_index, variant_index, num_variants)
    # the sample's ldpipe.data.SampleMeta (or a dict with its index, image_id, img_shape,
    # pad_shape, ori_shape, flip and scale_factor keys), read by stored_identity
    meta: object
    anchor: torch.Tensor  # int [n] sorted own-grid anchor indices
    box: torch.Tensor  # float32 [n, 4, reg_max + 1] edge log-probabilities
    cls: torch.Tensor | None  # float32 [n, C] class log-probabilities
    # CrossKD: float64 [L, 2, 2, C] per FPN level, tower (0 cls, 1 reg), moment (0 sum, 1 sum of
    # squares over the level's positions) and channel of the teacher's head features
    featstats: torch.Tensor | None = None


@dataclass
class UnitData:
    """Everything one unit holds, ready to write."""

    samples: np.ndarray  # int64 [n, len(SAMPLE_FIELDS)]
    scale: np.ndarray  # float64 [n, 2]
    anchor: np.ndarray  # int32 [rows]
    box: np.ndarray  # [rows, 4, B']
    cls: np.ndarray | None  # [rows, C'] or None
    featstats: np.ndarray | None = None  # float64 [n, L, 2, 2, C] (CrossKD) or None


def stored_identity(meta) -> tuple[int, int, SampleGeometry]:
    """``(image index, image id, geometry)`` of a sample's meta, as the table stores them: an
    ``ldpipe.data.SampleMeta`` (``index``, ``image_id``, ``geometry`` attributes; the cache may
    not import the data package) or a dict of those keys and the geometry's fields."""
    if not isinstance(meta, dict):
        return meta.index, meta.image_id, meta.geometry
    geo = SampleGeometry(tuple(meta["img_shape"]), tuple(meta["pad_shape"]), tuple(meta["ori_shape"]),
                         bool(meta["flip"]), tuple(meta["scale_factor"]))
    return meta["index"], meta["image_id"], geo


def assemble_unit(items: list[SampleRows], codec: str, num_variants: int,
                  box_step: float = 0.0) -> UnitData:
    """Sort a unit's samples and pack them into the unit arrays (encoding the values;
    ``box_step``: the int8 box rows' smallest step, the manifest's ``codec_step``)."""
    items = sorted(items, key=lambda t: t.sample)
    table = np.zeros((len(items), len(SAMPLE_FIELDS)), dtype=np.int64)
    scale = np.zeros((len(items), 2), dtype=np.float64)
    anchors, boxes, classes = [], [], []
    start = 0
    has_cls = bool(items) and items[0].cls is not None
    stats = [it.featstats for it in items if it.featstats is not None]
    if stats and len(stats) != len(items):
        raise ValueError(f"{len(stats)} of the unit's {len(items)} samples have feature statistics: "
                         "all or none must")
    for i, it in enumerate(items):
        n = int(it.anchor.shape[0])
        index, image_id, geo = stored_identity(it.meta)
        ih, iw = geo.img_shape
        ph, pw = geo.pad_shape
        oh, ow = geo.ori_shape
        table[i] = [it.sample, index, image_id, sample_pair(it.sample, num_variants)[1], start, n,
                    ih, iw, ph, pw, int(geo.flip), oh, ow]
        scale[i] = geo.scale_factor
        anchors.append(it.anchor.numpy())
        boxes.append(it.box)
        if has_cls:
            classes.append(it.cls)
        start += n
    anchor = np.concatenate(anchors).astype(np.int32) if anchors else np.zeros(0, np.int32)
    coder = C.codec_for(codec)
    box = coder.pack(coder.encode(torch.cat(boxes), box_step)) if boxes else None
    cls = coder.pack(coder.encode(torch.cat(classes))) if has_cls else None
    featstats = np.stack([t.detach().cpu().numpy().astype(np.float64) for t in stats]) if stats else None
    return UnitData(table, scale, anchor, box, cls, featstats)


def write_unit(root: zarr.Group, u: int, data: UnitData, compressor: str, chunk_rows: int,
               bind: bool = False) -> None:
    """Write a unit's arrays, then its commit (the unit becomes visible last).

    ``bind``: the commit also records each array's shard binding (the sha256 of its shard
    index and every chunk's crc32c, read back from the store once written), which binds what
    the direct reader reads to this commit; the dump and ``cache merge`` write it.  Without
    it the commit is the one format version 2 first specified, byte for byte
    (``tests/test_format_golden.py``).  ``data.featstats`` (CrossKD) adds the array
    ``featstats``, samples first and one chunk per sample; without it nothing changes."""
    path = f"units/{unit_name(u)}"
    if path in root:
        del root[path]
    g = root.create_group(path)
    comp = _compressors(compressor)
    arrays = {"samples": data.samples, "scale": data.scale, "anchor": data.anchor, "box": data.box}
    if data.cls is not None:
        arrays["cls"] = data.cls
    if data.featstats is not None:
        stats = np.ascontiguousarray(data.featstats, dtype=np.float64)
        if stats.ndim != 5 or stats.shape[0] != data.samples.shape[0] or stats.shape[2:4] != (2, 2):
            raise ValueError(f"featstats of shape {stats.shape} for {data.samples.shape[0]} samples "
                             "(expected [n, L, 2, 2, C])")
        arrays[FEATSTATS] = stats
    shas, bindings = {}, {}
    for name, arr in arrays.items():
        rows = arr.shape[0]
        # featstats: one chunk per sample (a sample's read decodes only its own statistics)
        inner = max(1, min(chunk_rows if name != FEATSTATS else 1, rows))
        shard_len = max(inner, -(-rows // inner) * inner)
        arr = to_disk(name, arr)
        if name in ROWS_LAST:
            chunks, shards = (*arr.shape[:-1], inner), (*arr.shape[:-1], shard_len)
        else:
            chunks, shards = (inner, *arr.shape[1:]), (shard_len, *arr.shape[1:])
        z = g.create_array(name, shape=arr.shape, dtype=arr.dtype, chunks=chunks, shards=shards,
                           filters=_filters(arr), compressors=comp,
                           fill_value=0, config={"write_empty_chunks": True})
        if rows:
            z[...] = arr
        shas[name] = content_sha(arr)
        if bind:
            bindings[name] = _bind(z, name, f"{path}/{name}").to_json()
    commit = {"samples": int(data.samples.shape[0]), "rows": int(data.anchor.shape[0]), "sha256": shas}
    if bind:
        commit["shards"] = bindings
    g.attrs["commit"] = commit


def _bind(z: zarr.Array, name: str, where: str):
    """The :class:`~ldpipe.cache.shards.ShardBinding` of an array just written."""
    fast = shard_rows(z, z.ndim - 1 if name in ROWS_LAST else 0, where)
    if fast is None:  # never for the arrays written above
        raise CacheError(f"{where}: written in a layout the shard reader does not know")
    return fast.stored_binding()


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


def index_complete(root: zarr.Group, total: int | None = None) -> bool:
    """Whether the consolidated ``index/`` exists, is marked complete (and has ``total`` rows)."""
    try:
        if "index" not in root:
            return False
        g = root["index"]
        return bool(g.attrs.get("complete")) and (total is None or g["samples"].shape[0] == total)
    except Exception:
        return False


def load_index(root: zarr.Group) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The per-sample table of the whole cache: consolidated if complete, else from committed units."""
    if index_complete(root):
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


# ---------------------------------------------------------------------- creating
def _has_content(url: str) -> bool:
    """Whether ``url`` holds anything (a file, or a non-empty directory / prefix)."""
    import fsspec
    try:
        fs, path = fsspec.core.url_to_fs(url)
        if not fs.exists(path):
            return False
        return fs.isfile(path) or bool(fs.ls(path, detail=False))
    except (FileNotFoundError, NotADirectoryError):
        return False


def create_or_resume(out: str, manifest: Manifest, overwrite: bool) -> None:
    """Create the cache at ``out`` with ``manifest``, or keep an existing one made the same
    way (a resumed dump); refuse to mix with or to delete anything else unless ``overwrite``
    (and, whatever ``overwrite`` says, what :func:`.places.check_cache_out` refuses)."""
    check_cache_out(out, overwrite)
    try:
        root = open_root(out, "r")
        raw = root.attrs.get("ldpipe_cache")
    except (CacheError, zarr.errors.ContainsArrayError):
        root, raw = None, None
        # zarr's mode "w" below deletes whatever is there: never do that to a location
        # that holds something other than a zarr group unless asked to
        if not overwrite and _has_content(out):
            raise CacheError(f"{out} exists, is not empty and is not an ldpipe cache; refusing to "
                             "write into it (use another --out, or --overwrite to delete its contents)")
    if raw is not None and not overwrite:
        diff = Manifest.parse(raw, out).identity_diff(manifest)
        if diff:
            raise CacheError(f"{out} already holds a cache made differently; refusing to mix:\n  "
                             + "\n  ".join(diff)
                             + "\nUse another --out, or --overwrite to replace it.")
        return  # resume into it
    if root is not None and raw is None and not overwrite:
        if len(list(root.keys())):
            raise CacheError(f"{out} exists and is not an ldpipe cache; use another --out")
    g = zarr.open_group(creation_path(out), mode="w", zarr_format=3, storage_options=_storage_options(out))
    g.attrs["ldpipe_cache"] = manifest.to_dict()
