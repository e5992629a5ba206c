"""IoU NMS vs Score-voting Cluster-DIoU-NMS on the same raw outputs of one model.

Runs the model once over the validation split (batch 1, outputs kept), then post-processes
those very outputs with ``test.nms = "nms"`` and ``"voting_cluster_diounms"`` (same
``nms_iou``, ``score_thr``, ``nms_pre``, ``max_per_img``), evaluates both (COCO AP via
pycocotools) and prints one JSON line: per kind AP / AP50 / AP75, the post-processing time
per image (decode + NMS + rescale; median of ``--reps`` passes) and images/s = images /
(forward time + post-processing time), plus the machine.

    python -m benchmarks.timings.nms_compare PIPELINE --model M --checkpoint C [--images N] [--json OUT]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch

from benchmarks.common import command_line, machine_info, median, quiet_logs, write_json
from ldpipe.config import load_pipeline
from ldpipe.data import TEST_VARIANT, DetectionDataset, boxes_to_original, collate, load_split
from ldpipe.metrics import evaluate
from ldpipe.models import build_model
from ldpipe.models.checkpoint import load_weights

KINDS = ("nms", "voting_cluster_diounms")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pipeline")
    ap.add_argument("--model", required=True)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--split", default="val")
    ap.add_argument("--images", type=int, default=0, help="First N images only (0: all).")
    ap.add_argument("--reps", type=int, default=3, help="Post-processing passes (median time).")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default).")
    ap.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json", default=None, help="Also write the result here.")
    args = ap.parse_args(argv)
    quiet_logs()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    pipe = load_pipeline(args.pipeline, args.override)
    split = load_split(pipe.data, args.split)
    model = build_model(pipe.model(args.model), len(split.classes))
    load_weights(model, args.checkpoint)
    model.to(dev).eval()
    dataset = DetectionDataset(split, pipe.data, [TEST_VARIANT])
    n = len(dataset) if args.images <= 0 else min(args.images, len(dataset))

    outputs, forward_s = [], 0.0
    with torch.no_grad():
        for i in range(n):
            batch = collate([dataset[i]])
            _sync(dev)
            t0 = time.perf_counter()
            out = model(batch["img"].to(dev))
            _sync(dev)
            forward_s += time.perf_counter() - t0
            outputs.append((out, batch["metas"]))

    base = pipe.model(args.model).test
    rows = []
    for kind in KINDS:
        cfg = dataclasses.replace(base, nms=kind)
        times = []
        for _ in range(max(1, args.reps)):
            dets, t = [], 0.0
            for out, metas in outputs:
                _sync(dev)
                t0 = time.perf_counter()
                det = model.postprocess(out, [m.img_shape for m in metas], cfg)[0]
                boxes = boxes_to_original(det["boxes"].float().cpu(), metas[0])
                _sync(dev)
                t += time.perf_counter() - t0
                dets.append({"image_id": metas[0].image_id,
                             "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                             "scores": det["scores"].float().cpu().numpy(),
                             "labels": det["labels"].cpu().numpy().astype(np.int64)})
            times.append(t)
        post_s = median(times)
        records = split.records[:n]
        m = evaluate(records, split.classes, dets, coco_json=split.coco_json if n == len(split.records)
                     else None, voc=pipe.data.format == "voc")
        rows.append({"nms": kind, "iou_threshold": cfg.nms_iou, "AP": m["bbox_mAP"],
                     "AP50": m["bbox_mAP_50"], "AP75": m["bbox_mAP_75"],
                     "voc_mAP_50": m.get("voc_mAP_50"), "detections": int(sum(len(d["scores"]) for d in dets)),
                     "post_ms_per_image": 1000 * post_s / n, "images_per_s": n / (forward_s + post_s)})
    result = {"pipeline": args.pipeline, "model": args.model, "checkpoint": args.checkpoint,
              "split": args.split, "images": n, "test_scale": list(pipe.data.test_scale),
              "forward_ms_per_image": 1000 * forward_s / n, "rows": rows,
              "command": command_line(), "machine": machine_info(dev)}
    print(json.dumps(result))
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
