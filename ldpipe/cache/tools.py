"""Inspecting teacher caches: ``info``, ``verify`` and ``diff`` (``ldpipe cache ...``).

Every function takes a cache path or fsspec URL and returns a JSON-able dict.
A location that is not a teacher cache raises :class:`CacheError` with one
line naming it.  ``verify`` never raises for a damaged cache: it reports every
problem it finds (unit, array, shard path, sample) in ``errors``.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as Fn
import zarr

from ..models.assigner import make_grid
from . import manifest as M
from .store import (FORMAT, FORMAT_VERSION, SAMPLE_FIELDS, CacheError, F, committed_units,
                    content_sha, from_disk, load_index, open_root, unit_name, unpack_rows)

UNIT_ARRAYS = ("samples", "scale", "anchor", "box", "cls")
MAX_ERRORS = 200
# |logsumexp(row)| allowed for decoded log-probabilities, per codec (int8 rounds to half a
# step of at most CLIP/255; fp16 keeps ~3 decimal digits)
NORM_TOL = {"fp32": 1e-4, "fp16": 2e-2, "int8": 0.15}


# ---------------------------------------------------------------------- opening
def open_cache(url: str) -> tuple[zarr.Group, dict]:
    """The root group and manifest of a teacher cache, or a one-line :class:`CacheError`."""
    try:
        root = open_root(url, "r")
    except CacheError:
        raise
    except zarr.errors.ContainsArrayError:
        raise CacheError(f"{url} is a zarr array, not an ldpipe teacher cache") from None
    except Exception as exc:  # bad URL, unknown protocol, not a directory, ...
        raise CacheError(f"cannot open {url} as a teacher cache: {_first_line(exc)}") from None
    try:
        manifest = root.attrs.get("ldpipe_cache")
    except Exception as exc:
        raise CacheError(f"{url}: unreadable root metadata: {_first_line(exc)}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CacheError(f"{url} is not an ldpipe teacher cache (no {FORMAT!r} manifest)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"{url}: cache format version {manifest.get('format_version')} is not "
                         f"supported (this ldpipe reads version {FORMAT_VERSION})")
    return root, manifest


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _sync(coro):
    from zarr.core.sync import sync
    return sync(coro)


def stored_objects(root: zarr.Group) -> dict[str, int]:
    """Key (relative to the cache root) -> size in bytes of every stored object."""
    store = root.store_path.store
    prefix = root.store_path.path
    prefix = f"{prefix}/" if prefix else ""

    async def collect():
        out = {}
        async for key in store.list_prefix(prefix):
            out[key[len(prefix):]] = await store.getsize(key)
        return out

    return _sync(collect())


def _exists(root: zarr.Group, key: str) -> bool:
    prefix = root.store_path.path
    return bool(_sync(root.store_path.store.exists(f"{prefix}/{key}" if prefix else key)))


def _index_complete(root: zarr.Group) -> bool:
    try:
        return "index" in root and bool(root["index"].attrs.get("complete"))
    except Exception:
        return False


def _load_index(root: zarr.Group, url: str):
    try:
        return load_index(root)
    except Exception as exc:
        raise CacheError(f"{url}: the sample table cannot be read ({_first_line(exc)}); "
                         f"run `ldpipe cache verify {url}`") from None


def _variant_keys(manifest: dict) -> list[str]:
    return list(manifest.get("variants") or [])


def _label(manifest: dict, rec: np.ndarray) -> str:
    keys = _variant_keys(manifest)
    v = int(rec[F["variant"]])
    key = keys[v] if 0 <= v < len(keys) else f"#{v}"
    return f"sample {int(rec[F['sample']])} (image {int(rec[F['image_id']])}, variant {key})"


class _Units:
    """Decoded arrays of a cache's units, a few at a time (LRU)."""

    def __init__(self, root: zarr.Group, manifest: dict, url: str, keep: int = 4) -> None:
        self.root, self.codec, self.url, self.keep = root, manifest["codec"], url, keep
        self.cache: OrderedDict[int, dict] = OrderedDict()

    def get(self, u: int) -> dict:
        if u in self.cache:
            self.cache.move_to_end(u)
            return self.cache[u]
        where = f"units/{unit_name(u)}"
        name = "anchor"
        try:
            g = self.root[where]
            out = {"anchor": g["anchor"][...].astype(np.int64)}
            name = "box"
            out["box"] = unpack_rows(from_disk("box", g["box"][...]), self.codec)
            name = "cls"
            out["cls"] = unpack_rows(from_disk("cls", g["cls"][...]), self.codec) if "cls" in g else None
        except Exception as exc:
            raise CacheError(f"{self.url}: {where}/{name} cannot be read ({_first_line(exc)}); "
                             f"run `ldpipe cache verify {self.url}`") from None
        self.cache[u] = out
        while len(self.cache) > self.keep:
            self.cache.popitem(last=False)
        return out


