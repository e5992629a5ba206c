"""``ldpipe cache plan``: what a dump will store, weigh and cost, before the teacher runs.

1. **Samples**: the dump's own schedule (:func:`ldpipe.data.schedule.dump_schedule`, which
   ``dump-teacher`` uses too), so the plan and the dump count the same samples and units.
2. **Rows**: the region policy's stored anchors per sample, computed by the dump's own collate
   (:class:`~ldpipe.engine.dump.DumpCollate`) from the ground truth of every sample (up to
   ``count_samples``; beyond, a seeded subset scaled to all).  No network runs for this.
3. **Bytes**: a few seeded images (all their samples) are dumped for real - the dump code,
   region, codec and compressor - into a temporary folder; the bytes of what it stored are
   scaled by what each object grows with (:mod:`ldpipe.cache.sizing`: rows, samples, units)
   to the whole schedule.  With ``checkpoint`` the teacher's real outputs are compressed;
   without one a random-init teacher's, whose near-uniform distributions compress
   differently: the estimate is then rougher (the plan says so).
4. **Time**: the pilot dump is timed as the dump times itself (its ``seconds``: the loop -
   loading, teacher, writing - without model loading and the final index), batch by batch:
   the batches after the loader's head start (the first, and the two each loader worker
   prefetches) give a per-sample rate, the rest (start-up, the last unit's writing) a fixed part; the estimate is ``fixed + samples x rate`` on the
   device named.  The pilot's images are those of whole, seeded batches of the real dump
   (:func:`~ldpipe.engine.dump.unit_batches`), so its batches are as full as the dump's.

Nothing is written outside the temporary folder, which is removed at the end; ``out`` (the
cache's future place) is only looked at: is it free, does it hold a cache, is there room.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..cache.manifest import CacheError
from ..cache.places import check_cache_out
from ..cache.region import reader_settings
from ..cache.sizing import root_metadata_bytes, size_model
from ..cache.store import open_cache
from ..config import ConfigError, Pipeline
from ..config.checks import check_run_args
from ..data import DetectionDataset, load_split, sample_number
from ..data.schedule import DumpSchedule, dump_schedule
from ..files import local_path
from ..models import build_model, load_detector
from ..models.checkpoint import save_checkpoint
from .bench import cpu_name
from .dump import DumpCollate, dump_teacher, read_places, unit_batches
from . import runtime
from .runtime import resolve_device

# the pilot holds the images of at least this many of the dump's batches: the rate is timed on
# the batches after the loader's head start (the first, and the 2 per worker it prefetches)
MIN_PILOT_BATCHES = 8
RANDOM_NOTE = ("no --checkpoint: a random-init teacher was dumped; compression depends on the "
               "teacher's outputs, so the bytes estimate is rougher than with the trained teacher "
               "(on the demo data a random teacher's cache is less than half a trained one's: "
               "docs/benchmarks.md, \"Planning a dump\")")


@dataclass(frozen=True)
class PilotRun:
    """The timed pilot dump."""

    images: int
    samples: int
    batches: int
    seconds: float  # the dump's own ``seconds``
    # the samples of the batches after the first 1 + 2 x workers (the loader's head start: the
    # first batch, and the batches its workers prefetch), and their seconds: the rate
    steady_samples: int
    steady_seconds: float


@dataclass(frozen=True)
class OutPlace:
    """The cache's future place, looked at (nothing written)."""

    path: str
    holds_cache: bool  # a cache is there already (a dump would resume or refuse)
    free_bytes: int | None  # free space of its file system (local paths), else None


