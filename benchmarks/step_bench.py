"""Benchmark one training step: plain GFL vs cached LD vs online LD.

    python -m benchmarks.step_bench [--device cpu|cuda] [--teacher-depth 101]
        [--student-depth 18] [--size 320] [--batch 2] [--steps 10] [--warmup 3]
        [--reps 3] [--json OUT]

Set-up (this process): a synthetic data set (``--batch x --distinct-batches`` training
images, sides 0.9-1.1 x ``--size``), a pipeline with mmdetection's widths for both models
(base width 64, 256 channels, 4 stacked convs, reg_max 16) at input scale
``[size, size]``, a randomly initialised teacher (saved with ``save_checkpoint``; its
head's weights are drawn wider than GFL's init so its distributions are not flat) and a
cache dumped from it with ``dump_teacher`` (``--region``/``--codec``, default ld/int8).

Each mode runs in its own fresh subprocess (so peak memory is per mode), repeated
``--reps`` times in alternating order (plain, cached, online, online, cached, plain, ...):

* ``plain``  - GFL training, ``Hook()``;
* ``cached`` - ``CachedTeacher`` on the cache; the batch's teacher targets are fetched with
  the hook's ``CacheTargets`` right before the step, timed separately ("fetch");
* ``online`` - ``OnlineTeacher``: the teacher runs on every batch.

Every process builds the same student (same seed), sees the same batches (the same
(image, variant) pairs, batched as the training sampler would) and times, per step,
one ``ldpipe.engine.train.TrainStep`` - the very step ``train`` runs (lr schedule, forward and
losses, finiteness check, backward with GradScaler under AMP on CUDA, update, per-loss ``float()``).
Loading images and computing ATSS targets (``TrainCollate``) are done before each step and
not timed: in training, loader workers overlap them.  Times are per-step medians after
``--warmup`` steps, then the median over reps; ``hook.losses`` (teacher targets or the online
teacher's forward, plus the LD terms' forward) is also timed on its own.  Memory: CPU - the
process's peak RSS (``VmHWM``) and its increase over the RSS after imports (torch, ldpipe,
zarr); CUDA - ``max_memory_allocated``.  An extra process alternates all modes step by step
on one student (``--no-interleaved`` skips it): its per-round ratios resist load drift.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

from ldpipe.config import CODECS, REGION_POLICIES

from .common import (as_device, command_line, fmt, machine_info, md_table, median, now, peak_rss_mb,
                     quiet_logs, ratio, resolve_device, rss_mb, run_child, sync, write_json)

MODES = ("plain", "cached", "online")
LOSS_KEYS = ("loss_cls", "loss_bbox", "loss_dfl", "loss_ld", "loss_ld_vlr", "loss_kd")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.step_bench", description=__doc__,
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


PIPELINE = """\
name = "step-bench"

[data]
format = "coco"
root = "{root}"
train = "annotations/train.json"
val = "annotations/val.json"
train_images = "images/train"
val_images = "images/val"
train_scales = [[{size}, {size}]]
test_scale = [{size}, {size}]
flip = true

[train]
batch_size = {batch}
workers = 0
amp = {amp}

[models.teacher]
depth = {teacher_depth}
base_channels = {base_width}
channels = {channels}
stacked_convs = {stacked_convs}

[models.student]
depth = {student_depth}
base_channels = {base_width}
channels = {channels}
stacked_convs = {stacked_convs}

