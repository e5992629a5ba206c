"""dump_bench's measurements of finished stores: bytes on disk by array, rows and the dense fp16
size per sample, and random-access read latency (in a fresh child process)."""
from __future__ import annotations

import json
import os

from ..common import now, percentile, quiet_logs, run_child


# ------------------------------------------------------------------ sizes
def store_bytes(path: str) -> dict:
    """Bytes of every file under ``path``, total and by array (units/*/NAME, index, metadata)."""
    parts: dict[str, int] = {}
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            full = os.path.join(dirpath, f)
            size = os.path.getsize(full)
            total += size
            rel = os.path.relpath(full, path).split(os.sep)
            if rel[0] == "units" and len(rel) >= 4:
                key = rel[2]
            elif rel[0] == "index":
                key = "index"
            else:
                key = "metadata"
            if rel[-1] == "zarr.json" and key != "index":
                key = "metadata"
            parts[key] = parts.get(key, 0) + size
    return {"total": total, "parts": parts}


def cache_stats(path: str) -> dict:
    """Samples, stored rows and the dense fp16 size of each sample's own grid."""
    import numpy as np
    from ldpipe.cache import CacheReader
    from ldpipe.cache.manifest import F
    reader = CacheReader(path)
    m = reader.manifest
    geo = m.geometry
    table = reader.table
    per_anchor = 4 * geo.reg_bins + geo.num_classes
    dense = []
    grids: dict = {}
    for rec in table:
        pad = (int(rec[F["pad_h"]]), int(rec[F["pad_w"]]))
        if pad not in grids:
            grids[pad] = geo.grid(pad).num_anchors
        dense.append(grids[pad] * per_anchor * 2)
    rows = table[:, F["row_count"]].astype(np.float64)
    anchors = np.array([grids[(int(r[F["pad_h"]]), int(r[F["pad_w"]]))] for r in table], np.float64)
    return {"samples": int(table.shape[0]), "rows_per_sample": float(rows.mean()),
            "anchors_per_sample": float(anchors.mean()),
            "region_fraction": float((rows / anchors).mean()),
            "dense_fp16_bytes_per_sample": float(np.mean(dense)),
            "policy": m.region.policy, "codec": m.codec, "store_cls": m.store_cls}


# ------------------------------------------------------------------ read latency (child)
def read_latency_main(argv: list[str]) -> None:
    """Child process: ``_read_latency JSON`` with {"stores": [...], "n": N, "seed": S}."""
    import random
    cfg = json.loads(argv[0])
    quiet_logs()
    import torch
    torch.set_num_threads(1)  # as in loader workers (ldpipe.engine.runtime.worker_init)
    from ldpipe.cache import CacheReader
    from ldpipe.cache.manifest import F
    out = {}
    for path in cfg["stores"]:
        reader = CacheReader(path)
        rng = random.Random(cfg["seed"])
        t0 = now()
        table = reader.table  # opens the store, loads the index
        t_open = now() - t0
        keys = [(int(r[F["image_index"]]), int(r[F["variant"]])) for r in table]
        picks = [rng.choice(keys) for _ in range(cfg["n"])]
        t0 = now()
        reader.read(*picks[0])
        first = now() - t0
        times = []
        for key in picks[1:]:
            t0 = now()
            reader.read(*key)
            times.append((now() - t0) * 1e3)
        out[path] = {"open_ms": t_open * 1e3, "first_read_ms": first * 1e3, "n": len(times),
                     "p50_ms": percentile(times, 50), "p99_ms": percentile(times, 99),
                     "mean_ms": sum(times) / max(len(times), 1)}
    print(json.dumps(out))


def read_latency(stores: list[str], n: int, seed: int) -> dict:
    if n <= 1 or not stores:
        return {}
    return run_child("benchmarks.timings.dump_bench",
                     ["_read_latency", json.dumps({"stores": stores, "n": n, "seed": seed})])