def _grid(pad_shape, geo: dict, memo: dict):
    key = tuple(int(x) for x in pad_shape)
    if key not in memo:
        memo[key] = make_grid(key, geo["strides"], geo["anchor_scale"])
    return memo[key]


def _stats_rows(n: int, k: int) -> np.ndarray:
    """Up to ``k`` evenly spread row numbers of ``n``."""
    if n <= k:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(np.int64))


# ------------------------------------------------------------------------- info
def info(url: str, max_samples: int = 200) -> dict:
    """Summary of a cache: counts, sizes, compression, regions, teacher entropy, lineage."""
    root, m = open_cache(url)
    geo = m["geometry"]
    table, scale, unit_of = _load_index(root, url)
    committed = committed_units(root)
    n = int(table.shape[0])
    num_units = int(m.get("num_units", 0))
    complete = _index_complete(root) and all(u in committed for u in range(num_units))

    objects = stored_objects(root)
    total_bytes = int(sum(objects.values()))
    by_part: dict[str, int] = {}
    for key, size in objects.items():
        parts = key.split("/")
        part = parts[2] if parts[0] == "units" and len(parts) > 3 else (
            "index" if parts[0] == "index" else "metadata")
        by_part[part] = by_part.get(part, 0) + int(size)

    reg_bins = int(geo["reg_max"]) + 1
    values_per_anchor = 4 * reg_bins + int(geo["num_classes"])
    memo: dict = {}
    grid_sizes = np.array([_grid((r[F["pad_h"]], r[F["pad_w"]]), geo, memo).num_anchors
                           for r in table], dtype=np.float64)
    dense = float(grid_sizes.mean() * values_per_anchor * 2) if n else 0.0
    per_sample = total_bytes / n if n else 0.0
    rows = table[:, F["row_count"]].astype(np.float64) if n else np.zeros(0)

    # per-level anchor counts and teacher entropy over a spread of samples
    levels = len(geo["strides"])
    level_sum = np.zeros(levels)
    ent_sum, ent_count = 0.0, 0
    picked = _stats_rows(n, max_samples)
    units = _Units(root, m, url)
    for i in sorted(picked, key=lambda j: (int(unit_of[j]), j)):
        rec = table[i]
        grid = _grid((rec[F["pad_h"]], rec[F["pad_w"]]), geo, memo)
        d = units.get(int(unit_of[i]))
        sl = slice(int(rec[F["row_start"]]), int(rec[F["row_start"]] + rec[F["row_count"]]))
        anchor = d["anchor"][sl]
        bounds = np.cumsum(grid.num_level_anchors)
        level = np.searchsorted(bounds, anchor, side="right")
        level_sum += np.bincount(level, minlength=levels)[:levels]
        box = d["box"][sl]
        if box.numel():
            lp = torch.log_softmax(box.double(), dim=-1)  # renormalise (int8 is up to a constant)
            ent = -(lp.exp() * lp).sum(-1)
            ent_sum += float(ent.sum())
            ent_count += int(ent.numel())
    k = len(picked)
    return {
        "cache": url,
        "format": m["format"],
        "format_version": m["format_version"],
        "cache_id": m.get("cache_id"),
        "complete": bool(complete),
        "samples_committed": n,
        "samples_planned": int(m.get("num_samples", 0)),
        "units_committed": len(committed),
        "units_planned": num_units,
        "num_images": int(m.get("data", {}).get("num_images", 0)),
        "variants": _variant_keys(m),
        "region": m.get("region"),
        "codec": m.get("codec"),
        "compressor": m.get("compressor"),
        "store_cls": m.get("store_cls"),
        "samples_per_shard": m.get("samples_per_shard"),
        "chunk_rows": m.get("chunk_rows"),
        "teacher": m.get("teacher"),
        "checkpoint_path": m.get("checkpoint_path"),
        "data": {k2: v for k2, v in (m.get("data") or {}).items() if k2 != "image_ids"},
        "reg_max": int(geo["reg_max"]),
        "num_classes": int(geo["num_classes"]),
        "strides": list(geo["strides"]),
        "stored_bytes": total_bytes,
        "stored_bytes_by_part": dict(sorted(by_part.items())),
        "bytes_per_sample": per_sample,
        "dense_fp16_bytes_per_sample": dense,
        "ratio_to_dense_fp16": per_sample / dense if dense else None,
        "compression_factor": dense / per_sample if per_sample else None,
        "anchors_per_sample": float(rows.mean()) if n else 0.0,
        "grid_anchors_per_sample": float(grid_sizes.mean()) if n else 0.0,
        "anchors_per_sample_per_level": [float(x) for x in (level_sum / k if k else level_sum)],
        "teacher_entropy_nats": ent_sum / ent_count if ent_count else None,
        "max_entropy_nats": math.log(reg_bins),
        "stats_samples": k,
        "created": m.get("created"),
        "versions": m.get("versions"),
        "lineage": M.lineage_chain(m),
    }