[cache]
region = "{region}"
codec = "{codec}"
samples_per_shard = 64
batch_size = {batch}
"""


# ------------------------------------------------------------------ set-up (parent)
def make_setup(args, work: str, device) -> dict:
    import torch
    from ldpipe.engine.dump import dump_teacher
    from ldpipe.config import load_pipeline
    from ldpipe.data import load_split, synthesize
    from ldpipe.models import build_model
    from ldpipe.models.checkpoint import save_checkpoint

    root = os.path.join(work, "synth")
    n_train = args.batch * args.distinct_batches
    synthesize(root, n_train=n_train, n_val=1, seed=args.seed, size=args.size)
    toml = os.path.join(work, "step_bench.toml")
    with open(toml, "w") as fh:
        fh.write(PIPELINE.format(root=root, size=args.size, batch=args.batch,
                                 amp="true" if args.amp == "auto" else "false",
                                 teacher_depth=args.teacher_depth, student_depth=args.student_depth,
                                 base_width=args.base_width, channels=args.channels,
                                 stacked_convs=args.stacked_convs, region=args.region, codec=args.codec))
    pipe = load_pipeline(toml)
    split = load_split(pipe.data, "train")
    torch.manual_seed(args.seed + 1)
    teacher = build_model(pipe.model("teacher"), len(split.classes))
    with torch.no_grad():  # non-flat teacher distributions (GFL's init gives near-uniform ones)
        for conv in (teacher.bbox_head.gfl_reg, teacher.bbox_head.gfl_cls):
            conv.weight.normal_(0.0, 3.0 / conv.weight[0].numel() ** 0.5)
    ckpt = os.path.join(work, "teacher.pth")
    save_checkpoint(ckpt, teacher, {"ldpipe": {"model": "teacher", "random": True}})
    del teacher
    cache = os.path.join(work, "cache.zarr")
    t0 = now()
    summary = dump_teacher(pipe, "teacher", ckpt, cache, device=device.type, workers=0, progress=False)
    dump_s = now() - t0
    return {"pipeline": toml, "teacher_ckpt": ckpt, "cache": cache, "device": device.type,
            "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
            "distinct_batches": args.distinct_batches, "seed": args.seed, "threads": args.threads,
            "dump_s": dump_s, "dump_samples": summary["samples"]}


# ------------------------------------------------------------------ children
class Bench:
    """Data, student, optimizer and hooks of one child process."""

    def __init__(self, setup: dict, modes: list[str]) -> None:
        import torch
        if setup["threads"]:
            torch.set_num_threads(setup["threads"])
        from ldpipe.config import load_pipeline
        from ldpipe.data import DetectionDataset, VariantSampler, load_split
        from ldpipe.engine.runtime import seed_everything
        from ldpipe.engine.train import TrainCollate, TrainStep
        from ldpipe.models import build_model
        import ldpipe.distill  # noqa: F401  (zarr & co. before the RSS baseline, in every mode)

        self.setup = setup
        self.device = device = as_device(setup["device"])
        if device.type == "cuda":
            torch.cuda.set_device(device)
            torch.cuda.init()
        self.rss_base = rss_mb()  # after imports (and the CUDA context), before models and data
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        pipe = self.pipe = load_pipeline(setup["pipeline"])
        split = load_split(pipe.data, "train")
        cfg = self.cfg = pipe.model("student")
        sched = pipe.train_for("student")
        self.hooks = {m: self._hook(m, split) for m in modes}
        # every hook here uses the training variants (a cache's are the dump's: the same)
        first = self.hooks[modes[0]]
        variants = first.variants(pipe)
        self.dataset = DetectionDataset(split, pipe.data, variants)
        extras = [h.sample_extra() for h in self.hooks.values()]
        self.extra = next((e for e in extras if e is not None), None)
        self.collate = {vlr: TrainCollate(cfg, len(split.classes), vlr)
                        for vlr in {h.with_vlr for h in self.hooks.values()}}
        pairs = VariantSampler(len(self.dataset), len(variants), shuffle=True, seed=setup["seed"]).pairs()
        bsz = setup["batch"]
        batches = [pairs[i:i + bsz] for i in range(0, len(pairs), bsz)][:setup["distinct_batches"]]
        self.batches = [b for b in batches if len(b) == bsz] or batches

        seed_everything(setup["seed"])
        self.model = build_model(cfg, len(split.classes)).to(device)
        self.model.train()
        self.train_step = TrainStep(self.model, sched, device, sched.amp and device.type == "cuda")
        self.hook_s = 0.0

    def _hook(self, mode: str, split):
        from ldpipe.distill import CachedTeacher, OnlineTeacher
        from ldpipe.engine.train import Hook
        if mode == "plain":
            hook = Hook()
        elif mode == "cached":
            hook = CachedTeacher(self.pipe, self.setup["cache"])
        elif mode == "online":
            hook = OnlineTeacher(self.pipe, "teacher", self.setup["teacher_ckpt"])
        else:
            raise SystemExit(f"unknown mode {mode!r}")
        hook.check(self.pipe, "student", split)
        orig = hook.losses

        def timed_losses(*a, **k):  # the hook's forward part: teacher targets + LD loss terms
            sync(self.device)
            t0 = now()
            out = orig(*a, **k)
            sync(self.device)
            self.hook_s = now() - t0
            return out

        hook.losses = timed_losses
        if mode == "online":
            # OnlineTeacher.check() puts the teacher on dist.init()'s default device (CUDA when
            # available), not on the training device: follow --device explicitly
            hook.net.to(self.device)
        return hook

    def batches_for(self, it: int) -> tuple[dict, float]:
        """Collated batches of step ``it`` (by with_vlr) and the time spent reading cache rows."""
        samples = [self.dataset[k] for k in self.batches[it % len(self.batches)]]
        t_fetch = 0.0
        if self.extra is not None:  # the loader's part of cached LD: read the teacher rows
            t0 = now()
            extras = [self.extra(s["meta"]) for s in samples]
            t_fetch = now() - t0
            for s, e in zip(samples, extras):
                s.update(e)
        out = {vlr: fn(samples) for vlr, fn in self.collate.items()}
        if self.device.type == "cuda":  # as the training DataLoader (pin_memory=True) hands them over
            from torch.utils.data._utils.pin_memory import pin_memory
            out = {vlr: pin_memory(b) for vlr, b in out.items()}
        return out, t_fetch

    def step(self, mode: str, batch: dict, it: int) -> tuple[float, dict]:
        """One timed training step, as ``ldpipe.engine.train.train`` runs it."""
        sync(self.device)
        t0 = now()
        values, _ = self.train_step(batch, self.hooks[mode], 0, it)
        sync(self.device)
        values.pop("loss")
        return now() - t0, values

    def memory(self) -> dict:
        import torch
        out = {"rss_base_mb": self.rss_base, "peak_rss_mb": peak_rss_mb()}
        out["peak_rss_delta_mb"] = (out["peak_rss_mb"] - self.rss_base) if self.rss_base is not None else None
        if self.device.type == "cuda":
            out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
            out["cuda_max_reserved_mb"] = torch.cuda.max_memory_reserved(self.device) / 2 ** 20
        return out


def worker_main(argv: list[str]) -> None:
    """Child: ``_worker MODE SETUP_JSON`` - one mode only; prints one JSON line."""
    mode, setup = argv[0], json.loads(argv[1])
    quiet_logs()
    b = Bench(setup, [mode])
    step_s, fetch_s, hook_s, first_losses = [], [], [], None
    for it in range(setup["warmup"] + setup["steps"]):
        batches, t_fetch = b.batches_for(it)
        dt, values = b.step(mode, batches[b.hooks[mode].with_vlr], it)
        if it == 0:
            first_losses = values
        if it >= setup["warmup"]:
            step_s.append(dt)
            fetch_s.append(t_fetch)
            hook_s.append(b.hook_s)
    print(json.dumps({"mode": mode, "step_s": step_s, "fetch_s": fetch_s, "hook_s": hook_s,
                      "step_median_s": median(step_s), "fetch_median_s": median(fetch_s),
                      "hook_median_s": median(hook_s),
                      "first_losses": first_losses, **b.memory()}))


def interleaved_main(argv: list[str]) -> None:
    """Child: ``_interleaved MODES SETUP_JSON`` - every mode on every batch, round-robin
    (order rotating each round), one student; per-round paired times."""
    modes, setup = argv[0].split(","), json.loads(argv[1])
    quiet_logs()
    b = Bench(setup, modes)
    rounds = []
    for it in range(setup["warmup"] + setup["steps"]):
        batches, t_fetch = b.batches_for(it)
        k = it % len(modes)
        times, hook = {}, {}
        for m in modes[k:] + modes[:k]:
            times[m], _ = b.step(m, batches[b.hooks[m].with_vlr], it)
            hook[m] = b.hook_s
        if it >= setup["warmup"]:
            rounds.append({"times": times, "hook": hook, "fetch": t_fetch})
    print(json.dumps({"modes": modes, "rounds": rounds}))


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
                res = run_child("benchmarks.step_bench", ["_worker", m, setup_arg])
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
            res = run_child("benchmarks.step_bench", ["_interleaved", ",".join(modes), setup_arg])
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
