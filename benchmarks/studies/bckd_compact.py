"""A compact form of the teacher rows BCKD reads, measured against the dense cache.

    python -m benchmarks.studies.bckd_compact PIPELINE DENSE_LOGITS_CACHE [--floor 0.01,0.05]
        [--json OUT] [-o KEY=VALUE ...]

BCKD (``ldpipe.distill.bckd``) reads, at every valid anchor, the teacher's expected edge
distances (4 values, not the 4 x (reg_max + 1) bins) and the sigmoid of its class logits.
The form measured here (not a cache format yet):

* ``dist``: the 4 expected distances per anchor in float16, rows last;
* ``cls``: only the class logits whose sigmoid is >= ``floor`` (float16), with their class
  index (uint8 up to 256 classes) and a per-anchor count (uint8); a class below the floor
  decodes to the logit of ``floor / 2``, so its teacher score moves by at most ``floor / 2``.

Bytes are Zstd-3 of chunks of 1024 rows (as the store compresses), per sample, beside the same
compression of the dense fp16 rows (box + raw class logits).  The floor's effect bound: the
classification term per (anchor, class) is ``BCE(s, t) |t - sigma(s)|^beta``, linear in ``t``
within the BCE and ``beta``-Lipschitz in the factor, so moving ``t`` by ``d`` changes it by at
most ``d (|s| + beta (|s| + log 2))``; the box term's anchor weight ``max_c |t - sigma(s)|``
moves by at most ``d``.  Measured: both terms with the compact teacher against the dense one,
for a student initialised as ``train-student`` does (seed 0), one sample per batch.
"""
from __future__ import annotations

import argparse
import json
import math

import numcodecs
import numpy as np
import torch

from ldpipe.cache import CacheReader
from ldpipe.config import load_pipeline
from ldpipe.data import DetectionDataset, load_split
from ldpipe.distill import CachedTeacher
from ldpipe.distill.bckd import bckd_anchors, bckd_box_loss, bckd_cls_loss, expected_distances
from ldpipe.distill.loader import CacheTargets
from ldpipe.engine.runtime import seed_everything
from ldpipe.engine.step import TrainCollate
from ldpipe.models import batch_targets, build_model

ZSTD = numcodecs.Zstd(level=3)
CHUNK = 1024


def zbytes(arr: np.ndarray) -> int:
    """Zstd-3 bytes of ``arr`` (rows first) in chunks of CHUNK rows, each stored rows last."""
    total = 0
    for s in range(0, arr.shape[0], CHUNK):
        total += len(ZSTD.encode(np.ascontiguousarray(np.moveaxis(arr[s:s + CHUNK], 0, -1))))
    return total


