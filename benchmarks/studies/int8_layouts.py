"""How 8-bit box rows compress under different scale choices and byte layouts.

    python -m benchmarks.studies.int8_layouts FP32_CACHE [--chunk 1024]

Reads every box row of an fp32 cache (log-probabilities ``[rows, 4, B]``), quantises them
with several 8-bit schemes and measures, per stored row, the Zstd-3 compressed bytes of
chunks of ``--chunk`` rows (as the store writes them) under four layouts:

* ``plain``  - rows first, as version 1 of the format stored them;
* ``T``      - rows last (one bin of consecutive rows contiguous);
* ``delta``  - rows first, byte-wise delta over the flattened chunk;
* ``Tdelta`` - rows last + delta along the rows: what format version 2 stores.

Schemes: per-edge float16 scale over the row's own range (``cache.int8_box_step = 0``), one
scale per anchor, the row maximum shifted to 0, and smallest steps of 1/16, 1/8 (the codec's
default grid) and 1/4 nat.  ``--sharpen 1,3,5`` repeats the table for the teacher's logits x k
(a sharper, converged teacher).  For each it also reports the LD-loss error
against fp32 (``kd_kl`` at T = 10) for a far student (N(0, 9) logits) and a near one (the
teacher + N(0, 1)): relative error of the summed loss / mean per-edge relative error.
"""
from __future__ import annotations

import argparse

import numcodecs
import numpy as np
import torch

from ldpipe.cache.codec import CLIP
from ldpipe.cache import CacheError, CacheReader
from ldpipe.cache.manifest import F

from .ld_error import edge_losses

ZSTD = numcodecs.Zstd(level=3)


def compressed(arr: np.ndarray, chunk: int, rows_last: bool, delta: bool) -> int:
    total = 0
    for s in range(0, arr.shape[0], chunk):
        c = arr[s:s + chunk]
        if rows_last:
            c = np.moveaxis(c, 0, -1)
        b = np.ascontiguousarray(c).reshape(-1)
        if delta:
            b = np.diff(b, prepend=b[:1] * 0).astype(b.dtype)
        total += len(ZSTD.encode(b.tobytes()))
    return total


def quantise(x: torch.Tensor, per: str, shift: bool, min_step: float):
    """8-bit codes [R, 4*B (+ scale bytes)] and the decoded log-probabilities."""
    if shift:
        x = x - x.max(dim=-1, keepdim=True).values
    lo = x.min(dim=-1).values if per == "edge" else x.amin(dim=(-1, -2))
    step = ((-lo).clamp(min=1e-6) / 255).clamp(min=min_step).half().float()
    s = step[..., None] if per == "edge" else step[:, None, None]
    q = torch.round(-x / s).clamp(0, 255).to(torch.uint8)
    scale_bytes = step.half().numpy().view(np.uint8).reshape(x.shape[0], -1)
    packed = np.concatenate([q.numpy().reshape(x.shape[0], -1), scale_bytes], axis=1)
    return packed, -q.float() * s


def ld_errors(ref: torch.Tensor, dec: torch.Tensor, seed: int = 0) -> list[tuple[float, float]]:
    """(relative error of the summed loss, mean per-edge relative error), far then near student."""
    bins = ref.shape[-1]
    losses = edge_losses(ref.reshape(-1, bins), dec.reshape(-1, bins), 10.0,
                         torch.Generator().manual_seed(seed))
    return [(float((b.sum() - a.sum()).abs() / a.sum()),
             float(((b - a).abs() / a.clamp(min=1e-12)).mean())) for a, b in losses.values()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cache", help="an fp32 cache")
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--sharpen", default="1", help="comma-separated factors k: the teacher's "
                    "logits x k (a sharper, converged teacher), each a table")
    ap.add_argument("--samples", type=int, default=0, help="first N samples only (0 = all)")
    args = ap.parse_args()
    try:
        factors = [float(v) for v in args.sharpen.split(",")]
    except ValueError:
        ap.error(f"--sharpen wants comma-separated numbers, got {args.sharpen!r}")
    if any(k <= 0 for k in factors):
        ap.error(f"--sharpen factors must be > 0, got {args.sharpen!r}")
    r = CacheReader(args.cache)
    if r.manifest.codec != "fp32":
        raise SystemExit(f"{args.cache}: codec {r.manifest.codec}, need an fp32 cache")
    table = r.table[: args.samples] if args.samples > 0 else r.table
    base = torch.cat([r.read(int(rec[F["image_index"]]), int(rec[F["variant"]]), with_cls=False)["box"]
                      for rec in table])
    rows = base.shape[0]
    schemes = [("per-edge scale (format)", "edge", False, 0.0), ("per-anchor scale", "anchor", False, 0.0),
               ("per-edge, max shifted to 0", "edge", True, 0.0),
               ("per-edge, step >= 1/16", "edge", False, 1 / 16),
               ("per-edge, step >= 1/8 (codec default)", "edge", False, 1 / 8),
               ("per-edge, step >= 1/8, max shifted to 0", "edge", True, 1 / 8),
               ("per-edge, step >= 1/4", "edge", False, 1 / 4)]
    for k in factors:
        box = torch.log_softmax(base.double() * k, dim=-1).float() if k != 1 else base
        x = box.clamp(min=-CLIP)
        print(f"{args.cache}: {len(table)} samples, {rows} box rows, logits x {k:g}; "
              "bytes per row (raw -> zstd); LD-loss error (T = 10) vs fp32")
        print("| scheme | raw | plain | T | delta | Tdelta | far: sum / mean edge | near: sum / mean edge |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, per, shift, min_step in schemes:
            packed, dec = quantise(x, per, shift, min_step)
            sizes = [compressed(packed, args.chunk, t, d) / rows for t, d in
                     ((False, False), (True, False), (False, True), (True, True))]
            (fs, fm), (ns, nm) = ld_errors(box, dec)
            print(f"| {name} | {packed.shape[1]} | " + " | ".join(f"{v:.1f}" for v in sizes) +
                  f" | {fs:.1e} / {fm:.1e} | {ns:.1e} / {nm:.1e} |")
        print()


if __name__ == "__main__":
    try:
        main()
    except CacheError as exc:  # a missing or unreadable cache: its name, no traceback
        raise SystemExit(f"error: {exc}") from None
