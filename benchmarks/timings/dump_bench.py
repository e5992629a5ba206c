"""Benchmark ``dump-teacher``: overhead over pure inference, bytes per sample, read latency.

    python -m benchmarks.timings.dump_bench PIPELINE (--checkpoint CKPT | --random) [--model teacher]
        [-o key=value ...] [--device cpu|cuda] [--images N] [--synth N] [--reps 3]
        [--quick | --policies main,ld --codecs fp16,int8] [--read-samples 300] [--json OUT]

1. *Pure inference vs dump.*  The same teacher, images, (image, variant) pairs, batches,
   batch size, loader workers and AMP setting; inference runs the forward only, the dump is
   ``ldpipe.engine.dump.dump_teacher`` into a fresh store (the pipeline's ``cache.region`` /
   ``cache.codec``); the inference runs iterate over the very batch list the dump builds
   (``ldpipe.engine.dump.unit_batches`` of every unit).  Runs alternate (dump, infer, infer, dump, ...)
   after an untimed warm-up; medians.  Two times each: *total* (model build + weights + loader + loop, and for
   the dump also checksum, manifest, commit and index) and *loop* (the batches only; the
   dump's own ``summary["seconds"]``, which ends when the writer has committed everything).
2. *Bytes per sample* for each region policy x codec: every file of the store on disk
   (metadata and index included) / samples, against the dense fp16 size of the sample
   (own-grid anchors x (4 (reg_max+1) + num_classes) x 2 bytes).
3. *Random-access reads*: ``CacheReader(path).read(image, variant)`` for random samples in a
   fresh process and reader, one torch thread as in loader workers; the first read (which
   opens the store and loads the index) is reported apart; p50 / p99 of the rest.  The store was just written, so it is in the OS
   page cache: these are warm-cache latencies.

``--images N`` keeps the first N images of the split (given to ``dump_teacher`` as its
``split``; nothing else changes).

Code: this file (options, the run order, the report), ``dump_runs.py`` (set-up and the two
timed runs), ``dump_stores.py`` (bytes per sample, read latency).
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile

from ldpipe.config import CODECS
from ldpipe.config import REGION_POLICIES as POLICIES

from ..common import (command_line, fmt, machine_info, md_table, median, quiet_logs, ratio,
                      resolve_device, write_json)
from .dump_runs import amp_arg, load_pipe, random_checkpoint, run_dump, run_inference, truncated_split
from .dump_stores import cache_stats, read_latency, read_latency_main, store_bytes

QUICK = (("ld", "fp16"), ("ld", "int8"), ("dense", "fp16"), ("dense", "int8"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.timings.dump_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pipeline", help="pipeline TOML (e.g. pipelines/demo.toml)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="teacher checkpoint")
    src.add_argument("--random", action="store_true",
                     help="randomly initialised teacher (saved to a temporary checkpoint)")
    p.add_argument("--model", default="teacher", help="model of the pipeline to dump")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="pipeline override, repeatable (e.g. -o data.root=data/synth)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--split", default="train")
    p.add_argument("--images", type=int, default=0, help="first N images of the split (0 = all)")
    p.add_argument("--synth", type=int, default=0, metavar="N",
                   help="synthesise N training images into the work dir and use them "
                        "(sets data.root; for COCO-format pipelines such as demo.toml)")
    p.add_argument("--synth-size", type=int, default=320)
    p.add_argument("--batch-size", type=int, default=0, help="default: cache.batch_size")
    p.add_argument("--workers", type=int, default=-1, help="loader workers (default: train.workers)")
    p.add_argument("--amp", choices=("auto", "on", "off"), default="auto",
                   help="auto = as dump-teacher (AMP on CUDA only)")
    p.add_argument("--reps", type=int, default=3, help="timed inference/dump pairs")
    p.add_argument("--no-timing", action="store_true", help="skip the inference-vs-dump timing")
    p.add_argument("--quick", action="store_true",
                   help="size table for " + ", ".join(f"{a}/{b}" for a, b in QUICK) + " only")
    p.add_argument("--policies", default="", help="comma list (default: all four)")
    p.add_argument("--codecs", default="", help="comma list (default: all three)")
    p.add_argument("--no-sizes", action="store_true", help="skip the bytes-per-sample table")
    p.add_argument("--read-samples", type=int, default=300, help="random reads per store (0 = skip)")
    p.add_argument("--random-spread", type=float, default=3.0,
                   help="--random: std of the head's output logits relative to its input RMS "
                        "(weights ~ N(0, spread^2 / fan_in)); 0 keeps the GFL init, whose "
                        "near-uniform outputs compress unrealistically well")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads of the main process (0 = torch's default); 1 is far less "
                        "noisy on a shared CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="", help="where stores go (default: a temp dir, removed)")
    p.add_argument("--keep", action="store_true", help="keep the work dir")
    p.add_argument("--json", default="", help="write the results as JSON here")
    return p.parse_args(argv)


# ------------------------------------------------------------------ main
def combos(args, configured: tuple[str, str]) -> list[tuple[str, str]]:
    if args.policies or args.codecs:
        pols = [p for p in args.policies.split(",") if p] or list(POLICIES)
        cods = [c for c in args.codecs.split(",") if c] or list(CODECS)
        bad = [x for x in pols if x not in POLICIES] + [x for x in cods if x not in CODECS]
        if bad:
            sys.exit(f"unknown policy/codec: {bad}")
        return [(p, c) for p in pols for c in cods]
    if args.quick:
        return list(QUICK)
    return [(p, c) for p in POLICIES for c in CODECS]


def main(argv=None) -> None:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "_read_latency":
        return read_latency_main(argv[1:])
    args = parse_args(argv)
    quiet_logs()
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    args.pipeline = os.path.abspath(args.pipeline)

    own_tmp = not args.workdir
    work = tempfile.mkdtemp(prefix="ldpipe-dump-bench-") if own_tmp else os.path.abspath(args.workdir)
    os.makedirs(work, exist_ok=True)
    notes: list[str] = []
    try:
        if args.synth:
            from ldpipe.data import synthesize
            root = os.path.join(work, "synth")
            synthesize(root, n_train=args.synth, n_val=1, seed=args.seed, size=args.synth_size)
            args.override.append(f"data.root={root}")
        pipe = load_pipe(args)
        split = truncated_split(pipe, args.split, args.images)
        cfg = pipe.model(args.model)
        bs = args.batch_size or pipe.cache.batch_size
        workers = pipe.train.workers if args.workers < 0 else args.workers
        amp = amp_arg(args)
        if args.random:
            ckpt = os.path.join(work, f"random_{args.model}.pth")
            random_checkpoint(pipe, args.model, len(split.classes), ckpt, args.random_spread, args.seed)
            notes.append("random teacher (--random): rows per sample (region sizes) do not depend on "
                         "the weights, but compressed bytes do; a trained teacher's distributions are "
                         "peakier, so treat the bytes of fp16/int8/fp32 stores as indicative only")
        else:
            ckpt = os.path.abspath(args.checkpoint)
        from ldpipe.data import train_variants
        nv = len(train_variants(pipe.data))
        configured = (pipe.cache.region, pipe.cache.codec)
        print(f"# dump benchmark: {args.pipeline} model {args.model!r} (ResNet-{cfg.depth}, "
              f"width {cfg.base_channels}, {cfg.channels} ch, {cfg.stacked_convs} convs), "
              f"{len(split.records)} images x {nv} variants, batch {bs}, workers {workers}, "
              f"device {device}", flush=True)

        result: dict = {"command": command_line(), "machine": machine_info(device),
                        "settings": {"pipeline": args.pipeline, "overrides": args.override,
                                     "model": args.model, "random_teacher": bool(args.random),
                                     "random_spread": args.random_spread if args.random else None,
                                     "images": len(split.records), "variants": nv,
                                     "samples": len(split.records) * nv, "batch_size": bs,
                                     "workers": workers, "amp": args.amp, "threads": args.threads,
                                     "samples_per_shard": pipe.cache.samples_per_shard,
                                     "compressor": pipe.cache.compressor,
                                     "store_cls": pipe.cache.store_cls,
                                     "configured": {"region": configured[0], "codec": configured[1]},
                                     "teacher": {"depth": cfg.depth, "base_width": cfg.base_channels,
                                                 "channels": cfg.channels,
                                                 "stacked_convs": cfg.stacked_convs,
                                                 "reg_max": cfg.reg_max}},
                        "notes": notes}

        kept: dict[tuple[str, str], tuple[str, float]] = {}
        # ---------------------------------------------------------- 1. timing
        if not args.no_timing and args.reps > 0:
            # untimed warm-up: two batches of inference (any pairs)
            warm = [[(i, 0) for i in range(j, min(j + bs, len(split.records)))] for j in (0, bs)]
            run_inference(pipe, args.model, ckpt, split, device, [b for b in warm if b], workers, amp)
            infer, dump = [], []
            batches = None
            for r in range(args.reps):
                # dump first in even reps: the first dump tells the batches the inference uses
                order = ("dump", "infer") if r % 2 == 0 else ("infer", "dump")
                for kind in order:
                    gc.collect()
                    if kind == "infer":
                        res = run_inference(pipe, args.model, ckpt, split, device, batches, workers, amp)
                        infer.append(res)
                    else:
                        out = os.path.join(work, f"timed_{r}.zarr")
                        res = run_dump(pipe, args.model, ckpt, split, out, device, bs, workers, amp,
                                       args.split)
                        if batches is None:
                            batches = res["batches"]
                        elif res["batches"] != batches:
                            raise RuntimeError("dump_teacher made different batches in two runs")
                        res.pop("batches")
                        dump.append(res)
                        if r == args.reps - 1:
                            kept[configured] = (out, res["total_s"])
                        else:
                            shutil.rmtree(out, ignore_errors=True)
                    print(f"  rep {r} {kind:5s} total {res['total_s']:.2f}s loop {res['loop_s']:.2f}s",
                          flush=True)
            timing = {}
            for what in ("total_s", "loop_s"):
                mi, md = median([x[what] for x in infer]), median([x[what] for x in dump])
                timing[what] = {"inference": mi, "dump": md, "ratio": ratio(md, mi),
                                "paired_ratio_median": median([d[what] / i[what]
                                                               for i, d in zip(infer, dump)]),
                                "inference_runs": [x[what] for x in infer],
                                "dump_runs": [x[what] for x in dump]}
            samples = infer[0]["samples"]
            timing["samples"] = samples
            timing["batches"] = len(batches)
            timing["batch_sizes"] = sorted({len(b) for b in batches})
            timing["inference_samples_per_s"] = samples / timing["loop_s"]["inference"]
            timing["dump_samples_per_s"] = samples / timing["loop_s"]["dump"]
            timing["goal_ratio_max"] = 1.10
            result["timing"] = timing
            print()
            print(f"## Dump vs pure inference ({configured[0]}/{configured[1]}, {samples} samples in "
                  f"{len(batches)} batches, {args.reps} alternating runs each, medians)")
            print()
            rows = []
            for what, label in (("loop_s", "loop (batches only)"), ("total_s", "total (incl. set-up)")):
                t = timing[what]
                rows.append([label, fmt(t["inference"], ".2f"), fmt(t["dump"], ".2f"),
                             fmt(t["ratio"], ".3f"), fmt(t["paired_ratio_median"], ".3f")])
            print(md_table(["time", "inference s", "dump s", "dump/inference",
                            "median of paired ratios"], rows))
            print(f"\nthroughput (loop): inference {timing['inference_samples_per_s']:.2f} samples/s, "
                  f"dump {timing['dump_samples_per_s']:.2f} samples/s; goal dump/inference <= 1.10",
                  flush=True)

        # ---------------------------------------------------------- 2. sizes
        sizes = []
        if not args.no_sizes:
            todo = combos(args, configured)
            for pol, cod in todo:
                if (pol, cod) in kept:
                    continue
                pipe_pc = load_pipe(args, f"cache.region={pol}", f"cache.codec={cod}")
                out = os.path.join(work, f"size_{pol}_{cod}.zarr")
                gc.collect()
                res = run_dump(pipe_pc, args.model, ckpt, split, out, device, bs, workers, amp, args.split)
                res.pop("batches")
                kept[(pol, cod)] = (out, res["total_s"])
                print(f"  dumped {pol}/{cod} in {res['total_s']:.2f}s", flush=True)
            stores = [kept[pc][0] for pc in todo]
            lat = read_latency(stores, args.read_samples, args.seed)
            for pol, cod in todo:
                path, secs = kept[(pol, cod)]
                st = cache_stats(path)
                b = store_bytes(path)
                n = st["samples"]
                payload = b["parts"].get("box", 0) + b["parts"].get("cls", 0)
                row = {"policy": pol, "codec": cod, **st, "bytes_total": b["total"],
                       "bytes_per_sample": b["total"] / n, "bytes_parts": b["parts"],
                       "payload_bytes_per_sample": payload / n,
                       "anchor_bytes_per_sample": b["parts"].get("anchor", 0) / n,
                       "vs_dense_fp16": b["total"] / n / st["dense_fp16_bytes_per_sample"],
                       "dump_total_s_single_run": secs, "read": lat.get(path),
                       "store": path if args.keep else None}
                sizes.append(row)
            result["sizes"] = sizes
            dense_ref = sizes[0]["dense_fp16_bytes_per_sample"] if sizes else None
            print()
            print(f"## Bytes per sample (store on disk / samples; dense fp16 reference = "
                  f"{fmt(dense_ref, ',.0f')} B/sample = own-grid anchors x "
                  f"(4*{cfg.reg_max + 1} + {len(split.classes)}) x 2 B)")
            print()
            rows = []
            for s in sizes:
                rd = s["read"] or {}
                rows.append([s["policy"], s["codec"], fmt(s["rows_per_sample"], ".1f"),
                             fmt(100 * s["region_fraction"], ".2f") + "%",
                             fmt(s["bytes_per_sample"], ",.0f"), fmt(s["payload_bytes_per_sample"], ",.0f"),
                             fmt(s["vs_dense_fp16"], ".4f"), fmt(s["dump_total_s_single_run"], ".2f"),
                             fmt(rd.get("p50_ms"), ".2f"), fmt(rd.get("p99_ms"), ".2f"),
                             fmt(rd.get("first_read_ms"), ".1f")])
            print(md_table(["policy", "codec", "rows/sample", "of anchors", "bytes/sample",
                            "box+cls B/sample", "x dense fp16", "dump s (1 run)",
                            "read p50 ms", "read p99 ms", "first read ms"], rows))
            if args.read_samples > 1:
                print(f"\nreads: {args.read_samples - 1} random samples per store after a first read, "
                      "fresh process and CacheReader, 1 torch thread (as loader workers), warm OS page cache")
        for n_ in notes:
            print(f"\nnote: {n_}")
        if args.json:
            write_json(args.json, result)
            print(f"\nwrote {args.json}")
    finally:
        if own_tmp and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        elif args.keep or not own_tmp:
            print(f"work dir: {work}")


if __name__ == "__main__":
    main()