def compact_cls(logits: torch.Tensor, floor: float) -> tuple[torch.Tensor, dict]:
    """The decoded compact class logits ``[N, C]`` and the bytes of their stored parts."""
    keep = logits.sigmoid() >= floor
    below = math.log(floor / 2) - math.log1p(-floor / 2)
    decoded = torch.where(keep, logits.half().float(), torch.full_like(logits, below))
    rows, cols = torch.nonzero(keep, as_tuple=True)
    idx_dtype = np.uint8 if logits.shape[1] <= 256 else np.uint16
    parts = {"count": zbytes(keep.sum(1).numpy().astype(np.uint8)[:, None]),
             "index": zbytes(cols.numpy().astype(idx_dtype)[:, None]) if rows.numel() else 0,
             "logit": zbytes(logits[keep].half().numpy()[:, None]) if rows.numel() else 0}
    return decoded, parts


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pipeline")
    ap.add_argument("cache", help="a dump with cache.region=dense, cache.cls_values=logits, fp32")
    ap.add_argument("--floor", default="0.001,0.01,0.05")
    ap.add_argument("--student", default="student")
    ap.add_argument("--json", default=None)
    ap.add_argument("-o", dest="overrides", action="append", default=[])
    args = ap.parse_args(argv)
    floors = [float(f) for f in args.floor.split(",")]
    pipe = load_pipeline(args.pipeline, args.overrides)
    reader = CacheReader(args.cache)
    m = reader.manifest
    if m.region.policy != "dense" or m.cls_values != "logits" or m.codec != "fp32":
        raise SystemExit(f"{args.cache}: needs a dense fp32 cache of raw logits "
                         f"(has {m.region.policy}, {m.codec}, cls {m.cls_values or 'log_probs'})")
    split = load_split(pipe.data, "train")
    cfg = pipe.model(args.student)
    source = CachedTeacher(pipe, args.cache)
    ds = DetectionDataset(split, pipe.data, source.variants(pipe), extra=CacheTargets(args.cache))
    seed_everything(0)
    model = build_model(cfg, len(split.classes))
    collate = TrainCollate(cfg, len(split.classes), with_vlr=False)
    dense_bytes, dist_bytes, n = 0, 0, 0
    cls_bytes = {f: 0 for f in floors}
    kept = {f: 0 for f in floors}
    values = 0
    exact = {"cls": 0.0, "box": 0.0}
    approx = {f: {"cls": 0.0, "box": 0.0} for f in floors}
    worst = {f: {"cls": 0.0, "box": 0.0} for f in floors}
    for i in range(len(ds)):
        for v in range(len(ds.variants)):
            s = ds[(i, v)]
            box, cls = s["teacher"]["box"], s["teacher"]["cls"]
            n += 1
            values += cls.numel()
            dense_bytes += zbytes(box.half().numpy()) + zbytes(cls.half().numpy())
            dist_bytes += zbytes(expected_distances(box).half().numpy())
            batch = collate([s])
            with torch.no_grad():
                out = model(batch["img"])
                bt = batch_targets(batch["targets"], out.level_sizes, cfg.strides, cfg.anchor_scale,
                                   model.num_classes, torch.device("cpu"))
                _, pos = model.bbox_head.loss(out, bt, cfg.loss)
                idx = bckd_anchors(bt.label_weights, bt.strides, pos.index)
                t = source.prepare(batch, bt, torch.device("cpu")).at(idx)
                num_total = max(float(bt.num_pos_images), 1.0)
                sc, sr = out.flat_cls()[idx], out.flat_reg()[idx]
                w, a, st = bt.label_weights[idx], bt.anchors[idx], bt.strides[idx]
                d = pipe.distill
                terms = {"cls": float(bckd_cls_loss(sc, t.cls, w, num_total, d.bckd_beta)),
                         "box": float(bckd_box_loss(sc, t.cls, sr, expected_distances(t.box), a, st, w,
                                                    num_total))}
                for k in terms:
                    exact[k] += terms[k]
                dist16 = expected_distances(t.box).half().float()
                for f in floors:
                    dec, parts = compact_cls(cls, f)
                    cls_bytes[f] += sum(parts.values())
                    kept[f] += int((cls.sigmoid() >= f).sum())
                    tc, _ = compact_cls(t.cls, f)
                    got = {"cls": float(bckd_cls_loss(sc, tc, w, num_total, d.bckd_beta)),
                           "box": float(bckd_box_loss(sc, tc, sr, dist16, a, st, w, num_total))}
                    for k in got:
                        approx[f][k] += got[k]
                        if terms[k] > 0:
                            worst[f][k] = max(worst[f][k], abs(got[k] - terms[k]) / terms[k])
    result = {"samples": n, "dense_fp16_bytes_per_sample": dense_bytes / n,
              "dist_fp16_bytes_per_sample": dist_bytes / n, "floors": {}}
    for f in floors:
        per = (dist_bytes + cls_bytes[f]) / n
        result["floors"][str(f)] = {
            "bytes_per_sample": per, "cls_bytes_per_sample": cls_bytes[f] / n,
            "ratio_to_dense_fp16": per / result["dense_fp16_bytes_per_sample"],
            "class_values_kept": kept[f] / values,
            "rel_error_sum": {k: abs(approx[f][k] - exact[k]) / exact[k] for k in exact if exact[k]},
            "rel_error_worst_sample": worst[f]}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    main()
