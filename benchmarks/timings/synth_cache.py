"""Synthetic teacher caches of real size and shape, written through the real writer.

No teacher runs: each sample gets a realistic geometry (COCO-like 640x480 / 480x640 /
640x427 images resized to 1333x800 and padded to 32), ``rows`` sorted unique own-grid
anchor indices, and peaked synthetic edge / class log-probabilities.  The rows go through
the very functions the dump uses (``assemble_unit`` -> ``codec.encode`` -> ``write_unit``
with its sha256 commit and shard bindings, then ``write_index``), so the stored format,
compression and the commit protocol are the real ones; only the values are synthetic.

``build`` writes ``images x variants`` samples; ``full_units`` units, evenly spread (all by
default), get ``rows`` rows per sample (drawn per sample in ``rows``'s range), the other units
``small_rows`` (a disk-size knob for COCO-sized caches: the index and metadata of every sample stay full
size and real, the row payload of those units is small).
"""
from __future__ import annotations

import hashlib
import math
import time
from types import SimpleNamespace

import numpy as np
import torch

from ldpipe.cache import manifest as M
from ldpipe.cache.store import SampleRows, assemble_unit, create_or_resume, open_root, write_index, write_unit
from ldpipe.config import load_pipeline

from ..common import REPO

ORI_SHAPES = ((480, 640), (640, 480), (427, 640))  # (h, w) of COCO-like originals
SCALE = (1333, 800)


def pipeline(num_classes: int, per_unit: int, compressor: str = "zstd", codec: str = "int8",
             chunk_rows: int = 1024):
    """The demo pipeline at mmdetection's 1333x800 with 2 variants (no flip / flip)."""
    return load_pipeline(str(REPO / "pipelines" / "demo.toml"), [
        "data.train_scales=[[1333,800]]", "data.flip=true", f"cache.samples_per_shard={per_unit}",
        f"cache.compressor={compressor}", f"cache.codec={codec}", "cache.region=ld",
        f"cache.chunk_rows={chunk_rows}"])


