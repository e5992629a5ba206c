"""The whole-programme saving: three students from one teacher, online LD vs ldpipe (one dump + cached).

    python -m benchmarks.timings.programme [--iters 300] [--images 100] [--size 128] [--width 8]
                                           [--channels 32] [--stacked-convs 2] [--device cpu|cuda] [--json OUT]

A scaled-down replica of the LD paper's COCO table: an R-101-like teacher and R-18 / R-34 /
R-50-like students (the same depths, every width divided by ``256 / --channels``), synthetic
images (``ldpipe data synth``) at ``--size`` px, 2 variants (no flip / flip).  The teacher's
weights are random (time and memory do not depend on them).  The pipeline is
``benchmarks/pipelines/programme.toml`` with the options as ``-o`` overrides, passed to every
stage's command.

The replica keeps the COCO programme's proportion of dumped to read samples: a training epoch
draws one variant of every image, so ``--iters`` iterations of ``--batch`` are
``iters x batch / images`` epochs (60 x 2 / 10 = 12, the 1x schedule), and each student reads
6x the ``2 x images`` samples the dump wrote, as 12 COCO epochs against a 2-variant dump do.

* online LD: ``ldpipe train-student --online-teacher`` for each student (the teacher forward
  runs every step);
* ldpipe: ``ldpipe dump-teacher`` once (both variants), then ``ldpipe train-student --cache``
  for each student.

Every stage runs as its own process (``--stage``), which reports its wall seconds, CPU seconds
(user + system, all threads) and peak resident memory (VmHWM); the teacher's parameter bytes
are printed next to the students' peaks.  Each stage's wall time is also split into ``loop_s``
(the dump's batch loop until its last unit is committed; the sum of a training run's epoch
times) and ``setup_s`` (the rest: imports, model and data set construction, checkpoint files):
the loops are what grows with a real data set and schedule, the setup is paid once per process
however long it runs, so a replica that is 10^4 times shorter than the programme inflates it.
Prints one JSON line with the totals and ratios of both.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from ..common import PIPELINES, REPO, emit, machine_info, override, peak_rss_mb

STUDENTS = (("s18", 18), ("s34", 34), ("s50", 50))
PIPELINE = str(PIPELINES / "programme.toml")  # extends synth_data.toml; values: the defaults


def schedule(iters: int, batch: int, images: int) -> tuple[int, int]:
    """(epochs, iterations per epoch) of ``iters`` iterations: an epoch visits every image once
    (one variant drawn per image, ``VariantSampler``), i.e. ``ceil(images / batch)`` batches."""
    per_epoch = max(1, -(-images // batch))
    return -(-iters // per_epoch), min(iters, per_epoch)


def pipeline_overrides(root: str, size: int, width: int, channels: int, iters: int, batch: int,
                       images: int, stacked_convs: int = 2) -> list[str]:
    """The ``-o`` overrides that make ``PIPELINE`` this run's: data root and size, the schedule
    of ``iters`` iterations, the batch, every model's widths (their depths are the file's)."""
    epochs, per_epoch = schedule(iters, batch, images)
    out = [override("data.root", root), override("data.train_scales", [[size, size]]),
           override("data.test_scale", [size, size]), override("train.epochs", epochs),
           override("train.max_iters_per_epoch", per_epoch), override("train.batch_size", batch)]
    for name, _ in (("teacher", 101), *STUDENTS):
        out += [override(f"models.{name}.base_channels", width), override(f"models.{name}.channels", channels),
                override(f"models.{name}.stacked_convs", stacked_convs)]
    return out + [override("cache.batch_size", batch)]


def with_overrides(command: list[str], overrides: list[str]) -> list[str]:
    """An ldpipe command line (``COMMAND PIPELINE ...``) with ``-o KEY=VALUE`` for each override."""
    return [*command, *(x for o in overrides for x in ("-o", o))]


def stage(args: list[str]) -> None:
    """One ldpipe command in this process; prints its cost as JSON."""
    from ldpipe.cli import main as cli
    t, c = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    try:
        cli.main(args, standalone_mode=False)
    finally:
        r = resource.getrusage(resource.RUSAGE_SELF)
        print(json.dumps({"seconds": time.perf_counter() - t,
                          "cpu_s": (r.ru_utime - c.ru_utime) + (r.ru_stime - c.ru_stime),
                          "peak_rss_mb": peak_rss_mb()}))


def loop_seconds(args: list[str], stdout: str) -> tuple[float, int]:
    """(loop seconds, iterations or samples) of a finished stage: the dump's own ``seconds``
    (its summary line on stdout), or the epoch times and last iteration of a training run's
    ``metrics.jsonl``."""
    if args[0] == "dump-teacher":
        for line in stdout.splitlines():
            if line.startswith("{") and '"cache_id"' in line:
                d = json.loads(line)
                return float(d["seconds"]), int(d["rank_images"])
        raise ValueError("the dump printed no summary line")
    work_dir = args[args.index("--work-dir") + 1]
    with open(os.path.join(work_dir, "metrics.jsonl")) as fh:
        epochs = [r for r in map(json.loads, fh) if r.get("type") == "epoch"]
    return sum(r["time_s"] for r in epochs), (epochs[-1]["iter"] if epochs else 0)


def run_stage(args: list[str], env: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.timings.programme", "--stage", json.dumps(args)],
                          cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"stage {' '.join(args[:2])} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["loop_s"], out["work"] = loop_seconds(args, proc.stdout)
    out["setup_s"] = out["seconds"] - out["loop_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=300, help="training iterations per student")
    ap.add_argument("--images", type=int, default=100, help="synthetic training images (x 2 variants)")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--width", type=int, default=8, help="ResNet base width (64 at full size)")
    ap.add_argument("--channels", type=int, default=32, help="FPN/head channels (256 at full size)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--stacked-convs", type=int, default=2, help="head convs per branch (4 in GFL)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage:
        return stage(json.loads(args.stage))

    import torch

    from ldpipe.config import load_pipeline
    from ldpipe.data import synthesize
    from ldpipe.models import build_model
    from ldpipe.models.checkpoint import save_checkpoint
    work = args.workdir or tempfile.mkdtemp(prefix="programme_")
    root = os.path.join(work, "synth")
    synthesize(root, n_train=args.images, n_val=4, seed=0)
    pfile = PIPELINE
    overrides = pipeline_overrides(root, args.size, args.width, args.channels, args.iters, args.batch,
                                   args.images, args.stacked_convs)
    pipe = load_pipeline(pfile, overrides)
    torch.manual_seed(0)
    teacher = build_model(pipe.model("teacher"), 4)  # the synthetic set has 4 classes
    teacher_bytes = sum(p.numel() * p.element_size() for p in teacher.parameters())
    ckpt = os.path.join(work, "teacher.pth")
    save_checkpoint(ckpt, teacher, {})
    del teacher
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    dev = ["--device", args.device]
    cache = os.path.join(work, "teacher.zarr")
    res: dict = {"online": {}, "ldpipe": {}}
    # alternate the modes student by student, so a change of machine load hits both alike
    res["ldpipe"]["dump"] = run_stage(with_overrides(["dump-teacher", pfile, "--model", "teacher", "--checkpoint",
                                                      ckpt, "--out", cache, *dev], overrides), env)
    for name, _ in STUDENTS:
        res["online"][name] = run_stage(with_overrides(
            ["train-student", pfile, "--model", name, "--online-teacher", ckpt,
             "--work-dir", os.path.join(work, f"online_{name}"), *dev], overrides), env)
        res["ldpipe"][name] = run_stage(with_overrides(
            ["train-student", pfile, "--model", name, "--cache", cache,
             "--work-dir", os.path.join(work, f"cached_{name}"), *dev], overrides), env)
    keys = ("seconds", "cpu_s", "loop_s", "setup_s")
    totals = {mode: {k: sum(s[k] for s in stages.values()) for k in keys} for mode, stages in res.items()}
    epochs, _ = schedule(args.iters, args.batch, args.images)
    iters = {n: res["ldpipe"][n]["work"] for n, _ in STUDENTS}
    if any(i != args.iters for i in iters.values()):
        sys.exit(f"the students ran {iters} iterations, not --iters {args.iters}")
    out = {"iters_per_student": args.iters, "epochs": epochs, "samples": args.images * 2,
           "student_reads_per_dumped_sample": args.iters * args.batch / (2 * args.images),
           "size": args.size,
           "width": args.width, "channels": args.channels, "stacked_convs": args.stacked_convs,
           "batch": args.batch, "device": args.device,
           "teacher_param_bytes": teacher_bytes, "stages": res, "totals": totals,
           "online_over_ldpipe": {k: totals["online"][k] / totals["ldpipe"][k] for k in keys},
           "student_peak_rss_mb": {mode: {n: res[mode][n]["peak_rss_mb"] for n, _ in STUDENTS}
                                   for mode in ("online", "ldpipe")},
           "machine": machine_info(torch.device(args.device))}
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    emit(out, args.json)


if __name__ == "__main__":
    main()
