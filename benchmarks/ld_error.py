"""LD-loss error of one cache against another (e.g. int8 vs fp32 of the same teacher).

    python -m benchmarks.ld_error REFERENCE.zarr OTHER.zarr [--T 10] [--seed 0]

Over every sample both hold (same anchors required), the mean per-edge LD loss
``kd_kl(student, teacher, T)`` against a fixed random "student" distribution (logits ~ N(0, 3^2)),
with the teacher read from each cache; prints both and the relative error.
"""
from __future__ import annotations

import argparse
import json

import torch

from ldpipe.cache.store import F, CacheReader
from ldpipe.distill.losses import kd_kl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reference")
    ap.add_argument("other")
    ap.add_argument("--T", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    a, b = CacheReader(args.reference), CacheReader(args.other)
    bins = a.manifest["geometry"]["reg_max"] + 1
    gen = torch.Generator().manual_seed(args.seed)
    ref = oth = 0.0
    edges = samples = 0
    for row in a.table:
        i, v = int(row[F["image_index"]]), int(row[F["variant"]])
        if not b.has(i, v):
            continue
        ra, rb = a.read(i, v, with_cls=False), b.read(i, v, with_cls=False)
        if not torch.equal(ra["anchor"], rb["anchor"]):
            raise SystemExit(f"sample (image {i}, variant {v}): the caches store different anchors")
        ta, tb = ra["box"].reshape(-1, bins), rb["box"].reshape(-1, bins)
        s = torch.randn(ta.shape, generator=gen) * 3
        ref += float(kd_kl(s, ta, args.T).sum())
        oth += float(kd_kl(s, tb, args.T).sum())
        edges += ta.shape[0]
        samples += 1
    out = {"samples": samples, "edges": edges, "T": args.T, "ld_reference": ref / max(edges, 1),
           "ld_other": oth / max(edges, 1), "relative_error": abs(oth - ref) / max(ref, 1e-12)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
