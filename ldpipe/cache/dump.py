"""``ldpipe dump-teacher``: run the teacher once per (image, variant) and cache its outputs.

Work is split into units of ``samples_per_shard`` consecutive samples
(sample = image_index * num_variants + variant).  Each rank takes units
``u % world == rank``; a unit's batches never cross its boundary, so what a
unit holds does not depend on where an earlier run stopped.  Region indices
are computed in the loader workers on the CPU; the teacher runs batched (CUDA
with AMP when available); log-softmax and the gathers run on the device; a
writer thread encodes, compresses and commits finished units while the next
ones compute.
"""
from __future__ import annotations

import logging
import math
import queue
import threading
import time

import numpy as np
import torch

from ..config import Pipeline
from ..data import DetectionDataset, collate, load_split, train_variants, variant_scale
from ..engine import dist
from ..engine.train import progress_bar, worker_init
from ..models import build_model
from ..models.assigner import make_grid
from ..models.boxes import grid_to_batch_index
from ..models.checkpoint import file_sha256, load_weights
from . import codec as C
from . import manifest as M
from .region import AssignerSpec, region_index
from .store import (SAMPLE_FIELDS, CacheError, UnitData, committed_units, open_root, pack_rows,
                    write_index, write_unit)

log = logging.getLogger("ldpipe.dump")


class DumpCollate:
    """Collate plus the region (own-grid anchor indices) of each sample."""

    def __init__(self, policy: str, strides, anchor_scale: float, assigners: list[AssignerSpec]):
        self.policy, self.strides, self.anchor_scale = policy, list(strides), anchor_scale
        self.assigners = assigners

    def __call__(self, samples: list[dict]) -> dict:
        batch = collate(samples)
        batch["region"] = [region_index(self.policy, g, ig, m["pad_shape"], self.strides,
                                        self.anchor_scale, self.assigners)
                           for g, ig, m in zip(batch["gt_boxes"], batch["ignore_boxes"], batch["metas"])]
        return batch


def reader_assigners(pipe: Pipeline, model_name: str) -> list[dict]:
    """Assigner settings of the models that will read the cache (``cache.readers``;
    default: every other model of the pipeline, or the teacher itself for Self-LD)."""
    names = list(pipe.cache.readers) or [n for n in pipe.models if n != model_name] or [model_name]
    out, seen = [], set()
    for n in names:
        a = pipe.model(n).assigner
        key = (a.topk, a.ignore_iof_thr)
        if key not in seen:
            seen.add(key)
            out.append({"topk": a.topk, "ignore_iof_thr": a.ignore_iof_thr, "models": [n]})
        else:
            next(o for o in out if (o["topk"], o["ignore_iof_thr"]) == key)["models"].append(n)
    return out


