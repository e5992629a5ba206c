"""COCO box metrics (mmdetection 2.x's ``CocoDataset.evaluate`` keys).

Two back ends compute the same numbers: ``pycocotools`` (the reference, always installed) and
``faster-coco-eval`` (its C++ re-implementation, ``pip install 'ldpipe[coco-fast]'``; several
times faster on large sets, ``docs/benchmarks.md``).  ``backend="auto"`` (the default, or the
environment variable ``LDPIPE_COCO_BACKEND``) takes faster-coco-eval when it is installed.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from .common import Detections, Record, as_boxes, group_detections, ignore_mask

#: Metric names for ``COCOeval.stats``, in its order.
COCO_KEYS: tuple[str, ...] = (
    "bbox_mAP", "bbox_mAP_50", "bbox_mAP_75",
    "bbox_mAP_s", "bbox_mAP_m", "bbox_mAP_l",
    "bbox_AR_1", "bbox_AR_10", "bbox_AR_100",
    "bbox_AR_s", "bbox_AR_m", "bbox_AR_l",
)


@contextlib.contextmanager
def _quiet():
    """Swallow pycocotools' progress prints and faster-coco-eval's log lines (the summary is
    printed once, by the caller)."""
    fast_log = logging.getLogger("faster_coco_eval")
    level = fast_log.level
    fast_log.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        fast_log.setLevel(level)


def build_coco_gt(
    records: Sequence[Record], classes: Sequence[str], coco_json: dict | None = None
) -> tuple[COCO, list[int]]:
    """Build the ground-truth ``COCO`` object and ``cat_ids[label]``.

    With ``coco_json`` the original annotation file is used as is; its
    category names must be exactly the names in ``classes`` and are mapped by
    name (``cat_ids[label]`` is the id named ``classes[label]``, which is the
    sorted-by-id order when ``classes`` lists them in that order, as
    :mod:`ldpipe.data` does by default);
    annotation dicts are shallow-copied because ``COCOeval`` writes an
    ``'ignore'`` key into them.  Otherwise the ground truth is built from
    ``records``: category ids ``1..C``, ``bbox = [x1, y1, x2-x1, y2-y1]``,
    ``area = w*h``; ignore boxes become ``iscrowd=1`` annotations (one per
    class unless the record has ``ignore_labels``), which pycocotools treats
    as ignore regions.
    """
    if coco_json is not None:
        cats = sorted(coco_json["categories"], key=lambda c: c["id"])
        name_to_id = {c["name"]: int(c["id"]) for c in cats}
        names = list(name_to_id)
        if len(names) != len(cats) or sorted(names) != sorted(classes):
            raise ValueError(
                f"coco_json categories {names[:5]}... do not match classes "
                f"{list(classes)[:5]}... ({len(cats)} vs {len(classes)})"
            )
        cat_ids = [name_to_id[n] for n in classes]
        dataset = dict(coco_json)
        dataset["annotations"] = [dict(a) for a in coco_json.get("annotations", [])]
    else:
        cat_ids = list(range(1, len(classes) + 1))
        images, anns = [], []

        def add(img_id: int, box: np.ndarray, cat: int, crowd: int) -> None:
            w, h = float(box[2] - box[0]), float(box[3] - box[1])
            anns.append({
                "id": len(anns) + 1, "image_id": img_id, "category_id": cat,
                "bbox": [float(box[0]), float(box[1]), w, h], "area": w * h,
                "iscrowd": crowd,
            })

        for rec in records:
            img_id = int(rec.image_id)
            images.append({"id": img_id, "file_name": rec.file_name,
                           "width": int(rec.width), "height": int(rec.height)})
            for box, lab in zip(as_boxes(rec.boxes), np.asarray(rec.labels).reshape(-1)):
                add(img_id, box, cat_ids[int(lab)], 0)
            for box, mask in zip(as_boxes(rec.ignore), ignore_mask(rec, len(classes))):
                for lab in np.flatnonzero(mask):
                    add(img_id, box, cat_ids[int(lab)], 1)
        dataset = {
            "images": images,
            "annotations": anns,
            "categories": [{"id": i, "name": n} for i, n in zip(cat_ids, classes)],
        }
    gt = COCO()
    gt.dataset = dataset
    with _quiet():
        gt.createIndex()
    return gt, cat_ids


def coco_results(detections: Detections, cat_ids: Sequence[int]) -> list[dict]:
    """Convert detections to the COCO results format.

    Each entry is ``{'image_id', 'category_id', 'bbox': [x, y, w, h], 'score'}``
    with plain Python floats (not rounded).
    """
    out: list[dict] = []
    for det in detections:
        img_id = int(det["image_id"])
        boxes = as_boxes(det["boxes"])
        xywh = boxes.copy()
        xywh[:, 2:] -= boxes[:, :2]
        scores = np.asarray(det["scores"], dtype=np.float64).reshape(-1).tolist()
        labels = np.asarray(det["labels"]).reshape(-1).tolist()
        for bb, s, lab in zip(xywh.tolist(), scores, labels):
            out.append({"image_id": img_id, "category_id": int(cat_ids[int(lab)]),
                        "bbox": bb, "score": s})
    return out


def write_results(path: str | Path, detections: Detections, cat_ids: Sequence[int]) -> None:
    """Write detections as a COCO results JSON file (loadable by ``COCO.loadRes``)."""
    Path(path).write_text(json.dumps(coco_results(detections, cat_ids)))


def _load_results(gt: COCO, results: list[dict]) -> COCO:
    """``gt.loadRes(results)`` that also accepts an empty list."""
    if results:
        return gt.loadRes(results)
    dt = COCO()
    dt.dataset = {"images": list(gt.dataset["images"]),
                  "categories": list(gt.dataset["categories"]),
                  "annotations": []}
    dt.createIndex()
    return dt


COCO_BACKENDS = ("auto", "pycocotools", "faster-coco-eval")


def coco_backend(backend: str | None = None) -> str:
    """The back end ``backend`` (or ``$LDPIPE_COCO_BACKEND``, default ``auto``) stands for."""
    name = backend or os.environ.get("LDPIPE_COCO_BACKEND", "auto")
    if name not in COCO_BACKENDS:
        raise ValueError(f"COCO back end must be one of {'|'.join(COCO_BACKENDS)}, got {name!r}")
    if name == "pycocotools":
        return name
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError:
        if name == "faster-coco-eval":
            raise ValueError("the faster-coco-eval back end is not installed "
                             "(pip install 'ldpipe[coco-fast]')") from None
        return "pycocotools"
    return "faster-coco-eval"


def _run_cocoeval(gt: COCO, results: list[dict], img_ids: list[int], backend: str):
    """Evaluate, accumulate and summarise with ``backend``; returns the evaluator."""
    with _quiet():
        if backend == "faster-coco-eval":
            from faster_coco_eval import COCO as FastCOCO
            from faster_coco_eval import COCOeval_faster
            fgt = FastCOCO()
            fgt.dataset = gt.dataset
            fgt.createIndex()
            ev = COCOeval_faster(fgt, fgt.loadRes(results), iouType="bbox")
        else:
            ev = COCOeval(gt, _load_results(gt, results), iouType="bbox")
        ev.params.imgIds = img_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def coco_metrics(
    records: Sequence[Record],
    classes: Sequence[str],
    detections: Detections,
    coco_json: dict | None = None,
    backend: str | None = None,
) -> dict:
    """COCO bbox metrics of ``detections`` against ``records`` / ``coco_json``.

    Evaluation is restricted to the images in ``records`` (as mmdetection
    does with ``params.imgIds``).  Returns the 12 :data:`COCO_KEYS` (``-1.0``
    where pycocotools reports no GT), ``per_class`` (``AP`` over IoU
    0.50:0.95 and ``AP50``, area ``all``, 100 dets, averaged over entries
    ``> -1``, else ``-1.0``; ``num_gts`` = non-crowd GTs), ``num_images``,
    ``num_detections`` and ``coco_backend`` (:func:`coco_backend`).  No detections at all
    gives 0 (or -1) everywhere.
    """
    backend = coco_backend(backend)
    gt, cat_ids = build_coco_gt(records, classes, coco_json)
    img_ids = sorted({int(r.image_id) for r in records})
    missing = set(img_ids) - set(gt.getImgIds())
    if missing:
        raise ValueError(f"{len(missing)} record image ids not in coco_json, e.g. {min(missing)}")
    group_detections(detections, set(img_ids), len(classes))  # validation only
    results = coco_results(detections, cat_ids)

    ev = _run_cocoeval(gt, results, img_ids, backend)

    metrics: dict[str, Any] = {k: float(v) for k, v in zip(COCO_KEYS, ev.stats)}
    img_set = set(img_ids)
    gts = Counter(a["category_id"] for a in gt.dataset["annotations"]
                  if a["image_id"] in img_set and not a.get("iscrowd", 0))
    precision = ev.eval["precision"]  # [T, R, K, A, M]
    eval_cats = list(ev.params.catIds)
    per_class: dict[str, dict[str, Any]] = {}
    for name, cid in zip(classes, cat_ids):
        k = eval_cats.index(cid)
        per_class[name] = {
            "AP": _valid_mean(precision[:, :, k, 0, -1]),
            "AP50": _valid_mean(precision[0, :, k, 0, -1]),
            "num_gts": int(gts.get(cid, 0)),
        }
    metrics["per_class"] = per_class
    metrics["num_images"] = len(img_ids)
    metrics["num_detections"] = len(results)
    metrics["coco_backend"] = backend
    return metrics


def _valid_mean(p: np.ndarray) -> float:
    """Mean of entries ``> -1``; ``-1.0`` if there are none."""
    p = p[p > -1]
    return float(p.mean()) if p.size else -1.0


