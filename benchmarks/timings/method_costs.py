"""What each distillation method costs a training step: plain GFL vs LD v2, BCKD and CrossKD,
each from its own cache, on one pipeline's student, timed alternately in one process.

    python -m benchmarks.timings.method_costs PIPELINE --ld LD.zarr --bckd DENSE.zarr \
        --crosskd CROSSKD.zarr [--batches 6] [--rounds 4] [--threads 1] [--json OUT] [-o KEY=VALUE ...]

Every method gets its own student (the same seed-0 initial weights) and optimizer, the same
``--batches`` training batches (the first ones of the training split, ``train.batch_size``
each, with that method's cache rows fetched beforehand by its ``CacheTargets``: loader work is
not timed) and runs ``ldpipe.engine.step.TrainStep`` - the step ``train`` runs.  Rounds
alternate the methods (rotated each round) so load drift hits all of them alike; the report
is each method's median step time, its ratio to plain GFL's, the parameters its teacher side
holds in memory (CrossKD: the teacher's head part, which runs forward and backward every step)
and the cache's stored bytes per sample.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from ldpipe.config import enabled_terms, load_pipeline
from ldpipe.data import DetectionDataset, load_split, train_variants
from ldpipe.distill import CachedTeacher, DistillCriterion
from ldpipe.distill.loader import CacheTargets
from ldpipe.engine.runtime import seed_everything
from ldpipe.engine.step import TrainCollate, TrainStep
from ldpipe.models import build_model

from ..common import command_line, emit, machine_info, md_table, median, quiet_logs

OFF = ["distill.ld=false", "distill.vlr=false", "distill.kd=false"]
METHODS = {  # name -> the [distill] / model overrides of its recipe (pipelines/coco_*_base)
    "plain": [],
    "ld_v2": [],
    "bckd": [*OFF, "distill.bckd_cls=true", "distill.bckd_box=true"],
    "crosskd": [*OFF, "distill.crosskd_cls=true", "distill.crosskd_reg=true"],
}


def _store_bytes(url: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(url) for f in fs)


def setup(pipeline: str, caches: dict[str, str], overrides: list[str], n_batches: int):
    """Per method: (TrainStep, its prepared batches, teacher-side parameters, cache bytes/sample)."""
    out = {}
    for name in METHODS:
        extra = list(METHODS[name])
        if name == "crosskd":
            base = load_pipeline(pipeline, overrides)
            t, s = base.model("teacher"), base.model("student")
            if s.channels != t.channels:
                extra.append(f"models.student.head.align_channels={t.channels}")
        pipe = load_pipeline(pipeline, [*overrides, *extra])
        split = load_split(pipe.data, "train")
        cfg = pipe.model("student")
        url = caches.get(name)
        source = CachedTeacher(pipe, url) if url else None
        fetch = CacheTargets(url, with_cls=True) if url else None
        variants = source.variants(pipe) if source else train_variants(pipe.data)
        ds = DetectionDataset(split, pipe.data, variants, extra=fetch)
        collate = TrainCollate(cfg, len(split.classes), with_vlr="vlr" in enabled_terms(pipe) and bool(url))
        bs = pipe.train.batch_size
        keys = [(i, 0) for i in range(n_batches * bs)]
        batches = [collate([ds[k] for k in keys[b * bs:(b + 1) * bs]]) for b in range(n_batches)]
        seed_everything(0)
        model = build_model(cfg, len(split.classes)).train()
        criterion = None
        held = 0
        if source is not None:
            source.check(pipe, "student", split)
            criterion = DistillCriterion(pipe.distill, enabled_terms(pipe), source)
            if source.reuse_idx is not None:
                held = sum(p.numel() for p in source.head_part(torch.device("cpu")).parameters())
        step = TrainStep(model, pipe.train_for("student"), torch.device("cpu"), False, criterion=criterion)
        per_sample = _store_bytes(url) / source.manifest.num_samples if url else 0.0
        out[name] = (step, batches, held, per_sample)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pipeline")
    ap.add_argument("--ld", required=True, help="an ld-region cache of the pipeline's teacher")
    ap.add_argument("--bckd", required=True, help="a dense raw-logit cache")
    ap.add_argument("--crosskd", required=True, help="a dense raw-logit cache with cache.reused_head_idx")
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    ap.add_argument("-o", "--override", action="append", default=[], dest="overrides")
    args = ap.parse_args(argv)
    quiet_logs()
    torch.set_num_threads(args.threads)
    caches = {"ld_v2": args.ld, "bckd": args.bckd, "crosskd": args.crosskd}
    methods = setup(args.pipeline, caches, args.overrides, args.batches)
    names = list(methods)
    times: dict[str, list[float]] = {n: [] for n in names}
    it = 0
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for b in range(args.batches):
            for n in order:
                step, batches = methods[n][0], methods[n][1]
                t0 = time.perf_counter()
                step(batches[b], 0, it)
                if r:  # the first round warms up
                    times[n].append(time.perf_counter() - t0)
            it += 1
    plain = median(times["plain"])
    rows = [[n, f"{median(times[n]) * 1000:.0f}", f"{median(times[n]) / plain:.2f}",
             f"{methods[n][2]:,}", f"{methods[n][3] / 1024:.0f}"] for n in names]
    table = md_table(["method", "step (ms, median)", "x plain", "teacher params in memory",
                      "cache kB / sample"], rows)
    print(table)
    result = {"command": command_line(), "machine": machine_info(torch.device("cpu")),
              "steps_per_method": len(times["plain"]), "threads": args.threads,
              "methods": {n: {"step_s": median(times[n]), "ratio": median(times[n]) / plain,
                              "teacher_params": methods[n][2], "cache_bytes_per_sample": methods[n][3]}
                          for n in names}, "table": table}
    emit(result, args.json)
    return result


if __name__ == "__main__":
    main()