@dataclass(frozen=True)
class CachePlan:
    """What ``cache plan`` found (``to_json`` is the ``--json`` output)."""

    pipeline: str
    model: str
    split: str
    schedule: str  # DumpSchedule.kind
    schedule_text: str
    images: int
    variants: list[str]
    samples: int
    units: int
    samples_per_shard: int
    region: str
    codec: str
    compressor: str
    teacher: str  # the checkpoint, or "random init (seed N)"
    random_init: bool
    rows: int  # stored rows of the whole cache (exact when rows_exact)
    rows_counted: int  # samples whose rows were counted
    rows_exact: bool
    bytes: int  # stored bytes, as ``ldpipe cache info``'s stored_bytes
    bytes_by_part: dict[str, int]
    bytes_per_sample: float
    pilot_images: int
    pilot_samples: int
    pilot_bytes: int
    seconds: float  # estimated dump seconds (as the dump's own ``seconds``)
    seconds_per_sample: float
    fixed_seconds: float
    pilot: PilotRun
    # seconds per sample of the loader's work alone (read, resize, region: counting the rows with
    # ``workers`` loader workers); the dump overlaps it with the teacher where cores are free
    loader_seconds_per_sample: float
    dump_batch: float  # mean samples per batch of the real dump (the pilot's: pilot.samples / batches)
    device: str
    device_name: str
    threads: int
    plan_seconds: float  # what the plan itself took
    out: OutPlace | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def count_rows(pipe: Pipeline, model_name: str, split, schedule: DumpSchedule, samples: list[int],
               workers: int) -> dict[int, int]:
    """Sample number -> stored rows, for ``samples``, by the dump's own collate (its region
    indices); images are read and resized as the dump reads them, no network runs."""
    cfg = pipe.model(model_name)
    collate = DumpCollate(pipe.cache.region, cfg.strides, cfg.anchor_scale,
                          list(reader_settings(pipe, model_name)))
    loader = torch.utils.data.DataLoader(
        DetectionDataset(split, pipe.data, list(schedule.variants), skip_undecodable=False),
        batch_sampler=[[schedule.pair(s)] for s in samples], num_workers=workers,
        collate_fn=_RowCount(collate, schedule.num_variants), worker_init_fn=runtime.worker_init)
    rows: dict[int, int] = {}
    for sample, n in loader:
        rows[sample] = n
    return rows


class _RowCount:
    """A loader collate: ``(sample number, rows)`` of a one-sample batch."""

    def __init__(self, collate: DumpCollate, num_variants: int) -> None:
        self.collate, self.num_variants = collate, num_variants

    def __call__(self, samples: list[dict]) -> tuple[int, int]:
        batch = self.collate(samples)
        meta = batch["metas"][0]
        return int(sample_number(meta.index, meta.variant_index, self.num_variants)), \
            int(batch["region"][0].numel())


def look_at_out(out: str, pipe: Pipeline, checkpoint: str | None, split) -> OutPlace:
    """Refuse ``out`` as the dump would (:func:`~ldpipe.cache.places.check_cache_out`) and
    say what is there; writes nothing."""
    places = read_places(pipe, checkpoint or "", split)
    check_cache_out(out, False, places if checkpoint else places[1:])  # [0]: the checkpoint
    try:
        open_cache(out)
        holds = True
    except CacheError:
        holds = False
    free, path = None, local_path(out)
    if path is not None:
        path = os.path.abspath(path or ".")
        while not os.path.exists(path):  # the nearest folder that is there (it may not be yet)
            path = os.path.dirname(path)
        free = int(shutil.disk_usage(path).free)
    return OutPlace(out, holds, free)


