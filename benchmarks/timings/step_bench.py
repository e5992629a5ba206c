"""Benchmark one training step: plain GFL vs cached LD vs online LD.

    python -m benchmarks.timings.step_bench [--device cpu|cuda] [--teacher-depth 101]
        [--student-depth 18] [--size 320] [--batch 2] [--steps 10] [--warmup 3]
        [--reps 3] [--json OUT]

Set-up (this process): a synthetic data set (``--batch x --distinct-batches`` training
images, sides 0.9-1.1 x ``--size``), the pipeline ``benchmarks/pipelines/step_bench.toml``
(by default mmdetection's widths for both models: base width 64, 256 channels, 4 stacked
convs, reg_max 16) with the options as ``-o`` overrides, input scale ``[size, size]``, a randomly initialised teacher (saved with ``save_checkpoint``; its
head's weights are drawn wider than GFL's init so its distributions are not flat) and a
cache dumped from it with ``dump_teacher`` (``--region``/``--codec``, default ld/int8).

Each mode runs in its own fresh subprocess (so peak memory is per mode), repeated
``--reps`` times in alternating order (plain, cached, online, online, cached, plain, ...):

* ``plain``  - GFL training, ``GFLCriterion()``;
* ``cached`` - ``CachedTeacher`` on the cache; the batch's teacher targets are fetched with
  the source's ``CacheTargets`` right before the step, timed separately ("fetch");
* ``online`` - ``OnlineTeacher``: the teacher runs on every batch.

Every process builds the same student (same seed), sees the same batches (the same
(image, variant) pairs, batched as the training sampler would) and times, per step,
one ``ldpipe.engine.train.TrainStep`` - the very step ``train`` runs (lr schedule, forward and
losses, finiteness check, backward with GradScaler under AMP on CUDA, update, per-loss ``float()``).
Loading images and computing ATSS targets (``TrainCollate``) are done before each step and
not timed: in training, loader workers overlap them.  Times are per-step medians after
``--warmup`` steps, then the median over reps; ``DistillCriterion.distill_terms`` (teacher targets or the online
teacher's forward, plus the LD terms' forward) is also timed on its own.  Memory: CPU - the
process's peak RSS (``VmHWM``) and its increase over the RSS after imports (torch, ldpipe,
zarr); CUDA - ``max_memory_allocated``.  An extra process alternates all modes step by step
on one student (``--no-interleaved`` skips it): its per-round ratios resist load drift.

Code: this file (options, the run order, the report), ``step_setup.py`` (data, pipeline,
teacher, cache), ``step_child.py`` (the child processes and their timed steps).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

from ldpipe.config import CODECS, REGION_POLICIES

from ..common import (command_line, fmt, machine_info, md_table, median, quiet_logs, ratio, resolve_device,
                      run_child, write_json)
from .step_child import interleaved_main, worker_main
from .step_setup import make_setup

MODES = ("plain", "cached", "online")
LOSS_KEYS = ("loss_cls", "loss_bbox", "loss_dfl", "loss_ld", "loss_ld_vlr", "loss_kd")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.timings.step_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--teacher-depth", type=int, default=101, choices=(18, 34, 50, 101))
    p.add_argument("--student-depth", type=int, default=18, choices=(18, 34, 50, 101))
    p.add_argument("--channels", type=int, default=256, help="FPN/head channels of both models")
    p.add_argument("--stacked-convs", type=int, default=4)
    p.add_argument("--base-width", type=int, default=64, help="ResNet width of both models")
    p.add_argument("--size", type=int, default=320, help="input scale [size, size]")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="timed steps per process")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--reps", type=int, default=3, help="processes per mode (alternating order)")
    p.add_argument("--distinct-batches", type=int, default=4, help="batches cycled through")
    p.add_argument("--region", default="ld", choices=REGION_POLICIES)
    p.add_argument("--codec", default="int8", choices=CODECS)
    p.add_argument("--modes", default=",".join(MODES), help="comma list of plain,cached,online")
    p.add_argument("--no-interleaved", action="store_true",
                   help="skip the extra process that alternates all modes step by step")
    p.add_argument("--amp", choices=("auto", "off"), default="auto",
                   help="auto: AMP on CUDA as training does (train.amp=true); off: fp32")
    p.add_argument("--threads", type=int, default=0, help="torch threads in the children (0 = default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--json", default="")
    return p.parse_args(argv)


# ------------------------------------------------------------------ main
def main(argv=None) -> None:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "_worker":
        return worker_main(argv[1:])
    if argv and argv[0] == "_interleaved":
        return interleaved_main(argv[1:])
    args = parse_args(argv)
    quiet_logs()
    if args.threads:  # the set-up dump runs here
        import torch
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        sys.exit(f"unknown modes {bad} (choose from {', '.join(MODES)})")
    own_tmp = not args.workdir
    work = tempfile.mkdtemp(prefix="ldpipe-step-bench-") if own_tmp else os.path.abspath(args.workdir)
    os.makedirs(work, exist_ok=True)
    try:
        print(f"# step benchmark: student ResNet-{args.student_depth}, teacher ResNet-{args.teacher_depth} "
              f"(width {args.base_width}, {args.channels} ch, {args.stacked_convs} convs), input "
              f"{args.size}x{args.size}, batch {args.batch}, {args.warmup}+{args.steps} steps x "
              f"{args.reps} reps, device {device}", flush=True)
        setup = make_setup(args, work, device)
        print(f"  set-up: cache of {setup['dump_samples']} samples dumped in {setup['dump_s']:.1f}s "
              f"({args.region}/{args.codec})", flush=True)
        setup_arg = json.dumps(setup)
        runs: dict[str, list[dict]] = {m: [] for m in modes}
        for r in range(args.reps):
            order = modes if r % 2 == 0 else list(reversed(modes))
            for m in order:
                res = run_child("benchmarks.timings.step_bench", ["_worker", m, setup_arg])
                runs[m].append(res)
                mem = (f"cuda peak {res['cuda_max_allocated_mb']:.0f} MiB" if device.type == "cuda"
                       else f"peak RSS {res['peak_rss_mb']:.0f} MiB (+{res['peak_rss_delta_mb']:.0f})")
                fetch = f", fetch {res['fetch_median_s'] * 1e3:.1f} ms" if m == "cached" else ""
                print(f"  rep {r} {m:6s} step {res['step_median_s'] * 1e3:8.1f} ms{fetch}, {mem}",
                      flush=True)

        summary = {}
        for m in modes:
            rs = runs[m]
            s = {"step_ms": median([x["step_median_s"] for x in rs]) * 1e3,
                 "step_ms_runs": [x["step_median_s"] * 1e3 for x in rs],
                 "fetch_ms": median([x["fetch_median_s"] for x in rs]) * 1e3,
                 "hook_ms": median([x["hook_median_s"] for x in rs]) * 1e3,
                 "peak_rss_mb": median([x["peak_rss_mb"] for x in rs]),
                 "peak_rss_delta_mb": median([x["peak_rss_delta_mb"] for x in rs]),
                 "first_losses": rs[0]["first_losses"]}
            s["step_plus_fetch_ms"] = s["step_ms"] + s["fetch_ms"]
            if device.type == "cuda":
                s["cuda_max_allocated_mb"] = median([x["cuda_max_allocated_mb"] for x in rs])
                s["cuda_max_reserved_mb"] = median([x["cuda_max_reserved_mb"] for x in rs])
            summary[m] = s
        mem_key = "cuda_max_allocated_mb" if device.type == "cuda" else "peak_rss_delta_mb"
        ratios = {}
        if "plain" in summary:
            p = summary["plain"]
            # paired ratios: the same rep's processes ran next to each other
            for m in modes:
                if m == "plain":
                    continue
                ratios[f"{m}/plain"] = {
                    "time": ratio(summary[m]["step_ms"], p["step_ms"]),
                    "time_paired_median": median([ratio(a["step_median_s"], b["step_median_s"])
                                                  for a, b in zip(runs[m], runs["plain"])]),
                    "memory": ratio(summary[m][mem_key], p[mem_key]),
                    "peak_rss": ratio(summary[m]["peak_rss_mb"], p["peak_rss_mb"]),
                }
                if m == "cached":
                    ratios[f"{m}/plain"]["time_with_fetch"] = ratio(summary[m]["step_plus_fetch_ms"],
                                                                    p["step_ms"])

        inter = None
        if not args.no_interleaved and len(modes) > 1:
            res = run_child("benchmarks.timings.step_bench", ["_interleaved", ",".join(modes), setup_arg])
            rounds = res["rounds"]
            inter = {"rounds": rounds, "modes": {}}
            for m in modes:
                t = [r["times"][m] for r in rounds]
                inter["modes"][m] = {"step_ms": median(t) * 1e3,
                                     "hook_ms": median([r["hook"][m] for r in rounds]) * 1e3}
                if "plain" in modes and m != "plain":
                    inter["modes"][m]["paired_ratio_median"] = median(
                        [r["times"][m] / r["times"]["plain"] for r in rounds])
            if "cached" in modes:
                inter["modes"]["cached"]["fetch_ms"] = median([r["fetch"] for r in rounds]) * 1e3
            print("  interleaved: " + ", ".join(f"{m} {v['step_ms']:.1f} ms"
                                                for m, v in inter["modes"].items()), flush=True)

        print()
        print(f"## Training step: plain vs cached LD vs online LD ({device}, medians of {args.reps} "
              f"processes x {args.steps} steps)")
        print()
        mem_label = "GPU peak MiB (max_allocated)" if device.type == "cuda" else "peak RSS MiB (+ over base)"
        rows = []
        for m in modes:
            s = summary[m]
            mem = (fmt(s.get("cuda_max_allocated_mb"), ".0f") if device.type == "cuda"
                   else f"{s['peak_rss_mb']:.0f} (+{s['peak_rss_delta_mb']:.0f})")
            r_ = ratios.get(f"{m}/plain", {})
            rows.append([m, fmt(s["step_ms"], ".1f"), fmt(s["hook_ms"], ".1f"),
                         fmt(s["fetch_ms"], ".1f") if m == "cached" else "-",
                         fmt(r_.get("time"), ".3f") if m != "plain" else "1.000",
                         fmt(r_.get("time_with_fetch"), ".3f") if m == "cached" else "-",
                         mem, fmt(r_.get("memory"), ".3f") if m != "plain" else "1.000"])
        print(md_table(["mode", "step ms", "of which hook.losses ms", "cache fetch ms/batch", "time / plain",
                        "(step+fetch) / plain", mem_label, "memory / plain"], rows))
        if inter:
            print()
            print(f"### Interleaved timing (one process, one student, the modes alternate step by step "
                  f"in rotating order; {len(inter['rounds'])} rounds; robust to load drift on shared machines)")
            print()
            rows = []
            for m in modes:
                v = inter["modes"][m]
                rows.append([m, fmt(v["step_ms"], ".1f"), fmt(v["hook_ms"], ".1f"),
                             "1.000" if m == "plain" else fmt(v.get("paired_ratio_median"), ".3f"),
                             fmt(v.get("fetch_ms"), ".1f") if m == "cached" else "-"])
            print(md_table(["mode", "step ms", "of which hook.losses ms", "median of per-round ratios to plain",
                            "cache fetch ms/batch"], rows))
        print("\nhook.losses = the hook's forward part inside the step (teacher targets, or the online "
              "teacher's forward, and the LD/VLR/KD terms); their backward is in the step only")
        print("memory ratio: " + ("max_memory_allocated" if device.type == "cuda"
                                    else "peak RSS increase over the RSS after imports"))
        print("goals: cached/plain <= 1.05 (time, loading excluded) and memory within 5%")
        if "cached" in summary and "online" in summary:
            a, b = summary["cached"]["first_losses"], summary["online"]["first_losses"]
            diffs = {k: (a[k], b[k]) for k in ("loss_ld", "loss_ld_vlr", "loss_kd") if k in a and k in b}
            print("first-step distillation losses, cached vs online (same student, same batch): "
                  + ", ".join(f"{k} {x:.5f} vs {y:.5f}" for k, (x, y) in diffs.items())
                  + f" (they differ by the {args.codec} codec and, when a batch mixes padded shapes, "
                  "by padding: the online teacher sees the padded batch, the dump same-shape batches)")

        result = {"command": command_line(), "machine": machine_info(device),
                  "settings": {k: v for k, v in vars(args).items() if k not in ("json", "workdir", "keep")},
                  "setup": {"dump_s": setup["dump_s"], "dump_samples": setup["dump_samples"]},
                  "summary": summary, "ratios": ratios, "interleaved": inter, "runs": runs}
        if args.json:
            write_json(args.json, result)
            print(f"\nwrote {args.json}")
    finally:
        if own_tmp and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work dir: {work}")


if __name__ == "__main__":
    main()
