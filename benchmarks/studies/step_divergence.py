"""How far cached and online LD training drift apart, step by step.

Trains the same student (same seed, same data order) for a few iterations three or more
ways - from an fp32 cache, from an int8 cache, with the teacher online - logging the loss
of every step, and prints each run's relative difference from the online run per step.
An fp32 cache holds what the online teacher computes, so its column is the control: when
it drifts as far as the int8 column, the drift is the training's own sensitivity (floating
point summation order, chaotic dynamics), not the cache.

    .venv/bin/python -m benchmarks.studies.step_divergence pipelines/bccd_study.toml \\
        --teacher W/teacher/latest.pth --cache fp32=W/caches/teacher_fp32.zarr \\
        --cache int8=W/caches/teacher.zarr --iters 30 -o data.root=../shared/datasets/bccd

Each run is ``ldpipe train-student`` in its own work dir (``--workdir``, a temp dir by
default); ``--repeat`` trains the first cache twice to show whether a run is reproducible.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from ..common import command_line, fmt, machine_info, md_table, write_json


def _losses(work_dir: str) -> dict[int, float]:
    out = {}
    with open(os.path.join(work_dir, "metrics.jsonl")) as fh:
        for line in fh:
            rec = json.loads(line)
            if rec.get("type") == "train":
                out[int(rec["iter"])] = float(rec["loss"])
    return out


def _train(pipeline: str, model: str, work_dir: str, source: list[str], iters: int, seed: int,
           overrides: list[str]) -> dict[int, float]:
    ldpipe = os.path.join(os.path.dirname(sys.executable), "ldpipe")
    cmd = [ldpipe, "train-student", pipeline, "--model", model, "--work-dir", work_dir, *source,
           "-o", "train.epochs=1", "-o", f"train.max_iters_per_epoch={iters}",
           "-o", "train.log_interval=1", "-o", f"train.seed={seed}", "-o", "train.val_interval=0"]
    for o in overrides:
        cmd += ["-o", o]
    print("[step_divergence]", " ".join(cmd), file=sys.stderr, flush=True)
    if subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode != 0:  # ldpipe said why, above
        sys.exit(f"step_divergence: the {os.path.basename(work_dir)} run failed (see its error above)")
    return _losses(work_dir)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pipeline")
    ap.add_argument("--model", default="student")
    ap.add_argument("--teacher", required=True, help="checkpoint of the online teacher")
    ap.add_argument("--teacher-model", default="teacher")
    ap.add_argument("--cache", action="append", required=True, metavar="NAME=PATH",
                    help="a cache of that teacher (repeatable; the first is the one --repeat trains twice)")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", action="store_true", help="train the first cache twice")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("-o", "--override", action="append", default=[])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    root = args.workdir or tempfile.mkdtemp(prefix="ldpipe_stepdiv_")
    if args.workdir and os.path.isdir(root) and os.listdir(root):
        ap.error(f"--workdir {root} is not empty: each run needs a fresh work dir below it")
    caches = []
    for spec in args.cache:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            ap.error(f"--cache wants NAME=PATH, got {spec!r}")
        if name == "online" or name in dict(caches) or name.endswith(" again"):
            ap.error(f"--cache names must be unique and not 'online', got {name!r}")
        caches.append((name, path))

    def run(name: str, source: list[str]) -> dict[int, float]:
        return _train(args.pipeline, args.model, os.path.join(root, name), source, args.iters,
                      args.seed, args.override)

    online = run("online", ["--online-teacher", args.teacher, "--teacher-model", args.teacher_model])
    runs = {name: run(name, ["--cache", path]) for name, path in caches}
    if args.repeat:
        name, path = caches[0]
        runs[f"{name} again"] = run(f"{name}_again", ["--cache", path])

    steps = sorted(online)
    table = []
    per_step = {}
    for s in steps:
        row = [s, fmt(online[s], ".5f")]
        per_step[s] = {"online": online[s]}
        for name, losses in runs.items():
            if name.endswith(" again"):
                ref = runs[name[: -len(" again")]]
                d = abs(losses[s] - ref[s]) / max(abs(ref[s]), 1e-12)
            else:
                d = abs(losses[s] - online[s]) / max(abs(online[s]), 1e-12)
            per_step[s][name] = losses[s]
            row.append(f"{d:.1e}")
        table.append(row)
    header = ["step", "online loss"] + [
        (f"|{n} - {n[:-6]}| / {n[:-6]}" if n.endswith(" again") else f"|{n} - online| / online")
        for n in runs]
    print(md_table(header, table))
    if args.json:
        import torch
        write_json(args.json, {"benchmark": "step_divergence", "command": command_line(),
                               "machine": machine_info(torch.device("cpu")),
                               "iters": args.iters, "seed": args.seed, "losses": per_step})


if __name__ == "__main__":
    main()