def plan_cache(pipe: Pipeline, model_name: str = "teacher", checkpoint: str | None = None,
               split_name: str = "train", pilot_images: int = 16, count_samples: int = 2000,
               seed: int = 0, device: str | None = None, batch_size: int | None = None,
               workers: int | None = None, amp: bool | None = None, out: str | None = None) -> CachePlan:
    """The :class:`CachePlan` of dumping ``model_name`` over ``split_name`` (see the module doc)."""
    t_start = time.perf_counter()
    check_run_args(batch_size, workers)
    if pipe.data.augment:  # the pilot dumps a subset of the images; a view names split positions
        raise ConfigError(f"{pipe.source}: cache plan does not plan a cache of [[data.augment]] views "
                          "yet (only the fixed train_scales x flip variants)")
    if pilot_images < 1 or count_samples < 1:
        raise ConfigError(f"cache plan: --pilot-images and --count-samples must be >= 1, got "
                          f"{pilot_images} and {count_samples}")
    cfg = pipe.model(model_name)
    dev = resolve_device(device)
    split = load_split(pipe.data, split_name)
    if not split.records:
        raise ConfigError(f"cache plan: split {split_name!r} of {pipe.data.root} has no images")
    if checkpoint is not None:  # a checkpoint that does not match fails here, in one line
        load_detector(cfg, len(split.classes), checkpoint, torch.device("cpu"))
    place = look_at_out(out, pipe, checkpoint, split) if out else None
    schedule = dump_schedule(pipe.data, len(split.records))
    n, per_unit = schedule.num_samples, pipe.cache.samples_per_shard
    units = math.ceil(n / per_unit)
    nworkers = pipe.train.workers if workers is None else workers
    rng = np.random.default_rng(seed)

    counted = list(range(n)) if n <= count_samples else sorted(
        int(s) for s in rng.choice(n, count_samples, replace=False))
    t_rows = time.perf_counter()
    rows_of = count_rows(pipe, model_name, split, schedule, counted, nworkers)
    load_rate = (time.perf_counter() - t_rows) / len(counted)
    rows = int(sum(rows_of.values())) if n <= count_samples else int(round(
        sum(rows_of.values()) * n / len(counted)))

    batches = unit_batches(pipe.data, split, list(schedule.variants), list(range(units)), per_unit,
                           batch_size or pipe.cache.batch_size)
    picks = pilot_images_of(batches, pilot_images, rng)
    notes = [] if checkpoint is not None else [RANDOM_NOTE]
    if n > count_samples:
        notes.append(f"rows counted on {len(counted)} of {n} samples (seeded), scaled to all")
    run, model_bytes, manifest = _pilot(pipe, model_name, checkpoint, split, picks, seed, dict(
        device=device, batch_size=batch_size, workers=workers, amp=amp))

    manifest.data = dataclasses.replace(manifest.data, fingerprint=split.fingerprint,
                                        num_images=len(split.records),
                                        image_ids=[int(i) for i in split.image_ids])
    manifest.num_samples, manifest.num_units = n, units
    by_part = model_bytes.estimate(n, rows, units, root_metadata_bytes(manifest))
    total = int(sum(by_part.values()))

    rate, fixed = _rate(run)
    if run.steady_samples == 0:
        notes.append("the pilot was one batch: no start-up time separated (more --pilot-images)")
    return CachePlan(
        pipeline=pipe.source, model=model_name, split=split_name, schedule=schedule.kind,
        schedule_text=schedule.describe(), images=schedule.num_images,
        variants=[v.key for v in schedule.variants], samples=n, units=units,
        samples_per_shard=per_unit, region=pipe.cache.region, codec=pipe.cache.codec,
        compressor=pipe.cache.compressor,
        teacher=checkpoint if checkpoint is not None else f"random init (seed {seed})",
        random_init=checkpoint is None, rows=rows, rows_counted=len(counted),
        rows_exact=n <= count_samples, bytes=total, bytes_by_part=by_part,
        bytes_per_sample=total / n, pilot_images=len(picks), pilot_samples=model_bytes.samples,
        pilot_bytes=model_bytes.total, seconds=round(fixed + n * rate, 3),
        seconds_per_sample=rate, fixed_seconds=round(fixed, 3), pilot=run,
        loader_seconds_per_sample=load_rate,
        dump_batch=n / max(len(batches), 1),
        device=str(dev), device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name(),
        threads=torch.get_num_threads(), plan_seconds=round(time.perf_counter() - t_start, 3),
        out=place, notes=notes)


def pilot_images_of(batches: list[list[tuple[int, int]]], count: int, rng,
                    min_batches: int = MIN_PILOT_BATCHES) -> list[int]:
    """At least ``count`` image indices and the images of at least ``min_batches`` batches
    (all, if fewer): those of whole batches of the real dump drawn in a seeded order, so the
    pilot's batches are as full as the dump's."""
    picked: set[int] = set()
    for k, b in enumerate(rng.permutation(len(batches))):
        if len(picked) >= count and k >= min_batches:
            break
        picked.update(int(i) for i, _ in batches[int(b)])
    return sorted(picked)


