"""Throughput of the dump's writer alone (encode, compress, checksum, commit), 1..N threads.

    python -m benchmarks.timings.writer_rate [--units 6] [--per-unit 16] [--threads 1,2,4] [--json OUT]

No teacher runs: finished units of synthetic ``ld`` rows at 1333x800 (``benchmarks.timings.synth_cache``:
2,500-4,200 rows per sample, 4 x 17 bins, ``--classes`` classes) are handed to the dump's own
``UnitWriter`` (``ldpipe.engine.dump``), which runs ``assemble_unit`` (int8 encode) and
``write_unit`` (zarr shards + zstd + crc32c, sha256 commit, shard bindings) on its threads, into a fresh local
store per setting.  Prints one JSON line: rows/s and samples/s per thread count, the rate a
teacher at ``--teacher-images-per-s`` x 2 variants needs, and a one-thread breakdown by part.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import torch

from ldpipe.cache.store import assemble_unit, content_sha, create_or_resume, open_root, to_disk, write_unit
from ldpipe.engine.dump import UnitWriter

from . import synth_cache as S
from ..common import emit, machine_info


def parts(root, units, m) -> dict:
    """CPU seconds (every thread of the process: zarr compresses on its own threads) per part
    of the writer, one writer thread, summed over ``units``."""
    t = {"encode": 0.0, "orient+sha256": 0.0, "zarr write (compress, crc32c, files)": 0.0}
    clock = time.process_time
    for u, items in units:
        a = clock()
        data = assemble_unit(items, m.codec, m.num_variants, m.box_step)
        b = clock()
        for name in ("anchor", "box", "cls"):
            content_sha(to_disk(name, getattr(data, name)))
        c = clock()
        write_unit(root, u, data, m.compressor, m.chunk_rows, bind=True)  # as the dump: orients, hashes again
        d = clock()
        t["encode"] += b - a
        t["orient+sha256"] += c - b
        t["zarr write (compress, crc32c, files)"] += (d - c) - (c - b)
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", type=int, default=6)
    ap.add_argument("--per-unit", type=int, default=16, help="samples per unit")
    ap.add_argument("--classes", type=int, default=80)
    ap.add_argument("--rows", default="2500,4200", help="rows per sample, min,max")
    ap.add_argument("--threads", default="1,2,4")
    ap.add_argument("--compressor", default="zstd")
    ap.add_argument("--teacher-images-per-s", type=float, default=100.0)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    lo, hi = (int(x) for x in args.rows.split(","))
    work = args.workdir or tempfile.mkdtemp(prefix="writer_rate_")
    pipe = S.pipeline(args.classes, args.per_unit, args.compressor)
    m = S.make_manifest(pipe, args.units * args.per_unit // 2, args.classes)
    pool = S.RowPool(args.classes)
    units = [(u, S.unit_items(u, m, (lo, hi), pool)) for u in range(m.num_units)]
    rows = sum(int(it.anchor.shape[0]) for _, items in units for it in items)
    samples = sum(len(items) for _, items in units)
    result = {"units": len(units), "samples": samples, "rows": rows, "rows_per_sample": rows / samples,
              "classes": args.classes, "compressor": args.compressor, "torch_threads": torch.get_num_threads(),
              "cpus": len(os.sched_getaffinity(0)), "by_threads": {}}
    for k in [int(x) for x in args.threads.split(",")]:
        out = os.path.join(work, f"t{k}.zarr")
        create_or_resume(out, m, overwrite=True)
        root = open_root(out, "a")
        t0, c0 = time.perf_counter(), time.process_time()
        w = UnitWriter(root, m.compressor, m.chunk_rows, m.codec, m.num_variants, threads=k, box_step=m.box_step)
        for u, items in units:
            w.put(u, items)
        w.close()
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        result["by_threads"][k] = {"seconds": dt, "cpu_seconds": cpu, "rows_per_s": rows / dt,
                                   "samples_per_s": samples / dt, "images_per_s": samples / dt / m.num_variants,
                                   "rows_per_cpu_s": rows / cpu}
        shutil.rmtree(out, ignore_errors=True)
    out = os.path.join(work, "parts.zarr")
    create_or_resume(out, m, overwrite=True)
    t = parts(open_root(out, "a"), units, m)
    result["one_thread_parts_cpu_ms_per_1k_rows"] = {k: v / rows * 1e6 for k, v in t.items()}
    need = args.teacher_images_per_s * m.num_variants * result["rows_per_sample"]
    best = max(result["by_threads"].values(), key=lambda r: r["rows_per_s"])
    per_cpu_s = rows / sum(t.values())
    result["needed_rows_per_s"] = need
    result["best_wall_over_needed"] = best["rows_per_s"] / need
    # what the CPU work allows if the writer had every core to itself and scaled perfectly
    # (an upper bound; on a shared machine the wall rates above are what happened)
    result["rows_per_cpu_s"] = per_cpu_s
    result["cpu_bound_rows_per_s_all_cores"] = per_cpu_s * result["cpus"]
    result["cpu_bound_over_needed"] = per_cpu_s * result["cpus"] / need
    result["machine"] = machine_info(torch.device("cpu"))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    emit(result, args.json)


if __name__ == "__main__":
    main()
