"""Reading a cache too large to preload through a DataLoader, 0/2/4/8 workers: samples/s and p99.

    python -m benchmarks.timings.loader_rate [--images 200] [--workers 0,2,4,8] [--chunk-rows 1024]
                                     [--device cpu|cuda] [--json OUT]

Builds (``benchmarks.timings.synth_cache``, the real writer) an ``ld``/int8 cache at 1333x800 with
synthetic values: 2,500-4,200 rows per sample (BCCD's measured ``ld`` rows at 1333x800), 4 x 17
bins, ``--classes`` classes, ``--images`` x 2 variants; its decoded rows exceed the reader's
128 MiB preload limit, so every read decodes the sample's rows from the shards, as on COCO.
Each setting reads the same random order of samples through ``ldpipe.cache.CacheReader`` in a
``torch.utils.data.DataLoader`` of ``--batch`` samples, as training does
(``ldpipe.distill.loader.CacheTargets``): on a GPU the workers hand over the rows as stored
(8-bit rows for int8) and the main process copies each batch to the device (pinned memory) and
decodes it there (``codec.decode_packed``); on the CPU the workers decode (numpy).
``--decode-in main|workers`` forces one of the two.  Reported per worker count: samples/s after the first batch,
p50/p99 of the wait for each batch, and (0 workers) CPU ms per sample.  The rate to compare
with is the issue's estimate for an R-18 GFL student at 1333x800: 60-100 images/s per H100
(not measured here).
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np
import torch

from ldpipe.cache import CacheReader
from ldpipe.cache.codec import decode_packed
from ldpipe.cache.manifest import F

from ..common import emit, machine_info, percentile, resolve_device

GPU_RATE = (60.0, 100.0)  # the estimate, images/s of an R-18 GFL student per H100


class CachedRows(torch.utils.data.Dataset):
    def __init__(self, url: str, keys: list[tuple[int, int]], decode: bool = False) -> None:
        self.reader, self.keys, self.decode = CacheReader(url), keys, decode

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, k: int) -> dict:
        i, v = self.keys[k]
        return self.reader.read(i, v, decode=self.decode)


def collate(items: list[dict]) -> list[dict]:
    return items


def run(url: str, keys, workers: int, batch: int, device, decode_in: str = "main") -> dict:
    ds = CachedRows(url, keys, decode=decode_in == "workers")
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False, num_workers=workers,
                                         collate_fn=collate, pin_memory=device.type == "cuda",
                                         persistent_workers=False)
    waits, n, t_first = [], 0, None
    c0 = time.process_time()
    t = time.perf_counter()
    for got in loader:
        for d in got:  # what CachedTeacher.prepare does with each sample's rows
            d["anchor"].to(device, non_blocking=True)
            for k in ("box", "cls"):
                if d.get(k) is None:
                    continue
                x = d[k].to(device, non_blocking=True)
                if "codec" in d:
                    decode_packed(x, d["codec"])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        if t_first is None:
            t_first = now  # worker start-up and the first batch are not the steady rate
        else:
            waits.append((now - t) * 1e3)
            n += len(got)
        t = now
    elapsed = time.perf_counter() - t_first if t_first else 0.0
    out = {"workers": workers, "decode_in": decode_in, "samples": n, "seconds": elapsed,
           "samples_per_s": n / elapsed if elapsed else None,
           "batch_wait_p50_ms": percentile(waits, 50), "batch_wait_p99_ms": percentile(waits, 99)}
    if workers == 0:
        out["cpu_ms_per_sample"] = (time.process_time() - c0) / max(len(keys), 1) * 1e3
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200, help="images (x 2 variants)")
    ap.add_argument("--classes", type=int, default=80)
    ap.add_argument("--workers", default="0,2,4,8")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reads", type=int, default=240, help="samples read per setting")
    ap.add_argument("--chunk-rows", type=int, default=1024, help="cache.chunk_rows of the built cache")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--cache", default=None, help="an existing cache to read instead of building one")
    ap.add_argument("--decode-in", default="auto", choices=["auto", "main", "workers"],
                    help="where the rows are decoded (auto: as training does - main on a GPU, workers on the CPU)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = resolve_device(args.device)
    if args.decode_in == "auto":
        args.decode_in = "main" if device.type == "cuda" else "workers"
    work = args.workdir or tempfile.mkdtemp(prefix="loader_rate_")
    url = args.cache or os.path.join(work, "big.zarr")
    built = None
    if not args.cache:
        from . import synth_cache as S
        built = S.build(url, args.images, num_classes=args.classes, per_unit=64, chunk_rows=args.chunk_rows)
    reader = CacheReader(url)
    table = reader.table
    decoded = reader.manifest.row_bytes() * int(table[:, F["row_count"]].sum())
    stored = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(url) for f in fs) \
        if os.path.isdir(url) else None
    order = np.random.default_rng(0).permutation(len(table))[:args.reads]
    keys = [(int(table[i, F["image_index"]]), int(table[i, F["variant"]])) for i in order]
    result = {"cache": url, "samples_in_cache": int(len(table)), "decoded_bytes": decoded,
              "stored_bytes": stored, "preloaded": reader._open()["units"].decoded,
              "rows_per_sample": float(table[:, F["row_count"]].mean()), "classes": args.classes,
              "chunk_rows": reader.manifest.chunk_rows,
              "batch": args.batch, "device": str(device), "build": built, "by_workers": []}
    for w in [int(x) for x in args.workers.split(",")]:
        result["by_workers"].append(run(url, keys, w, args.batch, device, args.decode_in))
    best = max(r["samples_per_s"] or 0 for r in result["by_workers"])
    result["gpu_student_images_per_s_estimate"] = list(GPU_RATE)
    result["best_over_3x_one_gpu"] = [best / (3 * r) for r in GPU_RATE]
    result["machine"] = machine_info(device)
    if not args.workdir and not args.cache:
        shutil.rmtree(work, ignore_errors=True)
    emit(result, args.json)


if __name__ == "__main__":
    main()
