"""What drawing a cache's views costs, and how large their inputs are (no teacher needed).

    python -m benchmarks.studies.view_draws PIPELINE [-o key=value ...] [--count K] [--images N]

Draws ``K`` views per image of the pipeline's ``[[data.augment]]`` (as ``dump-teacher`` does
before the teacher runs: geometry only, no image decoded), times the draws and the padded-shape
computation the dump batches by, and compares the views' mean padded input (pixels, which the
anchor grid and so the stored rows scale with) with the fixed variants' (``train_scales`` x
flip).  Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import time

from ldpipe.config import ConfigError, load_pipeline
from ldpipe.data import load_split, padded_shape, train_variants
from ldpipe.data.views import draw_view, padded_view_shape, view_rng


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pipeline")
    ap.add_argument("-o", "--override", action="append", default=[])
    ap.add_argument("--count", type=int, default=8, help="views per image")
    ap.add_argument("--images", type=int, default=0, help="first N images only (0 = all)")
    args = ap.parse_args(argv)
    pipe = load_pipeline(args.pipeline, args.override)
    if not pipe.data.augment:
        raise ConfigError(f"{args.pipeline}: no [[data.augment]] steps to draw views of")
    split = load_split(pipe.data, "train")
    recs = split.records
    n = len(recs) if args.images <= 0 else min(args.images, len(recs))
    t0 = time.perf_counter()
    views = [draw_view(pipe.data.augment, recs, i, view_rng(0, i, k)) for i in range(n) for k in range(args.count)]
    t1 = time.perf_counter()
    shapes = [padded_view_shape(v, recs, pipe.data) for v in views]
    t2 = time.perf_counter()
    fixed = [padded_shape(recs[i], v, pipe.data) for i in range(n) for v in train_variants(pipe.data)]
    px = sum(h * w for h, w in shapes) / len(shapes)
    fixed_px = sum(h * w for h, w in fixed) / len(fixed)
    print(json.dumps({
        "pipeline": args.pipeline, "augment": [s.type for s in pipe.data.augment], "images": n,
        "views": len(views), "draw_ms_per_view": round(1e3 * (t1 - t0) / len(views), 3),
        "shape_ms_per_view": round(1e3 * (t2 - t1) / len(views), 3),
        "padded_pixels_per_view": round(px), "padded_pixels_per_fixed_variant": round(fixed_px),
        "pixels_ratio": round(px / fixed_px, 3), "padded_shapes": len(set(shapes)),
    }))


if __name__ == "__main__":
    main()