def _pilot(pipe: Pipeline, model_name: str, checkpoint: str | None, split, picks: list[int],
           seed: int, dump_args: dict):
    """Dump the images ``picks`` (every sample of each) into a temporary folder, removed at
    the end: the timed run, the :class:`~ldpipe.cache.sizing.SizeModel` and the manifest."""
    quiet = logging.getLogger("ldpipe.dump")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    tmp = tempfile.mkdtemp(prefix="ldpipe-plan-")
    try:
        if checkpoint is None:
            checkpoint = os.path.join(tmp, "random_teacher.pth")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = build_model(pipe.model(model_name), len(split.classes))
            save_checkpoint(checkpoint, model, {})
        sub = dataclasses.replace(split, records=[split.records[i] for i in picks],
                                  image_ids=[split.image_ids[i] for i in picks])
        out, times = os.path.join(tmp, "pilot"), []
        summary = dump_teacher(pipe, model_name, checkpoint, out, split=sub, progress=False,
                               batch_times=times, **dump_args)
        workers = pipe.train.workers if dump_args.get("workers") is None else dump_args["workers"]
        head = max(0, min(2 * workers, len(times) - 2))  # the last batch of the loader's head start
        start_s, start_n = times[head] if head < len(times) - 1 else times[-1]
        run = PilotRun(len(picks), int(summary["samples"]), len(times), float(summary["seconds"]),
                       times[-1][1] - start_n, times[-1][0] - start_s)
        return run, size_model(out), open_cache(out)[1]
    finally:
        quiet.setLevel(level)
        shutil.rmtree(tmp, ignore_errors=True)


def _rate(run: PilotRun) -> tuple[float, float]:
    """``(seconds per sample, fixed seconds)`` of a timed pilot: the rate of the batches after
    the first, the rest of its seconds fixed; a one-batch pilot's mean, nothing fixed."""
    if run.steady_samples > 0 and run.steady_seconds > 0:
        rate = run.steady_seconds / run.steady_samples
        return rate, max(0.0, run.seconds - run.samples * rate)
    return run.seconds / max(run.samples, 1), 0.0


def _mb(x: float) -> str:
    return f"{x / 1e9:.2f} GB" if x >= 1e9 else f"{x / 1e6:.2f} MB" if x >= 1e5 else f"{x / 1e3:.1f} kB"


def _duration(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def format_plan(p: CachePlan) -> str:
    """The human table of a plan."""
    parts = ", ".join(f"{k} {_mb(v)}" for k, v in p.bytes_by_part.items())
    r = p.pilot
    rows_how = "counted on every sample" if p.rows_exact else f"counted on {p.rows_counted} samples"
    lines = [
        f"plan          {p.model} over split {p.split!r} of {p.pipeline}",
        f"samples       {p.samples} = {p.schedule_text}; {p.units} units of {p.samples_per_shard}",
        f"teacher       {p.teacher}",
        f"region/codec  {p.region}, {p.codec} + {p.compressor}: {p.rows} rows "
        f"({p.rows / p.samples:.1f} per sample, {rows_how})",
        f"bytes         {_mb(p.bytes)} ({_mb(p.bytes_per_sample)} per sample): {parts}",
        f"              from a real dump of {p.pilot_samples} samples ({p.pilot_images} images, "
        f"{_mb(p.pilot_bytes)})",
        f"dump time     {_duration(p.seconds)} on {p.device} ({p.device_name}, {p.threads} torch thread{'s' if p.threads != 1 else ''}): "
        f"{1000 * p.seconds_per_sample:.1f} ms per sample + {p.fixed_seconds:.1f} s start-up",
        f"              from the pilot: {r.samples} samples in {r.batches} batches "
        f"({r.samples / r.batches:.1f} per batch; the dump's {p.dump_batch:.1f}), {r.seconds:.2f} s; "
        f"the loader's work alone {1000 * p.loader_seconds_per_sample:.1f} ms per sample",
    ]
    if p.out is not None:
        free = "" if p.out.free_bytes is None else f"; {_mb(p.out.free_bytes)} free there" + (
            "" if p.out.free_bytes >= p.bytes else " - NOT ENOUGH for this cache")
        lines.append(f"out           {p.out.path}: "
                     f"{'holds a cache already' if p.out.holds_cache else 'no cache there yet'}{free}")
    lines += [f"note          {n}" for n in p.notes]
    lines.append(f"(the plan took {p.plan_seconds:.1f} s; nothing was written outside a temporary folder)")
    return "\n".join(lines)


__all__ = ["CachePlan", "OutPlace", "PilotRun", "count_rows", "format_plan", "pilot_images_of",
           "plan_cache"]
