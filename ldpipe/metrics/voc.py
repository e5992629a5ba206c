"""VOC-style mAP at one IoU threshold (``'area'`` or VOC2007's ``'11points'``).

mmdetection 2.x's VOC evaluation passes ``use_legacy_coordinate=True`` (``+ 1`` on
widths/heights), so :func:`voc_map` can differ slightly from its numbers on small boxes.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .common import Detections, Record, as_boxes, group_detections, ignore_mask


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU ``[len(a), len(b)]`` of xyxy boxes, continuous coords (no +1)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / np.maximum(union, np.finfo(np.float64).eps)


def _average_precision(recall: np.ndarray, precision: np.ndarray, mode: str) -> float:
    """AP from a PR curve: ``'area'`` (VOC2010+) or ``'11points'`` (VOC2007)."""
    if mode == "area":
        mrec = np.concatenate([[0.0], recall, [1.0]])
        mpre = np.concatenate([[0.0], precision, [0.0]])
        mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope
        step = np.flatnonzero(mrec[1:] != mrec[:-1])
        return float(np.sum((mrec[step + 1] - mrec[step]) * mpre[step + 1]))
    if mode == "11points":
        ap = 0.0
        for t in np.linspace(0.0, 1.0, 11):
            p = precision[recall >= t]
            ap += float(p.max()) if p.size else 0.0
        return ap / 11.0
    raise ValueError(f"mode must be 'area' or '11points', got {mode!r}")


def voc_map(
    records: Sequence[Record],
    classes: Sequence[str],
    detections: Detections,
    iou_thr: float = 0.5,
    mode: str = "area",
) -> dict:
    """VOC-style per-class AP at ``iou_thr`` and their mean.

    Per image and class, detections are matched greedily in descending score
    order to the GT (normal or ignore/difficult) of highest IoU; if that IoU
    is ``>= iou_thr`` (mmdetection's ``>=``; the VOC devkit uses ``>``) the
    detection is a TP if the GT is normal and still unmatched, a FP if it is
    normal and already matched, and is discarded (neither TP nor FP) if the
    GT is difficult.  Otherwise it is a FP.  Ignore boxes never count as
    positives.  IoU uses continuous coordinates (no ``+1``; see the module
    docstring).  ``mode``: ``'area'`` (VOC2010+) or ``'11points'`` (VOC2007).

    Returns ``{'mAP': float, 'per_class': {name: {'AP', 'num_gts', 'num_dets'}}}``
    (``num_dets`` excludes detections discarded on difficult GTs);
    classes without GT get ``AP = -1.0`` and are left out of the mean (``-1.0``
    if no class has GT).
    """
    if mode not in ("area", "11points"):
        raise ValueError(f"mode must be 'area' or '11points', got {mode!r}")
    num_classes = len(classes)
    dets = group_detections(detections, {int(r.image_id) for r in records}, num_classes)

    all_labels, all_scores, all_tp = [], [], []
    num_gts = np.zeros(num_classes, np.int64)
    for rec in records:
        g_labels = np.asarray(rec.labels).reshape(-1).astype(np.int64)
        num_gts += np.bincount(g_labels, minlength=num_classes)[:num_classes]
        if int(rec.image_id) not in dets:
            continue
        d_boxes, d_scores, d_labels = dets[int(rec.image_id)]
        g_boxes, i_boxes = as_boxes(rec.boxes), as_boxes(rec.ignore)
        n_gt = len(g_boxes)
        cand = np.concatenate([g_boxes, i_boxes])
        # allowed[d, j]: candidate GT j may match detection d (same class)
        allowed = np.concatenate([d_labels[:, None] == g_labels[None, :],
                                  ignore_mask(rec, num_classes)[:, d_labels].T], axis=1)
        ious = np.where(allowed, _iou(d_boxes, cand), -1.0)
        best = ious.argmax(1) if len(cand) else np.zeros(len(d_boxes), np.int64)
        best_iou = ious.max(1) if len(cand) else np.full(len(d_boxes), -1.0)
        tp = np.zeros(len(d_boxes), bool)
        keep = np.ones(len(d_boxes), bool)
        covered = np.zeros(n_gt, bool)
        for i in np.argsort(-d_scores, kind="stable").tolist():
            j, o = int(best[i]), float(best_iou[i])
            if o < iou_thr:
                continue  # FP
            if j >= n_gt:
                keep[i] = False  # matched a difficult GT: ignored
            elif not covered[j]:
                covered[j] = tp[i] = True
        all_labels.append(d_labels[keep])
        all_scores.append(d_scores[keep])
        all_tp.append(tp[keep])

    labels = np.concatenate(all_labels) if all_labels else np.zeros(0, np.int64)
    scores = np.concatenate(all_scores) if all_scores else np.zeros(0)
    is_tp = np.concatenate(all_tp) if all_tp else np.zeros(0, bool)
    per_class: dict[str, dict[str, Any]] = {}
    aps = []
    for c, name in enumerate(classes):
        sel = np.flatnonzero(labels == c)
        sel = sel[np.argsort(-scores[sel], kind="stable")]
        tp_cum = np.cumsum(is_tp[sel])
        fp_cum = np.cumsum(~is_tp[sel])
        if num_gts[c] > 0:
            recall = tp_cum / num_gts[c]
            precision = tp_cum / np.maximum(tp_cum + fp_cum, np.finfo(np.float64).eps)
            ap = _average_precision(recall, precision, mode)
            aps.append(ap)
        else:
            ap = -1.0
        per_class[name] = {"AP": ap, "num_gts": int(num_gts[c]), "num_dets": int(len(sel))}
    return {"mAP": float(np.mean(aps)) if aps else -1.0, "per_class": per_class}

