"""``ldpipe dump-teacher``: run the teacher once per (image, variant) and cache its outputs.

Work is split into units of ``samples_per_shard`` consecutive samples
(sample = ``ldpipe.data.sample_number``: image_index * num_variants + variant).  Each rank takes units
``u % world == rank``; a unit's batches never cross its boundary, so what a
unit holds does not depend on where an earlier run stopped.  Region indices
are computed in the loader workers on the CPU; the teacher runs batched (CUDA
with AMP when available); log-softmax and the gathers run on the device; a
writer thread encodes, compresses and commits finished units while the next
ones compute.  The cache format itself is ``ldpipe.cache``.

Pieces usable on their own (the benchmarks do): :func:`unit_batches` (which
samples go into which batch), :class:`DumpCollate`, :func:`teacher_rows` (one
batch through the teacher into stored rows) and :class:`UnitWriter`.
"""
from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time

import torch

from ..cache import codec as C
from ..cache import manifest as M
from ..cache.manifest import CacheError
from ..cache.places import Input, check_cache_out
from ..cache.region import manifest_entries, own_assigner_note, reader_settings, region_index
from ..cache.views import write_views
from ..cache.store import (SampleRows, assemble_unit, committed_units, create_or_resume,
                           head_part_shas, index_complete, open_root, write_head_part, write_index,
                           write_unit)
from ..cache.upscale import Upscale, upscale_plan
from ..config import AssignerConfig, ConfigError, DataConfig, Pipeline
from ..config.checks import check_run_args
from ..data import DetectionDataset, collate, load_split, padded_shape, sample_number, sample_pair
from ..data.schedule import dump_schedule
from ..data.upscale import UpscaledDataset
from ..models import GFL, load_detector
from ..models.anchors import grid_to_batch_index, make_grid
from ..models.checkpoint import file_sha256
from ..models.head_part import HeadPart
from ..distill.crosskd import image_moments
from . import runtime
from .dumplock import DumpLock
from .viewdump import dump_views

log = logging.getLogger("ldpipe.dump")


class DumpCollate:
    """Collate plus the region (own-grid anchor indices) of each sample."""

    def __init__(self, policy: str, strides, anchor_scale: float, assigners: list[AssignerConfig],
                 upscale: Upscale | None = None):
        self.policy, self.strides, self.anchor_scale = policy, list(strides), anchor_scale
        self.assigners, self.upscale = assigners, upscale

    def __call__(self, samples: list[dict]) -> dict:
        batch = collate(samples)
        if batch["skipped"]:  # the data set below never skips; kept for other callers
            raise CacheError(f"cannot dump undecodable images: {batch['skipped']}")
        batch["region"] = [region_index(self.policy, g, ig, m.pad_shape, self.strides,
                                        self.anchor_scale, self.assigners)
                           for g, ig, m in zip(batch["gt_boxes"], batch["ignore_boxes"], batch["metas"])]
        if self.upscale is not None:  # the student's grid; its levels without a counterpart dropped
            batch["teacher_img"] = torch.stack(batch["teacher_img"])  # one padded shape per batch
            batch["region"] = [idx[idx < self.upscale.served_count(m.pad_shape)]
                               for idx, m in zip(batch["region"], batch["metas"])]
        return batch


def unit_batches(data: DataConfig, split, variants, units: list[int], per_unit: int,
                 batch_size: int, shapes=None) -> list[list[tuple[int, int]]]:
    """The (image, variant) batches of the given units, in order.

    A batch holds samples of one padded shape only, so it adds no padding and what the
    teacher outputs for a sample does not depend on its batch-mates (GroupNorm and the
    P6/P7 convs see the padding).
    """
    nv = len(variants)
    total = len(split.records) * nv
    if shapes is None:  # (given: a view dump's, ldpipe.engine.viewdump)
        shapes = [padded_shape(r, v, data) for r in split.records for v in variants]
    batches = []
    for u in units:
        groups: dict[tuple[int, int], list[int]] = {}
        for s in range(u * per_unit, min((u + 1) * per_unit, total)):
            groups.setdefault(shapes[s], []).append(s)
        for shape in sorted(groups):
            samples = groups[shape]
            for i in range(0, len(samples), batch_size):
                batches.append([sample_pair(s, nv) for s in samples[i:i + batch_size]])
    return batches