def format_info(d: dict) -> str:
    """The human summary of :func:`info`."""
    def mb(x):
        return f"{x / 1e6:.2f} MB" if x >= 1e5 else f"{x / 1e3:.1f} kB"

    t = d.get("teacher") or {}
    arch = t.get("architecture") or {}
    region = d.get("region") or {}
    assigners = ", ".join(f"topk={a.get('topk')} iof={a.get('ignore_iof_thr')} "
                          f"({'/'.join(a.get('models', []))})" for a in region.get("assigners") or [])
    lines = [
        f"cache         {d['cache']}",
        f"cache_id      {d['cache_id']}   format {d['format']} v{d['format_version']}",
        f"complete      {'yes' if d['complete'] else 'NO'}: {d['samples_committed']}/"
        f"{d['samples_planned']} samples, {d['units_committed']}/{d['units_planned']} units",
        f"data          {d['num_images']} images of {d['data'].get('split')} "
        f"({d['data'].get('format')}), variants {', '.join(d['variants'])}",
        f"teacher       {t.get('model')} {arch.get('backbone')} width {arch.get('base_width')} "
        f"channels {arch.get('channels')} reg_max {arch.get('reg_max')} "
        f"sha256 {str(t.get('checkpoint_sha256'))[:12]}",
        f"region        {region.get('policy')}" + (f"  [{assigners}]" if assigners else ""),
        f"codec         {d['codec']} + {d['compressor']}, class log-probs "
        f"{'stored' if d['store_cls'] else 'not stored'}, {d['samples_per_shard']} samples/unit",
        f"stored        {mb(d['stored_bytes'])} in all, {mb(d['bytes_per_sample'])} per sample "
        f"(" + ", ".join(f"{k} {mb(v)}" for k, v in d["stored_bytes_by_part"].items()) + ")",
    ]
    if d["ratio_to_dense_fp16"] is not None:
        lines.append(f"vs dense fp16 {mb(d['dense_fp16_bytes_per_sample'])} per sample: ratio "
                     f"{d['ratio_to_dense_fp16']:.4f}, {d['compression_factor']:.1f}x smaller")
    per_level = " / ".join(f"{x:.1f}" for x in d["anchors_per_sample_per_level"])
    lines.append(f"anchors       {d['anchors_per_sample']:.1f} of {d['grid_anchors_per_sample']:.0f} "
                 f"per sample; per level (strides {d['strides']}): {per_level}")
    if d["teacher_entropy_nats"] is not None:
        lines.append(f"entropy       {d['teacher_entropy_nats']:.3f} nats per edge distribution "
                     f"(max {d['max_entropy_nats']:.3f}; over {d['stats_samples']} samples)")
    lines.append("lineage       " + "\n              ".join(d["lineage"]))
    return "\n".join(lines)


# ----------------------------------------------------------------------- verify
class _Report:
    def __init__(self) -> None:
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.dropped = 0

    def error(self, msg: str) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(msg)
        else:
            self.dropped += 1


