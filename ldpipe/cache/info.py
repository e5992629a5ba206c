"""``ldpipe cache info``: counts, sizes, compression, regions, teacher entropy and lineage.

Takes a cache path or fsspec URL and returns a JSON-able dict; a location that is
not a teacher cache raises :class:`~ldpipe.cache.manifest.CacheError` with one line
naming it.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import zarr
from zarr.core.sync import sync

from .compat import served_methods
from .integrity import check_unit
from .manifest import CacheError, F
from .reader import UnitArrays, read_checked_index, sample_rows
from .region import entry_setting
from .store import committed_units, index_complete, open_cache, unit_name
from .upscale import upscale_line


def stored_objects(root: zarr.Group, under: str = "") -> dict[str, int]:
    """Key (relative to the cache root) -> size in bytes of every stored object (below the
    folder ``under``, e.g. ``"units/000003"``)."""
    store = root.store_path.store
    prefix = root.store_path.path
    prefix = f"{prefix}/" if prefix else ""
    base = prefix
    prefix = f"{prefix}{under.strip('/')}/" if under else prefix

    async def collect():
        out = {}
        async for key in store.list_prefix(prefix):
            out[key[len(base):]] = await store.getsize(key)
        return out

    return sync(collect())


def is_listable(root: zarr.Group) -> bool:
    """Whether listing every object is cheap: a local directory or memory, not an object store."""
    from zarr.storage import LocalStore, MemoryStore
    return isinstance(root.store_path.store, (LocalStore, MemoryStore))


def sized_objects(root: zarr.Group, table: np.ndarray, unit_of: np.ndarray, num_units: int,
                  max_units: int = 32) -> tuple[dict[str, int], bool, int]:
    """The stored objects and their sizes: every object of a local cache, or on an object store
    (where a full listing is one request per 1000 objects) the metadata, ``index/`` and the
    objects of up to ``max_units`` evenly spread units, scaled to the whole cache by rows.
    Returns (key -> bytes, exact, units listed)."""
    if is_listable(root) or num_units <= max_units:
        return stored_objects(root), True, num_units
    top = stored_objects(root, "index")
    for key in ("zarr.json", "units/zarr.json"):
        try:
            size = sync(root.store_path.store.getsize(_join(root, key)))
            top[key] = int(size)
        except (FileNotFoundError, OSError):
            pass
    rows = np.zeros(num_units)
    if len(table):
        np.add.at(rows, unit_of.astype(np.int64).clip(0, num_units - 1), table[:, F["row_count"]])
    picked = _stats_rows(num_units, max_units)
    listed: dict[str, int] = {}
    for u in picked:
        listed.update(stored_objects(root, f"units/{int(u):06d}"))
    # scale the sampled units' bytes to every unit: per row, plus a per-unit constant
    total_rows, picked_rows = float(rows.sum()), float(rows[picked].sum())
    factor = (total_rows / picked_rows) if picked_rows else num_units / max(len(picked), 1)
    out = dict(top)
    for key, size in listed.items():
        out[key] = int(round(size * factor))
    return out, False, len(picked)


def _grid_sizes(geo, table: np.ndarray) -> np.ndarray:
    """Anchors of each sample's own grid, one grid per distinct padded shape."""
    if not len(table):
        return np.zeros(0)
    shapes, inverse = np.unique(table[:, [F["pad_h"], F["pad_w"]]], axis=0, return_inverse=True)
    per_shape = np.array([geo.grid((int(h), int(w))).num_anchors for h, w in shapes], dtype=np.float64)
    return per_shape[inverse.reshape(-1)]


def _join(root: zarr.Group, key: str) -> str:
    prefix = root.store_path.path
    return f"{prefix}/{key}" if prefix else key


def _stats_rows(n: int, k: int) -> np.ndarray:
    """Up to ``k`` evenly spread row numbers of ``n``."""
    if n <= k:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(np.int64))



def _check_units(root: zarr.Group, url: str, m, committed: dict, unit_of: np.ndarray,
                 objects: dict[str, int]) -> None:
    """Every unit the sample table lists is committed, with all its arrays and shards (from the
    listing already made: no extra reads)."""
    listed = sorted(int(u) for u in np.unique(unit_of))
    lost = [u for u in listed if u not in committed]
    if lost:
        raise CacheError(f"{url}: units/{unit_name(lost[0])} is missing or has no commit, but the "
                         f"sample table lists its samples ({len(lost)} such unit(s): deleted?); "
                         f"run `ldpipe cache verify {url}`")
    for u in sorted(committed):
        prefix = f"units/{unit_name(u)}/"
        sizes = {k[len(prefix):]: v for k, v in objects.items() if k.startswith(prefix)}
        check_unit(root[prefix.rstrip("/")], url, u, m, sizes)