def geometry(ori: tuple[int, int], pad_div: int = 32) -> dict:
    """mmcv keep-ratio rescale of ``ori`` (h, w) into 1333x800, padded to ``pad_div``."""
    oh, ow = ori
    f = min(max(SCALE) / max(oh, ow), min(SCALE) / min(oh, ow))
    ih, iw = int(oh * f + 0.5), int(ow * f + 0.5)
    ph, pw = -(-ih // pad_div) * pad_div, -(-iw // pad_div) * pad_div
    return {"img_shape": (ih, iw), "pad_shape": (ph, pw), "ori_shape": (oh, ow),
            "scale_factor": (iw / ow, ih / oh)}


class RowPool:
    """A pool of peaked synthetic log-probability rows (a trained teacher's edges peak on one or
    two bins; its classes on one), sliced at random offsets per sample."""

    def __init__(self, num_classes: int, reg_bins: int = 17, size: int = 16384, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        bins = torch.arange(reg_bins, dtype=torch.float32)
        mu = torch.rand(size, 4, 1, generator=g) * (reg_bins - 1)
        sharp = 0.2 + 0.8 * torch.rand(size, 4, 1, generator=g)
        logits = -sharp * (bins - mu) ** 2 + 0.3 * torch.randn(size, 4, reg_bins, generator=g)
        self.box = torch.log_softmax(logits, dim=-1)
        cls = torch.randn(size, num_classes, generator=g) - 6
        cls[torch.arange(size), torch.randint(num_classes, (size,), generator=g)] += 8
        self.cls = torch.log_softmax(cls, dim=-1)
        self.size = size

    def take(self, n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.from_numpy((rng.integers(self.size) + np.arange(n)) % self.size)
        return self.box[idx], self.cls[idx]


def num_anchors(pad_shape, strides=(8, 16, 32, 64, 128)) -> int:
    return sum(math.ceil(pad_shape[0] / s) * math.ceil(pad_shape[1] / s) for s in strides)


def sample_rows(s: int, nv: int, rows: int, pool: RowPool, rng: np.random.Generator,
                image_ids: list[int]) -> SampleRows:
    i, v = divmod(s, nv)
    g = geometry(ORI_SHAPES[i % len(ORI_SHAPES)])
    n_grid = num_anchors(g["pad_shape"])
    rows = min(rows, n_grid)
    # runs of neighbouring anchors (objects), as a real region is
    anchor = np.unique(rng.integers(0, n_grid, rows))
    while anchor.size < rows:
        anchor = np.unique(np.concatenate([anchor, rng.integers(0, n_grid, rows - anchor.size)]))
    box, cls = pool.take(rows, rng)
    meta = {"index": i, "image_id": image_ids[i], "flip": bool(v % 2), "variant_index": v, **g}
    return SampleRows(s, meta, torch.from_numpy(anchor.astype(np.int32)), box, cls)


def fake_split(num_images: int, num_classes: int):
    ids = list(range(1, num_images + 1))
    fp = hashlib.sha256(f"synthetic-{num_images}-{num_classes}".encode()).hexdigest()
    return SimpleNamespace(records=[None] * num_images, classes=[f"c{k}" for k in range(num_classes)],
                           fingerprint=fp, image_ids=ids)


def make_manifest(pipe, num_images: int, num_classes: int):
    from ldpipe.data import train_variants
    variants = train_variants(pipe.data)
    total = num_images * len(variants)
    per_unit = pipe.cache.samples_per_shard
    assigners = [{"topk": 9, "ignore_iof_thr": -1.0, "vlr_region": "reference", "models": ["student"]}]
    return M.build(pipe, "teacher", "synthetic.pth", "0" * 64, {}, fake_split(num_images, num_classes),
                   "train", variants, assigners, math.ceil(total / per_unit))


def unit_items(u: int, m, rows_range: tuple[int, int], pool: RowPool, seed: int = 0) -> list[SampleRows]:
    rng = np.random.default_rng([seed, u])
    per, total, nv = m.samples_per_shard, m.num_samples, m.num_variants
    lo, hi = rows_range
    return [sample_rows(s, nv, int(rng.integers(lo, hi + 1)), pool, rng, m.data.image_ids)
            for s in range(u * per, min((u + 1) * per, total))]


def full_unit_set(num_units: int, full_units: int | None) -> set[int]:
    """The units that get realistic row counts: all, or ``full_units`` evenly spread."""
    if full_units is None or full_units >= num_units:
        return set(range(num_units))
    return set(np.unique(np.linspace(0, num_units - 1, max(full_units, 0)).round().astype(int)).tolist())


def build(out: str, images: int, num_classes: int = 80, per_unit: int = 64,
          rows: tuple[int, int] = (2500, 4200), full_units: int | None = None,
          small_rows: tuple[int, int] = (8, 16), compressor: str = "zstd", progress=None,
          chunk_rows: int = 1024, bind: bool = True) -> dict:
    """Write a synthetic ``ld``/int8 cache of ``images`` x 2 variants at ``out``; returns
    counts and the seconds it took (``bind``: commit shard bindings, as the dump does)."""
    pipe = pipeline(num_classes, per_unit, compressor, chunk_rows=chunk_rows)
    m = make_manifest(pipe, images, num_classes)
    create_or_resume(out, m, overwrite=True)
    root = open_root(out, "a")
    pool = RowPool(num_classes)
    full = full_unit_set(m.num_units, full_units)
    t0, total_rows = time.perf_counter(), 0
    for u in range(m.num_units):
        items = unit_items(u, m, rows if u in full else small_rows, pool)
        data = assemble_unit(items, m.codec, m.num_variants, m.box_step)
        write_unit(root, u, data, m.compressor, m.chunk_rows, bind=bind)
        total_rows += int(data.anchor.shape[0])
        if progress:
            progress(u + 1, m.num_units)
    write_index(root, m.compressor)
    return {"samples": m.num_samples, "units": m.num_units, "full_units": sorted(full),
            "rows": total_rows, "write_s": time.perf_counter() - t0}


def build_index_only(out: str, images: int, num_classes: int = 80, per_unit: int = 256,
                     rows: tuple[int, int] = (2500, 4200), compressor: str = "zstd") -> dict:
    """Only the root manifest and a complete, full-size ``index/`` (no units): what a reader
    opens.  Enough to measure opening at any size in seconds; nothing else can read it."""
    from ldpipe.cache.manifest import F, SAMPLE_FIELDS
    from ldpipe.cache.store import _compressors
    pipe = pipeline(num_classes, per_unit, compressor)
    m = make_manifest(pipe, images, num_classes)
    create_or_resume(out, m, overwrite=True)
    root = open_root(out, "a")
    n, nv = m.num_samples, m.num_variants
    s = np.arange(n, dtype=np.int64)
    img = s // nv
    geo = [geometry(o) for o in ORI_SHAPES]
    which = img % len(ORI_SHAPES)
    table = np.zeros((n, len(SAMPLE_FIELDS)), np.int64)
    counts = np.random.default_rng(0).integers(rows[0], rows[1] + 1, n)
    unit = s // per_unit
    starts = np.zeros(n, np.int64)
    for u in range(m.num_units):  # rows restart at 0 in every unit
        sl = slice(u * per_unit, min((u + 1) * per_unit, n))
        starts[sl] = np.concatenate([[0], np.cumsum(counts[sl])[:-1]])
    cols = {"sample": s, "image_index": img, "image_id": img + 1, "variant": s % nv,
            "row_start": starts, "row_count": counts, "flip": s % nv}
    for k, key in (("img_h", ("img_shape", 0)), ("img_w", ("img_shape", 1)), ("pad_h", ("pad_shape", 0)),
                   ("pad_w", ("pad_shape", 1)), ("ori_h", ("ori_shape", 0)), ("ori_w", ("ori_shape", 1))):
        cols[k] = np.array([g[key[0]][key[1]] for g in geo])[which]
    for k, v in cols.items():
        table[:, F[k]] = v
    scale = np.array([g["scale_factor"] for g in geo])[which]
    g = root.create_group("index")
    for name, arr in (("samples", table), ("scale", scale), ("unit", unit)):
        z = g.create_array(name, shape=arr.shape, dtype=arr.dtype, chunks=arr.shape,
                           compressors=_compressors(compressor), fill_value=0,
                           config={"write_empty_chunks": True})
        z[...] = arr
    g.attrs["complete"] = True
    return {"samples": n, "units": m.num_units}
