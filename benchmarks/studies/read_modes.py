"""Per-sample read time of a cache with and without whole-unit preloading (values must be equal).

    python -m benchmarks.studies.read_modes [CACHE] [--reads 300]   (default: the demo chain's TA cache)
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ldpipe.cache import CacheReader
from ldpipe.cache.manifest import F


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cache", nargs="?", default="work_dirs/demo/caches/ta.zarr")
    ap.add_argument("--reads", type=int, default=300)
    args = ap.parse_args()
    whole, direct = CacheReader(args.cache), CacheReader(args.cache, preload_bytes=0)
    print(f"preload chosen for this cache: {whole._open()['units'].decoded}")
    rows = whole.table[np.random.default_rng(0).permutation(len(whole.table))[:args.reads]]
    keys = [(int(r[F["image_index"]]), int(r[F["variant"]])) for r in rows]
    for name, reader in (("shard reads", direct), ("preloaded units", whole)):
        for attempt in ("first pass", "second pass"):
            t = time.perf_counter()
            for i, v in keys:
                reader.read(i, v)
            print(f"{name:16s} {attempt}: {(time.perf_counter() - t) / len(keys) * 1e3:.2f} ms/sample")
    for i, v in keys[:50]:
        x, y = whole.read(i, v), direct.read(i, v)
        assert torch.equal(x["anchor"], y["anchor"]) and torch.equal(x["box"], y["box"])
    print("values equal")


if __name__ == "__main__":
    main()