def info(url: str, max_samples: int = 200, size_units: int = 32) -> dict:
    """Summary of a cache: counts, sizes, compression, regions, teacher entropy, lineage."""
    root, m = open_cache(url)
    geo = m.geometry
    table, scale, unit_of = read_checked_index(root, url, m)
    n = int(table.shape[0])
    num_units = m.num_units
    if index_complete(root, m.num_samples) and not is_listable(root):
        # the complete index is written only after every unit's commit: no need to read
        # every unit's metadata on an object store (``ldpipe cache verify`` checks them all)
        committed = {u: None for u in np.unique(unit_of).tolist()}
    else:
        committed = committed_units(root)
    complete = index_complete(root) and all(u in committed for u in range(num_units))

    objects, exact, units_sized = sized_objects(root, table, unit_of, num_units, size_units)
    if not exact and m.has_head_stats:  # (a listing of the sampled units only: add head_part/)
        objects.update(stored_objects(root, "head_part"))
    if exact:  # every object listed anyway: check each unit against the listing (no extra reads)
        _check_units(root, url, m, committed, unit_of, objects)
    total_bytes = int(sum(objects.values()))
    by_part: dict[str, int] = {}
    for key, size in objects.items():
        parts = key.split("/")
        part = parts[2] if parts[0] == "units" and len(parts) > 3 else (
            parts[0] if parts[0] in ("index", "head_part") else "metadata")
        by_part[part] = by_part.get(part, 0) + int(size)

    reg_bins = geo.reg_bins
    values_per_anchor = 4 * reg_bins + geo.num_classes
    grid_sizes = _grid_sizes(geo, table)
    dense = float(grid_sizes.mean() * values_per_anchor * 2) if n else 0.0
    per_sample = total_bytes / n if n else 0.0
    rows = table[:, F["row_count"]].astype(np.float64) if n else np.zeros(0)

    # per-level anchor counts and teacher entropy over a spread of samples
    levels = len(geo.strides)
    level_sum = np.zeros(levels)
    ent_sum, ent_count = 0.0, 0
    picked = _stats_rows(n, max_samples)
    units = UnitArrays(root, url, decoded=True, keep=4, manifest=m)
    clip, clipped, stored_values = m.clip(), 0, 0
    for i in sorted(picked, key=lambda j: (int(unit_of[j]), j)):
        rec = table[i]
        grid = geo.grid((rec[F["pad_h"]], rec[F["pad_w"]]))
        d = sample_rows(units.get(int(unit_of[i])), rec, m.codec, with_cls=m.store_cls, url=url,
                        unit=int(unit_of[i]))
        anchor = d["anchor"].numpy()
        bounds = np.cumsum(grid.num_level_anchors)
        level = np.searchsorted(bounds, anchor, side="right")
        level_sum += np.bincount(level, minlength=levels)[:levels]
        box = d["box"]
        if box.numel():
            lp = torch.log_softmax(box.double(), dim=-1)  # renormalise (int8 is up to a constant)
            ent = -(lp.exp() * lp).sum(-1)
            ent_sum += float(ent.sum())
            ent_count += int(ent.numel())
        if clip is not None:
            for values in (box, d["cls"]):
                if values is not None:
                    clipped += int((values <= -clip * (1 - 2e-3)).sum())
                    stored_values += int(values.numel())
    k = len(picked)
    return {
        "cache": url,
        "format": m.format,
        "format_version": m.format_version,
        "cache_id": m.cache_id,
        "complete": bool(complete),
        "samples_committed": n,
        "samples_planned": m.num_samples,
        "units_committed": len(committed),
        "units_planned": num_units,
        "num_images": m.data.num_images,
        "variants": list(m.variants),
        "region": dataclasses.asdict(m.region),
        "codec": m.codec,
        "compressor": m.compressor,
        "store_cls": m.store_cls,
        "samples_per_shard": m.samples_per_shard,
        "chunk_rows": m.chunk_rows,
        "teacher": dataclasses.asdict(m.teacher),
        "cls_logits": m.cls_meaning(),
        "cls_values": m.cls_values or "log_probs",
        "serves": served_methods(m),
        "checkpoint_path": m.checkpoint_path,
        "data": {k2: v for k2, v in dataclasses.asdict(m.data).items() if k2 != "image_ids"},
        "reg_max": geo.reg_max,
        "num_classes": geo.num_classes,
        "strides": list(geo.strides),
        "stored_bytes": total_bytes,
        "stored_bytes_by_part": dict(sorted(by_part.items())),
        "stored_bytes_exact": exact,
        "stored_bytes_units_listed": units_sized,
        "bytes_per_sample": per_sample,
        "dense_fp16_bytes_per_sample": dense,
        "ratio_to_dense_fp16": per_sample / dense if dense else None,
        "compression_factor": dense / per_sample if per_sample else None,
        "anchors_per_sample": float(rows.mean()) if n else 0.0,
        "grid_anchors_per_sample": float(grid_sizes.mean()) if n else 0.0,
        "anchors_per_sample_per_level": [float(x) for x in (level_sum / k if k else level_sum)],
        "teacher_entropy_nats": ent_sum / ent_count if ent_count else None,
        "max_entropy_nats": math.log(reg_bins),
        "codec_clip": clip,
        "codec_step": m.box_step if m.codec == "int8" else None,
        "clipped_fraction": clipped / stored_values if stored_values else (0.0 if clip else None),
        "stats_samples": k,
        "created": m.created,
        "versions": m.versions,
        "lineage": m.lineage_chain(),
        "head_part": m.head_part,
        "teacher_upscale": m.teacher_upscale,
        "views": m.views,
    }


