"""LD-loss error of one cache against another (e.g. int8 vs fp32 of the same teacher).

    python -m benchmarks.studies.ld_error REFERENCE.zarr OTHER.zarr [--T 10] [--seed 0]

Over every sample both hold (same anchors required), the per-edge LD loss
``kd_kl(student, teacher, T)`` with the teacher read from each cache, for two fixed students:

* ``random``: logits ~ N(0, 3^2), far from the teacher (large losses);
* ``near``: the reference teacher's log-probabilities + N(0, 1) noise - a student that has
  nearly learned the teacher, where the loss is small and a codec's error weighs most.

Prints, per student, the mean loss from each cache, the relative error of the summed loss
and the mean per-edge relative error.
"""
from __future__ import annotations

import argparse
import json

import torch

from ldpipe.cache import CacheError, CacheReader
from ldpipe.cache.manifest import F
from ldpipe.distill.losses import kd_kl


def edge_losses(ref: torch.Tensor, other: torch.Tensor, T: float,
                gen: torch.Generator) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-edge LD losses (float64) against the reference and the other teacher rows
    ``[E, bins]``, for a far (``random``) and a ``near`` student drawn from ``gen``."""
    students = {"random": torch.randn(ref.shape, generator=gen) * 3,
                "near": ref + torch.randn(ref.shape, generator=gen)}
    return {name: (kd_kl(s, ref, T).double(), kd_kl(s, other, T).double())
            for name, s in students.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reference")
    ap.add_argument("other")
    ap.add_argument("--T", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    a, b = CacheReader(args.reference), CacheReader(args.other)
    bins = a.manifest.geometry.reg_bins
    gen = torch.Generator().manual_seed(args.seed)
    sums = {k: [0.0, 0.0, 0.0] for k in ("random", "near")}  # reference, other, sum |rel err|
    edges = samples = 0
    for row in a.table:
        i, v = int(row[F["image_index"]]), int(row[F["variant"]])
        if not b.has(i, v):
            continue
        ra, rb = a.read(i, v, with_cls=False), b.read(i, v, with_cls=False)
        if not torch.equal(ra["anchor"], rb["anchor"]):
            raise SystemExit(f"sample (image {i}, variant {v}): the caches store different anchors")
        ta, tb = ra["box"].reshape(-1, bins), rb["box"].reshape(-1, bins)
        for name, (la, lb) in edge_losses(ta, tb, args.T, gen).items():
            acc = sums[name]
            acc[0] += float(la.sum())
            acc[1] += float(lb.sum())
            acc[2] += float(((lb - la).abs() / la.clamp(min=1e-12)).sum())
        edges += ta.shape[0]
        samples += 1
    n = max(edges, 1)
    out = {"samples": samples, "edges": edges, "T": args.T}
    for name, (ref, oth, rel) in sums.items():
        out[name] = {"ld_reference": ref / n, "ld_other": oth / n,
                     "relative_error": abs(oth - ref) / max(ref, 1e-12),
                     "mean_edge_relative_error": rel / n}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    try:
        main()
    except CacheError as exc:  # a missing or unreadable cache: its name, no traceback
        raise SystemExit(f"error: {exc}") from None