def teacher_rows(model: GFL, batch: dict, device: torch.device, use_amp: bool, store_cls: bool,
                 num_variants: int, cls_values: str = "log_probs", reuse_idx: int = -1,
                 upscale: Upscale | None = None) -> list[SampleRows]:
    """Run the teacher on a batch and gather each sample's region rows (log-probabilities, CPU;
    class rows: the raw logits with ``cls_values="logits"``); ``reuse_idx >= 0``: also each
    sample's CrossKD feature moments (``SampleRows.featstats``, ``[L, 2, 2, C]`` float64: per
    level, tower and channel the sum and squared sum of the towers' input to that conv over
    the sample's positions; a dump batch holds one padded shape, so they are the image's own).
    ``upscale``: the teacher runs on ``batch["teacher_img"]`` and the region's student anchors
    read their counterparts (:meth:`~ldpipe.cache.upscale.Upscale.teacher_index`)."""
    img = batch["img" if upscale is None else "teacher_img"].to(device, non_blocking=True)
    with runtime.amp_context(device, use_amp):
        out = model(img) if reuse_idx < 0 else model(img, hold=reuse_idx)
    moments = None
    if reuse_idx >= 0:  # [B, L, 2 (cls, reg), 2 (sum, squares), C]
        moments = torch.stack([torch.stack([image_moments(c), image_moments(r)], dim=1)
                               for c, r in zip(*out.held)], dim=1).cpu()
    cfg = model.cfg
    rows = []
    for b, (meta, idx) in enumerate(zip(batch["metas"], batch["region"])):
        pad = meta.pad_shape if upscale is None else upscale.teacher_pad(meta.pad_shape)
        own = make_grid(pad, cfg.strides, cfg.anchor_scale)
        at = idx if upscale is None else upscale.teacher_index(meta.pad_shape)[idx]
        sel = grid_to_batch_index(list(own.sizes), out.level_sizes).to(device)[at.to(device)]
        box = C.log_probs(out.reg[b, sel]).cpu()
        cls = None
        if store_cls:
            cls = (out.cls[b, sel].float() if cls_values == "logits" else C.log_probs(out.cls[b, sel])).cpu()
        rows.append(SampleRows(sample_number(meta.index, meta.variant_index, num_variants), meta,
                               idx.to(torch.int32), box, cls,
                               featstats=moments[b] if moments is not None else None))
    return rows


def head_part_entry(model: GFL, idx: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """CrossKD (``cache.reused_head_idx``): the manifest's ``head_part`` entry and the tensors
    of the teacher's head part from conv ``idx`` on (:class:`~ldpipe.models.HeadPart`)."""
    cfg = model.cfg
    if cfg.head.type != "GFLHead":
        raise ConfigError(f"cache.reused_head_idx: CrossKD's head part is implemented for GFLHead "
                          f"teachers, this teacher has {cfg.head.type}")
    if not 0 <= idx < cfg.stacked_convs:
        raise ConfigError(f"cache.reused_head_idx must be in 0..{cfg.stacked_convs - 1} (the "
                          f"teacher's head has {cfg.stacked_convs} stacked convs), got {idx}")
    tensors = HeadPart.of_head(model.bbox_head, idx).tensors()
    entry = {"idx": idx, "channels": cfg.channels, "levels": len(cfg.strides),
             "stacked_convs": cfg.stacked_convs, "norm_groups": cfg.norm_groups,
             "sha256": head_part_shas(tensors)}
    return entry, tensors


class UnitWriter:
    """Encodes and commits finished units on ``threads`` background threads.

    Units are independent (each has its own group, arrays and commit), so several threads
    may write different units at once: encoding (torch), compression (zstd / blosc),
    checksums (crc32c, sha256) and file writes release the GIL, so the threads overlap on
    several cores.  The queue holds at most ``2 x threads`` finished units.
    """

    def __init__(self, root, compressor: str, chunk_rows: int, codec: str, num_variants: int,
                 threads: int = 1, url: str = "the cache", box_step: float = 0.0) -> None:
        self.root, self.compressor, self.chunk_rows, self.codec = root, compressor, chunk_rows, codec
        self.box_step = box_step
        self.num_variants, self.url = num_variants, url
        self.q: queue.Queue = queue.Queue(maxsize=2 * max(1, threads))
        self.error: BaseException | None = None
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(max(1, threads))]
        for t in self.threads:
            t.start()

    def put(self, u: int, items: list[SampleRows]) -> None:
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
                write_unit(self.root, u, assemble_unit(items, self.codec, self.num_variants, self.box_step),
                           self.compressor, self.chunk_rows, bind=True)
            except OSError as exc:  # a full disk, a lost mount: name it, keep what is committed
                self.error = write_failed(self.url, f"units/{u:06d}", exc)
            except BaseException as exc:  # surfaced in the main thread
                self.error = exc

    def close(self) -> None:
        for _ in self.threads:
            self.q.put(None)
        for t in self.threads:
            t.join()
        if self.error:
            raise self.error