def padded_shape(record, variant, pipe: Pipeline) -> tuple[int, int]:
    """The padded input shape of a sample, from its annotation alone (no image decode)."""
    import mmcv
    w, h = mmcv.rescale_size((record.width, record.height), tuple(variant_scale(variant, pipe)))
    d = pipe.data.pad_divisor
    return (-(-h // d) * d, -(-w // d) * d)


def _unit_batches(units: list[int], per_unit: int, total: int, shapes: list[tuple[int, int]],
                  num_variants: int, batch_size: int) -> list[list[tuple[int, int]]]:
    """Batches of each unit, grouping samples of one padded shape only.

    A batch then adds no padding, so what the teacher outputs for a sample does not
    depend on its batch-mates (GroupNorm and the P6/P7 convs see the padding).
    """
    batches = []
    for u in units:
        groups: dict[tuple[int, int], list[int]] = {}
        for s in range(u * per_unit, min((u + 1) * per_unit, total)):
            groups.setdefault(shapes[s], []).append(s)
        for shape in sorted(groups):
            samples = groups[shape]
            for i in range(0, len(samples), batch_size):
                batches.append([(s // num_variants, s % num_variants) for s in samples[i:i + batch_size]])
    return batches


def dump_teacher(pipe: Pipeline, model_name: str, checkpoint: str, out: str, split_name: str = "train",
                 device: str | None = None, batch_size: int | None = None, workers: int | None = None,
                 amp: bool | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    info = dist.init(device)
    cfg = pipe.model(model_name)
    cache_cfg = pipe.cache
    split = load_split(pipe, split_name)
    variants = train_variants(pipe)
    nv = len(variants)
    total = len(split.records) * nv
    per_unit = cache_cfg.samples_per_shard
    num_units = math.ceil(total / per_unit)
    assigners = reader_assigners(pipe, model_name)

    model = build_model(cfg, len(split.classes))
    ckpt_meta = load_weights(model, checkpoint)
    sha = file_sha256(checkpoint)
    model.to(info.device).eval()
    manifest = M.build(pipe, model_name, checkpoint, sha, ckpt_meta, split, split_name, variants,
                       assigners, num_units)

    if info.is_main:
        _prepare_root(out, manifest, overwrite)
    dist.barrier()
    root = open_root(out, "a")
    done = committed_units(root)
    mine = [u for u in range(num_units) if u % info.world_size == info.rank and u not in done]
    if info.is_main:
        log.info("%s: %d samples in %d units, %d already committed, %d to do on %d rank(s)",
                 out, total, num_units, len(done), num_units - len(done), info.world_size)

    bs = batch_size or cache_cfg.batch_size
    specs = [AssignerSpec(a["topk"], a["ignore_iof_thr"]) for a in assigners]
    dataset = DetectionDataset(split, pipe, variants)
    shapes = [padded_shape(r, v, pipe) for r in split.records for v in variants]
    batches = _unit_batches(mine, per_unit, total, shapes, nv, bs)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=pipe.train.workers if workers is None else workers,
        collate_fn=DumpCollate(cache_cfg.region, cfg.strides, cfg.anchor_scale, specs),
        pin_memory=info.device.type == "cuda", worker_init_fn=worker_init)
    use_amp = (info.device.type == "cuda") if amp is None else (amp and info.device.type == "cuda")

    writer = _Writer(root, cache_cfg.compressor, manifest["chunk_rows"], cache_cfg.codec, nv)
    pending: dict[int, list] = {}
    n_images = 0
    t0 = time.time()
    bar = progress_bar(total=sum(len(b) for b in batches), desc=f"dump {model_name}", unit="img",
                       disable=not (progress and info.is_main))
    try:
        with torch.no_grad():
            for batch in loader:
                rows = _teacher_rows(model, batch, info.device, use_amp, cfg, cache_cfg.store_cls)
                for meta, scale_vals, row in rows:
                    s = meta["index"] * nv + variants.index(_variant_of(meta, variants))
                    u = s // per_unit
                    pending.setdefault(u, []).append((s, meta, scale_vals, row))
                    expected = min((u + 1) * per_unit, total) - u * per_unit
                    if len(pending[u]) == expected:
                        writer.put(u, pending.pop(u))
                n_images += len(batch["metas"])
                bar.update(len(batch["metas"]))
                bar.set_postfix(img_s=f"{n_images / max(time.time() - t0, 1e-9):.1f}")
    finally:
        bar.close()
        writer.close()
    if pending:
        raise CacheError(f"{out}: units {sorted(pending)} were left incomplete (internal error)")
    dist.barrier()
    summary = {"cache": out, "samples": total, "units": num_units, "rank_images": n_images,
               "seconds": round(time.time() - t0, 3), "cache_id": manifest["cache_id"]}
    if info.is_main:
        committed = committed_units(root)
        missing = [u for u in range(num_units) if u not in committed]
        if missing:
            raise CacheError(f"{out}: units {missing[:10]} are not committed after the dump")
        if len(done) == num_units and _index_complete(root, total):
            log.info("%s was already complete: nothing rewritten", out)  # a rerun is a no-op
        else:
            write_index(root, cache_cfg.compressor)
            log.info("%s complete: %d samples", out, total)
    return summary


def _variant_of(meta: dict, variants):
    return next(v for v in variants if v.key == meta["variant"])


def _teacher_rows(model, batch: dict, device: torch.device, use_amp: bool, cfg, store_cls: bool):
    """Per sample: (meta, scale factor, (anchor idx, box log-probs, cls log-probs)) on the CPU."""
    img = batch["img"].to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
        cls_maps, reg_maps = model(img)
    head = model.bbox_head
    sizes = [tuple(m.shape[-2:]) for m in cls_maps]
    cls_flat = head.flatten(cls_maps).float()
    reg_flat = head.flatten(reg_maps).float()
    out = []
    for b, (meta, idx) in enumerate(zip(batch["metas"], batch["region"])):
        own = make_grid(meta["pad_shape"], cfg.strides, cfg.anchor_scale)
        to_batch = grid_to_batch_index(list(own.sizes), sizes).to(device)
        sel = to_batch[idx.to(device)]
        box = C.log_probs(reg_flat[b, sel].reshape(-1, 4, cfg.reg_max + 1)).cpu()
        cls = C.log_probs(cls_flat[b, sel]).cpu() if store_cls else None
        out.append((meta, meta["scale_factor"], (idx.to(torch.int32), box, cls)))
    return out


class _Writer:
    """Encodes and commits finished units on a background thread."""

    def __init__(self, root, compressor: str, chunk_rows: int, codec: str, num_variants: int) -> None:
        self.root, self.compressor, self.chunk_rows, self.codec = root, compressor, chunk_rows, codec
        self.num_variants = num_variants
        self.q: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def put(self, u: int, items: list) -> None:
        if self.error:
            raise self.error
        self.q.put((u, items))

    def _run(self) -> None:
        while True:
            job = self.q.get()
            if job is None:
                return
            if self.error:
                continue
            try:
                u, items = job
                write_unit(self.root, u, assemble(items, self.codec, self.num_variants), self.compressor, self.chunk_rows)
            except BaseException as exc:  # surfaced in the main thread
                self.error = exc

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        if self.error:
            raise self.error


def assemble(items: list, codec: str, num_variants: int) -> UnitData:
    """Sort a unit's samples and pack them into the unit arrays."""
    items = sorted(items, key=lambda t: t[0])
    table = np.zeros((len(items), len(SAMPLE_FIELDS)), dtype=np.int64)
    scale = np.zeros((len(items), 2), dtype=np.float64)
    anchors, boxes, classes = [], [], []
    start = 0
    has_cls = items[0][3][2] is not None if items else False
    for i, (s, meta, sf, (idx, box, cls)) in enumerate(items):
        n = int(idx.shape[0])
        ih, iw = meta["img_shape"]
        ph, pw = meta["pad_shape"]
        oh, ow = meta["ori_shape"]
        table[i] = [s, meta["index"], meta["image_id"], s % num_variants, start, n, ih, iw, ph, pw,
                    int(meta["flip"]), oh, ow]
        scale[i] = sf
        anchors.append(idx.numpy())
        boxes.append(box)
        if has_cls:
            classes.append(cls)
        start += n
    anchor = np.concatenate(anchors).astype(np.int32) if anchors else np.zeros(0, np.int32)
    box = pack_rows(C.encode(torch.cat(boxes), codec)) if boxes else None
    cls = pack_rows(C.encode(torch.cat(classes), codec)) if has_cls else None
    return UnitData(table, scale, anchor, box, cls)


def _index_complete(root, total: int) -> bool:
    try:
        g = root["index"] if "index" in root else None
        return bool(g is not None and g.attrs.get("complete") and g["samples"].shape[0] == total)
    except Exception:
        return False


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


def _prepare_root(out: str, manifest: dict, overwrite: bool) -> None:
    import zarr
    try:
        root = open_root(out, "r")
        existing = root.attrs.get("ldpipe_cache")
    except (CacheError, zarr.errors.ContainsArrayError):
        root, existing = None, None
        # zarr's mode "w" below deletes whatever is there: never do that to a location
        # that holds something other than a zarr group unless asked to
        if not overwrite and _has_content(out):
            raise CacheError(f"{out} exists, is not empty and is not an ldpipe cache; refusing to "
                             "write into it (use another --out, or --overwrite to delete its contents)")
    if existing is not None and not overwrite:
        diff = M.identity_diff(existing, manifest)
        if diff:
            raise CacheError(f"{out} already holds a cache made differently; refusing to mix:\n  "
                             + "\n  ".join(diff)
                             + "\nUse another --out, or --overwrite to replace it.")
        return  # resume into it
    if root is not None and existing is None and not overwrite:
        if len(list(root.keys())):
            raise CacheError(f"{out} exists and is not an ldpipe cache; use another --out")
    g = zarr.open_group(out, mode="w", zarr_format=3)
    g.attrs["ldpipe_cache"] = manifest
