"""COCO evaluation: pycocotools vs faster-coco-eval on a synthetic set of detections.

Makes ``--images`` images with 1-``--max-gts`` ground-truth boxes of ``--classes`` classes
(some crowd), and ``--dets`` detections per image (jittered copies of the GTs plus random
false positives), then runs :func:`ldpipe.metrics.coco_metrics` with each back end
``--reps`` times.  Prints the median seconds, the speed-up and whether every metric
(the 12 COCO numbers) is identical, and the largest per-class AP difference; ``--json OUT`` writes it all with the
command line and the machine.

    python -m benchmarks.timings.coco_eval_bench --images 2000 --reps 3 --json results/coco_eval.json
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks.common import command_line, machine_info, md_table, median, write_json


def synthetic_case(images: int, classes: int, max_gts: int, dets: int, seed: int = 0):
    """(records, class names, detections) of a synthetic evaluation set."""
    from types import SimpleNamespace as Record  # the attributes ldpipe.metrics reads
    rng = np.random.default_rng(seed)
    names = [f"c{i}" for i in range(classes)]
    records, detections = [], []
    for image_id in range(1, images + 1):
        n = int(rng.integers(1, max_gts + 1))
        xy = rng.uniform(0, 500, (n, 2))
        wh = rng.uniform(8, 200, (n, 2))
        boxes = np.concatenate([xy, np.minimum(xy + wh, 640)], 1).astype(np.float32)
        labels = rng.integers(0, classes, n)
        crowd = rng.random(n) < 0.05
        records.append(Record(image_id=image_id, file_name=f"{image_id}.jpg", width=640, height=640,
                              boxes=boxes[~crowd], labels=labels[~crowd], ignore=boxes[crowd]))
        k = dets
        src = rng.integers(0, n, k)
        jitter = rng.normal(0, 6, (k, 4)).astype(np.float32)
        det_boxes = boxes[src] + jitter
        fp = rng.random(k) < 0.3  # false positives anywhere
        rxy = rng.uniform(0, 500, (int(fp.sum()), 2))
        det_boxes[fp] = np.concatenate([rxy, rxy + rng.uniform(8, 120, (int(fp.sum()), 2))], 1)
        det_boxes[:, 2:] = np.maximum(det_boxes[:, 2:], det_boxes[:, :2] + 1)
        det_labels = np.where(rng.random(k) < 0.9, labels[src], rng.integers(0, classes, k))
        detections.append({"image_id": image_id, "boxes": det_boxes,
                           "scores": rng.random(k).astype(np.float32), "labels": det_labels})
    return records, names, detections


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--max-gts", type=int, default=12)
    ap.add_argument("--dets", type=int, default=50, help="Detections per image.")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch

    from ldpipe.metrics import COCO_KEYS
    from ldpipe.metrics.coco import coco_metrics
    records, names, dets = synthetic_case(args.images, args.classes, args.max_gts, args.dets, args.seed)
    times, results = {}, {}
    for backend in ("pycocotools", "faster-coco-eval"):
        times[backend] = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            results[backend] = coco_metrics(records, names, dets, backend=backend)
            times[backend].append(time.perf_counter() - t0)
    a, b = results["pycocotools"], results["faster-coco-eval"]
    same_stats = all(a[k] == b[k] for k in COCO_KEYS)
    stats_diff = max(abs(a[k] - b[k]) for k in COCO_KEYS)
    per_class_diff = max(abs(a["per_class"][n][k] - b["per_class"][n][k])
                         for n in names for k in ("AP", "AP50"))
    med = {k: median(v) for k, v in times.items()}
    out = {
        "command": command_line(), "machine": machine_info(torch.device("cpu")),
        "args": vars(args), "detections": a["num_detections"], "seconds": times,
        "median_s": med, "speedup": med["pycocotools"] / med["faster-coco-eval"],
        "identical_stats": same_stats, "stats_max_abs_diff": stats_diff,
        "per_class_max_abs_diff": per_class_diff,
        "bbox_mAP": {"pycocotools": a["bbox_mAP"], "faster-coco-eval": b["bbox_mAP"]},
    }
    print(md_table(["back end", "median s", "bbox_mAP"],
                   [[k, f"{med[k]:.2f}", f"{results[k]['bbox_mAP']:.6f}"] for k in med]))
    print(f"\nspeed-up {out['speedup']:.2f}x over {args.images} images, {a['num_detections']} "
          f"detections; identical stats: {same_stats} (max |diff| {stats_diff:.1e}); per-class AP max |diff| {per_class_diff:.1e}")
    if args.json:
        write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
