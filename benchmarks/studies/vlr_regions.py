"""Region sizes of the two VLR definitions on a pipeline's training split (no teacher needed).

    python -m benchmarks.studies.vlr_regions PIPELINE [-o key=value ...] [--images N]

For every (image, variant) sample: the anchors of the ``main`` region (ATSS positives), of
the ``ld`` region with ``vlr_region = "reference"`` (the LD code's test, intersection over the
anchor's area) and with ``"diou"`` (true DIoU), and how many VLR anchors the two share.  The
regions are functions of the ground truth and the anchor grid alone.  Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from ldpipe.cache.region import region_index
from ldpipe.config import AssignerConfig, load_pipeline
from ldpipe.data import DetectionDataset, load_split, train_variants
from ldpipe.models.anchors import grid_tensors, make_grid
from ldpipe.models.assigner import atss_assign, vlr_weights


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pipeline")
    ap.add_argument("-o", "--override", action="append", default=[])
    ap.add_argument("--model", default="student", help="whose assigner settings to use")
    ap.add_argument("--images", type=int, default=0, help="first N images only (0 = all)")
    args = ap.parse_args(argv)
    pipe = load_pipeline(args.pipeline, args.override)
    cfg = pipe.model(args.model)
    split = load_split(pipe.data, "train")
    variants = train_variants(pipe.data)
    ds = DetectionDataset(split, pipe.data, variants)
    n = len(split.records) if args.images <= 0 else min(args.images, len(split.records))
    a = cfg.assigner
    specs = {r: [AssignerConfig(a.topk, a.ignore_iof_thr, r)] for r in ("reference", "diou")}
    tot = {"samples": 0, "grid_anchors": 0, "main": 0, "ld_reference": 0, "ld_diou": 0,
           "vlr_reference": 0, "vlr_diou": 0, "vlr_common": 0}
    t0 = time.time()
    for i in range(n):
        for v in range(len(variants)):
            s = ds[(i, v)]
            gt, ig, pad = s["gt_boxes"].float(), s["ignore_boxes"], s["meta"].pad_shape
            grid = make_grid(pad, cfg.strides, cfg.anchor_scale)
            anchors, _ = grid_tensors(grid)
            tot["samples"] += 1
            tot["grid_anchors"] += anchors.shape[0]
            tot["main"] += region_index("main", gt, ig, pad, cfg.strides, cfg.anchor_scale, specs["diou"]).numel()
            for r in ("reference", "diou"):
                tot[f"ld_{r}"] += region_index("ld", gt, ig, pad, cfg.strides, cfg.anchor_scale,
                                               specs[r]).numel()
            res = atss_assign(anchors, grid.num_level_anchors, gt, ig, a.topk, a.ignore_iof_thr)
            ref = vlr_weights(anchors, gt, res.thr, overlaps=res.overlaps, region="reference") > 0
            true = vlr_weights(anchors, gt, res.thr, overlaps=res.overlaps, region="diou") > 0
            tot["vlr_reference"] += int(ref.sum())
            tot["vlr_diou"] += int(true.sum())
            tot["vlr_common"] += int((ref & true).sum())
    k = max(tot["samples"], 1)
    out = {"pipeline": args.pipeline, "images": n, **tot,
           **{f"{key}_per_sample": tot[key] / k for key in ("main", "ld_reference", "ld_diou")},
           "ld_rows_ratio_reference_to_diou": tot["ld_reference"] / max(tot["ld_diou"], 1),
           "seconds": round(time.time() - t0, 1)}
    print(json.dumps(out))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
