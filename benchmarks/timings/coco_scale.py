"""A COCO-sized teacher cache: open time and memory of a fresh reader, read latency, verify, info.

    python -m benchmarks.timings.coco_scale [--images 118287] [--full-units 4] [--per-unit 256]
                                    [--workdir DIR] [--keep] [--json OUT]

Writes (through the real writer, ``benchmarks.timings.synth_cache``) an ``ld``/int8 cache of
``--images`` x 2 variants at 1333x800 with 80 classes and synthetic values, then

* ``open_s`` / ``rss_mb``: in a fresh process (as a DataLoader worker or a DDP rank starts),
  after its imports, the time to open the cache and its index (``CacheReader`` + its first
  sample lookup) and how much its resident memory grew by it;
* ``read_p50_ms`` / ``read_p99_ms``: that process reading ``--reads`` random samples of the
  full-size units (decoded rows, no preloading: the cache is far larger than 128 MiB);
* ``verify_s``: ``ldpipe.cache.verify`` of the whole cache (units on a thread pool);
* ``info_s``: ``ldpipe.cache.info.info``.

What is synthetic: every value.  What is full size: the index and metadata of every sample
(the per-sample table, scale factors, unit map, the manifest's image ids) and every unit's
commit.  Disk is the limit (236k real samples are ~70 GB): ``--full-units`` units, evenly
spread, hold realistic rows (2,500-4,200 per sample); the others hold 8-16 rows per sample.
Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from ..common import REPO, emit, machine_info, percentile, rss_mb


def child(url: str, reads: int, full: list[int]) -> None:
    """The fresh process: imports first, then open (timed, RSS measured), then reads."""
    import numpy as np

    from ldpipe.cache import CacheReader
    from ldpipe.cache.manifest import F
    before = rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    reader = CacheReader(url)
    table = reader.table  # opens: manifest, index arrays, sample positions
    reader.has(0, 0)
    open_s, open_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    grown = rss_mb() - before
    unit_of = reader._open()["unit_of"]
    pick = np.nonzero(np.isin(unit_of, full))[0]
    rng = np.random.default_rng(0)
    times = []
    rows = 0
    for i in rng.choice(pick, size=min(reads, len(pick)), replace=False):
        rec = table[i]
        t = time.perf_counter()
        got = reader.read(int(rec[F["image_index"]]), int(rec[F["variant"]]))
        times.append((time.perf_counter() - t) * 1e3)
        rows += int(got["anchor"].shape[0])
    print(json.dumps({"open_s": open_s, "open_cpu_s": open_cpu_s, "rss_mb": grown, "rss_before_open_mb": before,
                      "preloaded": reader._open()["units"].decoded, "reads": len(times),
                      "read_rows_per_sample": rows / max(len(times), 1),
                      "read_p50_ms": percentile(times, 50), "read_p99_ms": percentile(times, 99)}))


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=118287)
    ap.add_argument("--per-unit", type=int, default=256, help="samples per unit (cache.samples_per_shard)")
    ap.add_argument("--full-units", type=int, default=4, help="units with realistic row counts")
    ap.add_argument("--classes", type=int, default=80)
    ap.add_argument("--reads", type=int, default=200)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the cache in --workdir")
    ap.add_argument("--json", default=None)
    ap.add_argument("--index-only", action="store_true",
                    help="write only the manifest and the full-size index (no units) and measure "
                         "open_s / rss_mb: seconds at any size; no reads, verify or info")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-full", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.reads, [int(x) for x in args.child_full.split(",") if x])

    import torch

    from ldpipe.cache.info import info
    from ldpipe.cache.verify import verify

    from . import synth_cache as S
    work = args.workdir or tempfile.mkdtemp(prefix="coco_scale_")
    url = os.path.join(work, f"coco_{args.images}.zarr")
    t0 = time.perf_counter()
    if args.index_only:
        built = {**S.build_index_only(url, args.images, args.classes, args.per_unit), "rows": None,
                 "full_units": []}
    else:
        built = S.build(url, args.images, num_classes=args.classes, per_unit=args.per_unit,
                        full_units=args.full_units)
    full = built["full_units"]
    out = {"samples": built["samples"], "images": args.images, "units": built["units"],
           "full_units": len(full), "rows": built["rows"], "write_s": time.perf_counter() - t0,
           "stored_bytes": du(url)}
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.timings.coco_scale", "--child", url, "--reads",
                           str(args.reads), "--child-full", ",".join(map(str, full))],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    out.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    if not args.index_only:
        t, c = time.perf_counter(), time.process_time()
        report = verify(url)
        out["verify_s"], out["verify_cpu_s"] = time.perf_counter() - t, time.process_time() - c
        out["verify_ok"] = report["ok"]
        out["verify_errors"] = report["errors"][:3]
        t, c = time.perf_counter(), time.process_time()
        d = info(url)
        out["info_s"], out["info_cpu_s"] = time.perf_counter() - t, time.process_time() - c
        out["info_samples"] = d["samples_committed"]
    out["goals"] = {"open_s<=2": out["open_s"] <= 2, "rss_mb<=200": out["rss_mb"] <= 200}
    out["synthetic"] = ("index only (manifest + full-size index/, no units)" if args.index_only else
                        "values synthetic; index, manifest and commits of every sample full size; "
                        f"{len(full)} of {built['units']} units with 2500-4200 rows per sample, the others 8-16")
    out["machine"] = machine_info(torch.device("cpu"))
    if not args.keep and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    elif not args.keep:
        shutil.rmtree(url, ignore_errors=True)
    emit(out, args.json)


if __name__ == "__main__":
    main()