def _read_shards(z, where: str, rep: _Report, root: zarr.Group, key_prefix: str, url: str):
    """Read an array shard by shard; a shard that fails is reported by its store path."""
    base = url.rstrip("/")
    shape = tuple(z.shape)
    shard = tuple(z.shards or z.chunks)
    out = np.zeros(shape, dtype=z.dtype)
    ok = True
    nshards = 0
    grid = [max(1, -(-s // c)) if s else 0 for s, c in zip(shape, shard)]
    for idx in np.ndindex(*grid):
        nshards += 1
        key = f"{key_prefix}/{z.metadata.chunk_key_encoding.encode_chunk_key(idx)}"
        sl = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(idx, shard, shape))
        if not _exists(root, key):
            rep.error(f"{where}: shard {base}/{key} is missing")
            ok = False
            continue
        try:
            out[sl] = z[sl]
        except Exception as exc:
            rep.error(f"{where}: shard {base}/{key} does not decode ({_first_line(exc)}; "
                      "checksum mismatch or truncated file)")
            ok = False
    return (out if ok else None), nshards


def verify(url: str) -> dict:
    """Check a cache end to end; ``{ok, errors, warnings, checked}``."""
    root, m = open_cache(url)
    rep = _Report()
    checked = {"units": 0, "arrays": 0, "shards": 0, "samples": 0, "rows": 0, "bytes_decoded": 0}
    try:
        _verify(root, m, url, rep, checked)
    except CacheError:
        raise
    except Exception as exc:  # anything unforeseen is a failed check, not a crash
        rep.error(f"{url}: verification stopped: {_first_line(exc)}")
    errors = rep.errors + ([f"... and {rep.dropped} more errors"] if rep.dropped else [])
    return {"cache": url, "ok": not errors, "errors": errors, "warnings": rep.warnings,
            "checked": checked}


def _verify(root, m: dict, url: str, rep: _Report, checked: dict) -> None:
    codec = m.get("codec")
    geo = m.get("geometry") or {}
    variants = geo.get("variants") or []
    nv = len(m.get("variants") or [])
    total = int(m.get("num_samples", -1))
    per = int(m.get("samples_per_shard", 0))
    num_units = int(m.get("num_units", -1))
    image_ids = list((m.get("data") or {}).get("image_ids") or [])
    num_images = int((m.get("data") or {}).get("num_images", -1))

    # ---- manifest self-consistency
    if M.cache_id(m) != m.get("cache_id"):
        rep.error(f"{url}: manifest cache_id {m.get('cache_id')} does not match its identity "
                  f"fields (expected {M.cache_id(m)}): the manifest was edited")
    if codec not in NORM_TOL:
        rep.error(f"{url}: unknown codec {codec!r}")
        return
    if nv < 1 or len(variants) != nv or [v.get("key") for v in variants] != m.get("variants"):
        rep.error(f"{url}: manifest variants {m.get('variants')} disagree with geometry.variants")
        return
    if per < 1 or total != num_images * nv or num_units != math.ceil(total / per):
        rep.error(f"{url}: manifest counts disagree: num_samples {total}, num_images {num_images}, "
                  f"{nv} variants, num_units {num_units}, samples_per_shard {per}")
        return
    if len(image_ids) != num_images:
        rep.error(f"{url}: manifest lists {len(image_ids)} image ids for {num_images} images")
        return
    reg_bins = int(geo["reg_max"]) + 1
    num_classes = int(geo["num_classes"])
    extra = 2 if codec == "int8" else 0
    want_dtype = np.dtype({"fp32": "float32", "fp16": "float16", "int8": "uint8"}[codec])
    expected_arrays = ["samples", "scale", "anchor", "box"] + (["cls"] if m.get("store_cls") else [])

    # ---- units and commits
    present: dict[int, zarr.Group] = {}
    if "units" in root:
        for name, g in root["units"].groups():
            if not name.isdigit() or int(name) >= num_units:
                rep.error(f"{url}: unexpected group units/{name} (planned units are "
                          f"{unit_name(0)}..{unit_name(num_units - 1)})")
                continue
            present[int(name)] = g
    committed = committed_units(root)
    missing = [u for u in range(num_units) if u not in committed]
    if missing:
        names = ", ".join(f"units/{unit_name(u)}" for u in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        rep.error(f"{url}: {len(missing)} of {num_units} units have no commit: {names}{more} "
                  "(the dump did not finish; rerun the same command to complete it)")
    tables: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    memo: dict = {}
    for u in sorted(committed):
        if u not in present:
            continue
        res = _verify_unit(root, u, present[u], committed[u], m, url, rep, checked,
                           expected_arrays, want_dtype, reg_bins, num_classes, extra, memo)
        if res is not None:
            tables[u] = res

    # ---- geometry of every readable sample
    for u, (table, scale) in tables.items():
        for rec, sc in zip(table, scale):
            _check_geometry(rec, sc, m, geo, variants, u, rep)

    # ---- the consolidated index
    complete = _index_complete(root)
    if "index" in root:
        ix = root["index"]
        arrays = {}
        for name in ("samples", "scale", "unit"):
            if name not in ix:
                rep.error(f"{url}: index/{name} is missing")
                continue
            data, ns = _read_shards(ix[name], f"index/{name}", rep, root, f"index/{name}", url)
            checked["shards"] += ns
            if data is not None:
                arrays[name] = data
        if complete and len(arrays) == 3:
            t, s, un = arrays["samples"], arrays["scale"], arrays["unit"]
            if t.shape != (total, len(SAMPLE_FIELDS)):
                rep.error(f"{url}: the index claims complete but holds {t.shape[0]} samples of "
                          f"{total} planned")
            elif not np.array_equal(t[:, F["sample"]], np.arange(total)):
                seen = set(t[:, F["sample"]].tolist())
                gone = [x for x in range(total) if x not in seen][:10]
                rep.error(f"{url}: the index claims complete but sample numbers are not 0..{total - 1}"
                          f" (missing e.g. {gone})")
            else:
                if not np.array_equal(un, np.arange(total) // per):
                    rep.error(f"{url}: index/unit does not map samples to their units")
                if len(tables) == num_units:
                    want_t = np.concatenate([tables[u][0] for u in range(num_units)])
                    want_s = np.concatenate([tables[u][1] for u in range(num_units)])
                    bad = np.nonzero((t != want_t).any(axis=1) | (s != want_s).any(axis=1))[0]
                    for i in bad[:10]:
                        rep.error(f"{url}: index row {i} ({_label(m, t[i])}) differs from "
                                  f"units/{unit_name(int(i) // per)}/samples")
        elif not complete:
            rep.error(f"{url}: index/ exists but is not marked complete (interrupted at the end; "
                      "rerun the dump)")
    elif not missing:
        rep.error(f"{url}: every unit is committed but the consolidated index/ is missing "
                  "(the dump was interrupted at the end; rerun it)")
    partial = sorted(k for k in stored_objects(root) if k.endswith(".partial"))
    if partial:
        rep.warnings.append(f"{url}: {len(partial)} temporary file(s) of writes cut short by a kill "
                            f"(harmless, ignored by readers): {', '.join(partial[:5])}")
    leftovers = sorted(set(present) - set(committed))
    if leftovers and not missing:
        rep.warnings.append(f"{url}: uncommitted leftover groups " +
                            ", ".join(f"units/{unit_name(u)}" for u in leftovers[:10]))
    checked["complete"] = bool(complete and not missing)
    checked["units_planned"] = num_units
    checked["samples_planned"] = total


def _verify_unit(root, u, g, commit, m, url, rep, checked, expected_arrays, want_dtype, reg_bins,
                 num_classes, extra, memo):
    un = f"units/{unit_name(u)}"
    codec = m["codec"]
    geo = m["geometry"]
    nv = len(m["variants"])
    per = int(m["samples_per_shard"])
    total = int(m["num_samples"])
    image_ids = m["data"]["image_ids"]
    checked["units"] += 1
    shas = commit.get("sha256") if isinstance(commit.get("sha256"), dict) else {}
    if sorted(shas) != sorted(expected_arrays):
        rep.error(f"{un}: commit lists arrays {sorted(shas)}, expected {sorted(expected_arrays)}")
    data: dict[str, np.ndarray] = {}
    for name in expected_arrays:
        where = f"{un}/{name}"
        if name not in g:
            rep.error(f"{where}: array is missing")
            continue
        z = g[name]
        arr, ns = _read_shards(z, where, rep, root, where, url)
        checked["arrays"] += 1
        checked["shards"] += ns
        if arr is None:
            continue
        checked["bytes_decoded"] += int(arr.nbytes)
        got = content_sha(arr)
        if name in shas and got != shas[name]:
            rep.error(f"{where}: content sha256 {got[:16]} != commit {str(shas[name])[:16]} "
                      "(the data changed after the commit)")
            continue
        data[name] = arr
    if "samples" not in data:
        return None
    table = data["samples"]
    lo, hi = u * per, min((u + 1) * per, total)
    if table.ndim != 2 or table.shape[1] != len(SAMPLE_FIELDS):
        rep.error(f"{un}/samples: shape {table.shape}, expected [n, {len(SAMPLE_FIELDS)}]")
        return None
    n = table.shape[0]
    checked["samples"] += n
    if n != commit.get("samples"):
        rep.error(f"{un}: holds {n} samples, commit says {commit.get('samples')}")
    s = table[:, F["sample"]]
    if not np.array_equal(s, np.arange(lo, hi)):
        rep.error(f"{un}/samples: sample numbers {s[:8].tolist()}... are not {lo}..{hi - 1}")
    for rec in table:
        si = int(rec[F["sample"]])
        ii, vi = int(rec[F["image_index"]]), int(rec[F["variant"]])
        if ii != si // nv or vi != si % nv:
            rep.error(f"{un}: {_label(m, rec)}: sample != image_index*{nv}+variant "
                      f"(image_index {ii}, variant {vi})")
        elif not 0 <= ii < len(image_ids) or int(rec[F["image_id"]]) != int(image_ids[ii]):
            rep.error(f"{un}: {_label(m, rec)}: image_id does not match the manifest's image "
                      f"{ii}")
    scale = data.get("scale")
    if scale is not None and scale.shape != (n, 2):
        rep.error(f"{un}/scale: shape {scale.shape}, expected ({n}, 2)")
        scale = None

    # rows: contiguous, in bounds
    starts, counts = table[:, F["row_start"]], table[:, F["row_count"]]
    rows = int(commit.get("rows", -1))
    expect_starts = np.concatenate([[0], np.cumsum(counts)[:-1]]) if n else np.zeros(0, np.int64)
    rows_ok = True
    if (counts < 0).any() or not np.array_equal(starts, expect_starts) or int(counts.sum()) != rows:
        bad = next((i for i in range(n) if counts[i] < 0 or starts[i] != expect_starts[i]), n - 1)
        rep.error(f"{un}: row ranges are not contiguous or out of bounds at "
                  f"{_label(m, table[bad]) if n else 'unit'} (row_start {starts[bad] if n else '-'}, "
                  f"row_count {counts[bad] if n else '-'}, unit rows {rows})")
        rows_ok = False
    checked["rows"] += max(rows, 0)

    anchor = data.get("anchor")
    if anchor is not None:
        if anchor.shape != (rows,) or anchor.dtype != np.int32:
            rep.error(f"{un}/anchor: shape {anchor.shape} dtype {anchor.dtype}, expected ({rows},) int32")
        elif rows_ok:
            for i, rec in enumerate(table):
                a = anchor[starts[i]:starts[i] + counts[i]].astype(np.int64)
                grid = _grid((rec[F["pad_h"]], rec[F["pad_w"]]), geo, memo)
                if a.size and ((np.diff(a) <= 0).any() or a[0] < 0 or a[-1] >= grid.num_anchors):
                    rep.error(f"{un}/anchor: {_label(m, rec)}: anchor indices are not sorted, unique "
                              f"and within the grid of {grid.num_anchors} anchors")
                elif m["region"]["policy"] == "dense" and a.size != grid.num_anchors:
                    rep.error(f"{un}/anchor: {_label(m, rec)}: dense policy but {a.size} of "
                              f"{grid.num_anchors} anchors stored")

    for name, want_shape in (("box", (4, reg_bins + extra, rows)), ("cls", (num_classes + extra, rows))):
        arr = data.get(name)
        if arr is None:
            continue
        if arr.shape != want_shape or arr.dtype != want_dtype:
            rep.error(f"{un}/{name}: shape {arr.shape} dtype {arr.dtype}, expected {want_shape} "
                      f"{want_dtype}")
            continue
        if not rows:
            continue
        dec = unpack_rows(from_disk(name, arr), codec)
        finite = torch.isfinite(dec).reshape(dec.shape[0], -1).all(dim=1)
        lse = torch.logsumexp(dec.double(), dim=-1).abs().reshape(dec.shape[0], -1).amax(dim=1)
        bad_rows = torch.nonzero(~finite | (lse > NORM_TOL[codec])).squeeze(1)
        if bad_rows.numel() and rows_ok:
            r = int(bad_rows[0])
            i = int(np.searchsorted(starts + counts, r, side="right"))
            rec = table[min(i, n - 1)]
            rep.error(f"{un}/{name}: {bad_rows.numel()} rows are not finite normalised "
                      f"log-probabilities (first: row {r}, {_label(m, rec)}; "
                      f"|logsumexp| {float(lse[r]):.3g})")
    return table, (scale if scale is not None else np.ones((n, 2)))


def _check_geometry(rec, sc, m, geo, variants, u, rep) -> None:
    un = f"units/{unit_name(u)}"
    ih, iw, ph, pw = (int(rec[F[k]]) for k in ("img_h", "img_w", "pad_h", "pad_w"))
    oh, ow = int(rec[F["ori_h"]]), int(rec[F["ori_w"]])
    div = int(geo.get("pad_divisor", 1)) or 1
    problems = []
    if oh < 1 or ow < 1 or ih < 1 or iw < 1:
        problems.append(f"empty shape (ori {oh}x{ow}, img {ih}x{iw})")
    if ih > ph or iw > pw or ph % div or pw % div or ph - ih >= div or pw - iw >= div:
        problems.append(f"pad {ph}x{pw} is not img {ih}x{iw} padded to a multiple of {div}")
    v = int(rec[F["variant"]])
    if 0 <= v < len(variants):
        var = variants[v]
        if bool(rec[F["flip"]]) != bool(var.get("flip")):
            problems.append(f"flip {bool(rec[F['flip']])} but variant {var.get('key')} has "
                            f"flip {var.get('flip')}")
        scales = geo.get("input_scales") or []
        si = var.get("scale_idx", -1)
        if 0 <= si < len(scales):
            target = scales[si]
            if max(ih, iw) > max(target) or min(ih, iw) > min(target):
                problems.append(f"img {ih}x{iw} exceeds the input scale {target}")
    if not (np.isfinite(sc).all() and (sc > 0).all()):
        problems.append(f"bad scale factor {sc.tolist()}")
    elif oh >= 1 and ow >= 1 and (abs(sc[0] * ow - iw) > 1e-3 or abs(sc[1] * oh - ih) > 1e-3):
        problems.append(f"scale factor {sc.tolist()} does not map ori {oh}x{ow} to img {ih}x{iw}")
    if problems:
        rep.error(f"{un}/samples: {_label(m, rec)}: " + "; ".join(problems))


# ------------------------------------------------------------------------- diff
def diff(a: str, b: str, T: float = 10.0) -> dict:
    """Compare two caches sample by sample (matched by image id and variant key)."""
    if not T > 0:
        raise CacheError(f"temperature must be > 0, got {T}")
    ra, ma = open_cache(a)
    rb, mb = open_cache(b)
    bins_a, bins_b = ma["geometry"]["reg_max"], mb["geometry"]["reg_max"]
    if bins_a != bins_b:
        raise CacheError(f"cannot compare {a} (reg_max {bins_a}) with {b} (reg_max {bins_b})")
    same_classes = ma["geometry"]["num_classes"] == mb["geometry"]["num_classes"]
    ta, _, ua = _load_index(ra, a)
    tb, _, ub = _load_index(rb, b)
    ka, kb = _variant_keys(ma), _variant_keys(mb)

    def keys(table, vkeys):
        return {(int(r[F["image_id"]]), vkeys[int(r[F["variant"]])] if int(r[F["variant"]]) < len(vkeys)
                 else f"#{int(r[F['variant']])}"): i for i, r in enumerate(table)}

    index_a, index_b = keys(ta, ka), keys(tb, kb)
    common = [k for k in index_a if k in index_b]
    only_a = [k for k in index_a if k not in index_b]
    only_b = [k for k in index_b if k not in index_a]
    units_a, units_b = _Units(ra, ma, a), _Units(rb, mb, b)
    mismatches, mismatch_examples, geometry_mismatches = 0, [], 0
    max_box, max_cls = 0.0, 0.0
    have_cls = same_classes and bool(ma.get("store_cls")) and bool(mb.get("store_cls"))
    kl_sum, kl_count, common_anchors = 0.0, 0, 0
    common.sort(key=lambda k: (int(ua[index_a[k]]), index_a[k]))
    for key in common:
        i, j = index_a[key], index_b[key]
        reca, recb = ta[i], tb[j]
        if any(reca[F[f]] != recb[F[f]] for f in ("pad_h", "pad_w", "img_h", "img_w", "flip")):
            geometry_mismatches += 1
        da, db = units_a.get(int(ua[i])), units_b.get(int(ub[j]))
        sla = slice(int(reca[F["row_start"]]), int(reca[F["row_start"]] + reca[F["row_count"]]))
        slb = slice(int(recb[F["row_start"]]), int(recb[F["row_start"]] + recb[F["row_count"]]))
        anc_a, anc_b = da["anchor"][sla], db["anchor"][slb]
        if not np.array_equal(anc_a, anc_b):
            mismatches += 1
            if len(mismatch_examples) < 10:
                mismatch_examples.append({"image_id": key[0], "variant": key[1],
                                          "anchors_a": int(anc_a.size), "anchors_b": int(anc_b.size),
                                          "common": int(np.intersect1d(anc_a, anc_b).size)})
        _, ia, ib = np.intersect1d(anc_a, anc_b, assume_unique=True, return_indices=True)
        if not ia.size:
            continue
        common_anchors += int(ia.size)
        ia_t, ib_t = torch.from_numpy(ia), torch.from_numpy(ib)
        box_a = da["box"][sla][ia_t].double()
        box_b = db["box"][slb][ib_t].double()
        max_box = max(max_box, float((box_a - box_b).abs().max()))
        lpa = Fn.log_softmax(box_a / T, dim=-1)
        lpb = Fn.log_softmax(box_b / T, dim=-1)
        kl = (lpa.exp() * (lpa - lpb)).sum(-1)
        kl_sum += float(kl.sum())
        kl_count += int(kl.numel())
        if have_cls and da["cls"] is not None and db["cls"] is not None:
            ca, cb = da["cls"][sla][ia_t].double(), db["cls"][slb][ib_t].double()
            max_cls = max(max_cls, float((ca - cb).abs().max()))
    return {
        "a": a, "b": b,
        "cache_id_a": ma.get("cache_id"), "cache_id_b": mb.get("cache_id"),
        "codec_a": ma.get("codec"), "codec_b": mb.get("codec"),
        "samples_a": len(index_a), "samples_b": len(index_b),
        "common": len(common), "only_a": len(only_a), "only_b": len(only_b),
        "only_a_examples": [list(k) for k in only_a[:10]],
        "only_b_examples": [list(k) for k in only_b[:10]],
        "anchor_set_mismatches": mismatches,
        "anchor_set_mismatch_examples": mismatch_examples,
        "geometry_mismatches": geometry_mismatches,
        "common_anchors": common_anchors,
        "max_abs_box": max_box if common_anchors else None,
        "max_abs_cls": (max_cls if common_anchors else None) if have_cls else None,
        "T": float(T),
        "mean_kl": kl_sum / kl_count if kl_count else None,
    }


def format_diff(d: dict) -> str:
    def num(x, fmt):
        return "n/a" if x is None else format(x, fmt)

    lines = [
        f"a             {d['a']}  ({d['cache_id_a']}, {d['codec_a']})",
        f"b             {d['b']}  ({d['cache_id_b']}, {d['codec_b']})",
        f"samples       a {d['samples_a']}, b {d['samples_b']}, common {d['common']}, "
        f"only a {d['only_a']}, only b {d['only_b']}",
        f"anchor sets   {d['anchor_set_mismatches']} of {d['common']} common samples differ; "
        f"{d['common_anchors']} common anchors compared",
        f"max |a-b|     box log-probs {num(d['max_abs_box'], '.6g')}, "
        f"class log-probs {num(d['max_abs_cls'], '.6g')}",
        f"mean KL       {num(d['mean_kl'], '.6g')} nats per edge at T={d['T']:g} "
        "(KL(softmax(a/T) || softmax(b/T)))",
    ]
    if d["geometry_mismatches"]:
        lines.append(f"geometry      {d['geometry_mismatches']} common samples have different input "
                     "geometry")
    return "\n".join(lines)


def format_verify(d: dict) -> str:
    c = d["checked"]
    head = (f"{d['cache']}: checked {c.get('units', 0)} units, {c.get('arrays', 0)} arrays in "
            f"{c.get('shards', 0)} shards, {c.get('samples', 0)} samples, {c.get('rows', 0)} rows")
    lines = [head]
    lines += [f"warning: {w}" for w in d["warnings"]]
    if d["ok"]:
        lines.append("OK")
    else:
        lines += [f"error: {e}" for e in d["errors"]]
        lines.append(f"FAILED: {len(d['errors'])} error(s)")
    return "\n".join(lines)


__all__ = ["diff", "format_diff", "format_info", "format_verify", "info", "open_cache",
           "stored_objects", "verify"]