def format_info(d: dict) -> str:
    """The human summary of :func:`info`."""
    def mb(x):
        return f"{x / 1e6:.2f} MB" if x >= 1e5 else f"{x / 1e3:.1f} kB"

    t = d.get("teacher") or {}
    arch = t.get("architecture") or {}
    region = d.get("region") or {}
    entries = region.get("assigners") or []
    assigners = ", ".join(f"topk={s.topk} iof={s.ignore_iof_thr} vlr={s.vlr_region} "
                          f"({'/'.join(e.get('models', []))})"
                          for e, s in zip(entries, map(entry_setting, entries)))
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
        *([f"head          {arch['head'].get('type')} {arch['head']}; class log-probs are of its "
           f"{d.get('cls_logits') or 'joint'} logits"] if arch.get("head") else []),
        f"region        {region.get('policy')}" + (f"  [{assigners}]" if assigners else ""),
        f"codec         {d['codec']}"
        + (f" (box step >= {d['codec_step']:g} nat)" if d.get("codec_step") else
           " (each row over its own range)" if d.get("codec") == "int8" else "")
        + f" + {d['compressor']}, class "
        f"{'logits' if d.get('cls_values') == 'logits' else 'log-probs'} "
        f"{'stored' if d['store_cls'] else 'not stored'}, {d['samples_per_shard']} samples/unit",
        "serves        " + ("; ".join(f"{k} ({', '.join(v)})" for k, v in d.get("serves", {}).items())
                             or "no distillation term"),
        f"stored        {mb(d['stored_bytes'])} in all, {mb(d['bytes_per_sample'])} per sample "
        f"(" + ", ".join(f"{k} {mb(v)}" for k, v in d["stored_bytes_by_part"].items()) + ")",
    ]
    if not d.get("stored_bytes_exact", True):
        lines.append(f"              (object store: sizes estimated from {d['stored_bytes_units_listed']} "
                     f"of {d['units_planned']} units, scaled by rows; not every object is listed)")
    if d["ratio_to_dense_fp16"] is not None:
        lines.append(f"vs dense fp16 {mb(d['dense_fp16_bytes_per_sample'])} per sample: ratio "
                     f"{d['ratio_to_dense_fp16']:.4f}, {d['compression_factor']:.1f}x smaller")
    per_level = " / ".join(f"{x:.1f}" for x in d["anchors_per_sample_per_level"])
    lines.append(f"anchors       {d['anchors_per_sample']:.1f} of {d['grid_anchors_per_sample']:.0f} "
                 f"per sample; per level (strides {d['strides']}): {per_level}")
    if d["codec_clip"] is not None:
        frac = d["clipped_fraction"]
        lines.append(f"clipping      values below -{d['codec_clip']:g} nats are stored as -{d['codec_clip']:g}: "
                     f"{frac * 100:.4f}% of the values of {d['stats_samples']} samples")
    if d["teacher_entropy_nats"] is not None:
        lines.append(f"entropy       {d['teacher_entropy_nats']:.3f} nats per edge distribution "
                     f"(max {d['max_entropy_nats']:.3f}; over {d['stats_samples']} samples)")
    hp = d.get("head_part")
    if hp:
        lines.append(f"CrossKD       teacher head part after conv {hp.get('idx')} "
                     f"({len(hp.get('sha256') or {})} parameters) and per-sample feature statistics")
    up = d.get("teacher_upscale")
    if up:
        lines.append(upscale_line(up, d["strides"]))
    vw = d.get("views")
    if vw:  # a cache of views ([[data.augment]], ldpipe.cache.views)
        lines.append(f"views         {vw.get('schedule')}: {vw.get('count')} "
                     f"{'epochs of one view per image' if vw.get('schedule') == 'epochs' else 'views per image'}"
                     f", seed {vw.get('seed')}; augment {', '.join(s.get('type', '?') for s in vw.get('augment') or [])}")
    lines.append("lineage       " + "\n              ".join(d["lineage"]))
    return "\n".join(lines)