def write_failed(url: str, what: str, exc: OSError) -> CacheError:
    """The one-line error of a failed write (ENOSPC, EIO, ...): which path, what is kept."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    path = f" ({exc.filename})" if exc.filename else ""
    return CacheError(f"{url}: writing {what} failed: {reason}{path}; every unit committed before "
                      "is kept (a unit is visible only once complete): make room and rerun the "
                      "same command to resume")


def read_places(pipe: Pipeline, checkpoint: str, split) -> list[Input]:
    """What a dump reads, which its ``--out`` must keep apart from: the checkpoint, and the
    data folder, annotation file (VOC: root) and image folders of the split, which may hold the
    cache below them but not be it or lie inside it (``ldpipe.cache.places``)."""
    places = [Input("the teacher checkpoint", checkpoint)]
    if pipe.data.root:
        places.append(Input("data.root", pipe.data.root, may_contain_out=True))
    if split.source:
        places.append(Input(f"the annotations of split {split.name!r}", split.source, may_contain_out=True))
    for folder in sorted({os.path.dirname(r.file_name) for r in split.records}):
        places.append(Input(f"an image folder of split {split.name!r}", folder, may_contain_out=True))
    return places


def dump_teacher(pipe: Pipeline, model_name: str, checkpoint: str, out: str, split_name: str = "train",
                 device: str | None = None, batch_size: int | None = None, workers: int | None = None,
                 amp: bool | None = None, overwrite: bool = False, progress: bool = True,
                 split=None, batch_times: list | None = None) -> dict:
    """Dump ``model_name`` (weights from ``checkpoint``) over ``split_name`` (or a given
    ``split``) into the cache at ``out``; resumes a cache made the same way.  ``batch_times``:
    a list that gets ``(seconds since the loop began, samples done)`` after each batch
    (``ldpipe cache plan`` times its pilot dump by it)."""
    check_run_args(batch_size, workers)
    info = runtime.init(device)
    cfg = pipe.model(model_name)
    cache_cfg = pipe.cache
    split = split if split is not None else load_split(pipe.data, split_name)
    check_cache_out(out, overwrite, read_places(pipe, checkpoint, split))  # before anything is written
    views = dump_views(pipe, split)  # [[data.augment]]: seeded views instead of the fixed variants
    if views is None:
        schedule = dump_schedule(pipe.data, len(split.records))  # what `ldpipe cache plan` counts too
        variants, nv, total = list(schedule.variants), schedule.num_variants, schedule.num_samples
    else:
        variants = views.slots()
        nv = len(variants)
        total = len(split.records) * nv
    per_unit = cache_cfg.samples_per_shard
    num_units = math.ceil(total / per_unit)
    readers = reader_settings(pipe, model_name)
    upscale = upscale_plan(pipe, model_name, [n for names in readers.values() for n in names])
    if upscale is not None and views is not None:
        raise ConfigError(f"{pipe.source}: cache.teacher_upscale = {pipe.cache.teacher_upscale} with "
                          "[[data.augment]] views is not supported (a view is composed at the "
                          "student's size); use one or the other")
    note = own_assigner_note(pipe, model_name, readers)
    if note and info.is_main:
        log.warning(note)

    model, ckpt_meta = load_detector(cfg, len(split.classes), checkpoint, info.device)
    manifest = M.build(pipe, model_name, checkpoint, file_sha256(checkpoint), ckpt_meta, split,
                       split_name, variants, manifest_entries(readers), num_units)
    if views is not None:
        views.mark(manifest, pipe)
    reuse_idx = cache_cfg.reused_head_idx
    head_tensors = None
    if reuse_idx >= 0:
        manifest.head_part, head_tensors = head_part_entry(model, reuse_idx)
        manifest.cache_id = manifest.compute_id()
    if upscale is not None:  # the rows are addressed on the student's grid (geometry.strides)
        manifest.geometry.strides, manifest.teacher_upscale = list(upscale.strides), upscale.entry()
        manifest.cache_id = manifest.compute_id()

    # one dump per --out at a time (rank 0 holds the lock for its whole torchrun job)
    lock = DumpLock(out) if info.is_main else None
    if lock is not None:
        lock.acquire()
    try:
        if info.is_main:
            create_or_resume(out, manifest, overwrite)
        runtime.barrier()
        root = open_root(out, "a")
        if views is not None and info.is_main:
            write_views(root, views.blob)  # before any unit: a reader of the rows finds them
        if head_tensors is not None and info.is_main:
            write_head_part(root, head_tensors)
        done = committed_units(root)
        mine = [u for u in range(num_units) if u % info.world_size == info.rank and u not in done]
        if info.is_main:
            log.info("%s: %d samples in %d units, %d already committed, %d to do on %d rank(s)",
                     out, total, num_units, len(done), num_units - len(done), info.world_size)

        batches = unit_batches(pipe.data, split, variants, mine, per_unit, batch_size or cache_cfg.batch_size,
                               views.shapes(split, pipe.data) if views is not None else None)
        loader = torch.utils.data.DataLoader(
            # a cache holds every sample: an undecodable image stops the dump, naming it
            views.dataset(split, pipe.data) if views is not None
            else DetectionDataset(split, pipe.data, variants, skip_undecodable=False) if upscale is None
            else UpscaledDataset(split, pipe.data, variants, upscale.factor), batch_sampler=batches,
            num_workers=pipe.train.workers if workers is None else workers,
            collate_fn=DumpCollate(cache_cfg.region, upscale.strides if upscale else cfg.strides,
                                   cfg.anchor_scale, list(readers), upscale),
            pin_memory=info.device.type == "cuda", worker_init_fn=runtime.worker_init)
        use_amp = (info.device.type == "cuda") if amp is None else (amp and info.device.type == "cuda")

        if cache_cfg.writer_threads < 1:
            raise ConfigError(f"cache.writer_threads must be at least 1, got {cache_cfg.writer_threads}")
        writer = UnitWriter(root, cache_cfg.compressor, manifest.chunk_rows, cache_cfg.codec, nv,
                            threads=cache_cfg.writer_threads, url=out, box_step=manifest.box_step)
        pending: dict[int, list[SampleRows]] = {}
        n_images = 0
        t0 = time.perf_counter()  # durations: monotonic, not the wall clock
        bar = runtime.progress_bar(total=sum(len(b) for b in batches), desc=f"dump {model_name}",
                                   unit="img", disable=not (progress and info.is_main))
        try:
            with torch.no_grad():
                for batch in loader:
                    for rows in teacher_rows(model, batch, info.device, use_amp, cache_cfg.store_cls, nv,
                                             cache_cfg.cls_values, reuse_idx, upscale=upscale):
                        u = rows.sample // per_unit
                        pending.setdefault(u, []).append(rows)
                        if len(pending[u]) == min((u + 1) * per_unit, total) - u * per_unit:
                            writer.put(u, pending.pop(u))
                    n_images += len(batch["metas"])
                    if batch_times is not None:
                        batch_times.append((time.perf_counter() - t0, n_images))
                    bar.update(len(batch["metas"]))
                    bar.set_postfix(img_s=f"{n_images / max(time.perf_counter() - t0, 1e-9):.1f}")
        finally:
            bar.close()
            writer.close()
        if pending:
            raise CacheError(f"{out}: units {sorted(pending)} were left incomplete (internal error)")
        runtime.barrier()
        summary = {"cache": out, "samples": total, "units": num_units, "rank_images": n_images,
                   "seconds": round(time.perf_counter() - t0, 3), "cache_id": manifest.cache_id}
        if info.is_main:
            committed = committed_units(root)
            missing = [u for u in range(num_units) if u not in committed]
            if missing:
                raise CacheError(f"{out}: units {missing[:10]} are not committed after the dump")
            if len(done) == num_units and index_complete(root, total):
                log.info("%s was already complete: nothing rewritten", out)  # a rerun is a no-op
            else:
                try:
                    write_index(root, cache_cfg.compressor)
                except OSError as exc:
                    raise write_failed(out, "index", exc) from None
                log.info("%s complete: %d samples", out, total)
    finally:
        if lock is not None:
            lock.release()
    return summary
