"""Detection evaluation: COCO metrics (via pycocotools) and VOC-style mAP.

Inputs are duck-typed so this module does not depend on :mod:`ldpipe.data`:

* ``records`` -- objects with ``image_id: int``, ``file_name: str``,
  ``width: int``, ``height: int``, ``boxes: float[n, 4]`` (xyxy, original
  pixels), ``labels: int[n]`` (``0..C-1``) and ``ignore: float[m, 4]``
  (COCO ``iscrowd`` / VOC ``difficult`` regions).  An optional
  ``ignore_labels: int[m]`` attribute makes ignore regions class-specific;
  without it an ignore region applies to *every* class.
* ``detections`` -- one dict per image:
  ``{'image_id', 'boxes': [k, 4] xyxy, 'scores': [k], 'labels': [k]}``.
  Images without an entry have no detections; several entries for the same
  image are concatenated.

Box convention: continuous coordinates everywhere (``w = x2 - x1``, no
``+ 1``), as pycocotools and mmdetection 2.x COCO evaluation.  Note that
mmdetection 2.x's *VOC* evaluation passes ``use_legacy_coordinate=True``
(``+ 1`` on widths/heights), so :func:`voc_map` can differ slightly from
its numbers on small boxes.
"""
from __future__ import annotations

import contextlib
import io
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = [
    "COCO_KEYS",
    "build_coco_gt",
    "coco_results",
    "write_results",
    "coco_metrics",
    "voc_map",
    "evaluate",
    "format_table",
]

#: Metric names for ``COCOeval.stats``, in its order.
COCO_KEYS: tuple[str, ...] = (
    "bbox_mAP", "bbox_mAP_50", "bbox_mAP_75",
    "bbox_mAP_s", "bbox_mAP_m", "bbox_mAP_l",
    "bbox_AR_1", "bbox_AR_10", "bbox_AR_100",
    "bbox_AR_s", "bbox_AR_m", "bbox_AR_l",
)


class Record(Protocol):
    """Ground-truth attributes read from each image record."""

    image_id: int
    file_name: str
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    ignore: np.ndarray


Detections = Sequence[Mapping[str, Any]]


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def _boxes(a: Any) -> np.ndarray:
    """``a`` as a float64 ``[n, 4]`` array (accepts empty ``[0]``/``[0, 4]``)."""
    return np.asarray(a, dtype=np.float64).reshape(-1, 4)


def _ignore_mask(rec: Record, num_classes: int) -> np.ndarray:
    """``[m, C]`` bool: ignore box ``i`` applies to class ``c`` (all if unlabelled or -1)."""
    m = len(_boxes(rec.ignore))
    lab = getattr(rec, "ignore_labels", None)
    if lab is not None and len(lab) == m:
        lab = np.asarray(lab).reshape(-1).astype(np.int64)
        return (np.arange(num_classes)[None, :] == lab[:, None]) | (lab[:, None] < 0)
    return np.ones((m, num_classes), bool)


def _group_detections(
    detections: Detections, valid_ids: set[int], num_classes: int
) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Validate detections and merge them per image: ``{id: (boxes, scores, labels)}``."""
    parts: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
    for det in detections:
        img_id = int(det["image_id"])
        if img_id not in valid_ids:
            raise ValueError(f"detections for image_id {img_id}, which is not in records")
        boxes = _boxes(det["boxes"])
        scores = np.asarray(det["scores"], dtype=np.float64).reshape(-1)
        labels = np.asarray(det["labels"]).reshape(-1).astype(np.int64)
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError(f"image {img_id}: boxes/scores/labels lengths differ")
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"image {img_id}: label outside 0..{num_classes - 1}")
        parts.setdefault(img_id, []).append((boxes, scores, labels))
    return {
        k: tuple(np.concatenate(x) for x in zip(*v))  # type: ignore[misc]
        for k, v in parts.items()
    }


@contextlib.contextmanager
def _quiet():
    """Swallow pycocotools' progress prints."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


# --------------------------------------------------------------------------
# COCO
# --------------------------------------------------------------------------
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
            for box, lab in zip(_boxes(rec.boxes), np.asarray(rec.labels).reshape(-1)):
                add(img_id, box, cat_ids[int(lab)], 0)
            for box, mask in zip(_boxes(rec.ignore), _ignore_mask(rec, len(classes))):
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
        boxes = _boxes(det["boxes"])
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


def coco_metrics(
    records: Sequence[Record],
    classes: Sequence[str],
    detections: Detections,
    coco_json: dict | None = None,
) -> dict:
    """COCO bbox metrics of ``detections`` against ``records`` / ``coco_json``.

    Evaluation is restricted to the images in ``records`` (as mmdetection
    does with ``params.imgIds``).  Returns the 12 :data:`COCO_KEYS` (``-1.0``
    where pycocotools reports no GT), ``per_class`` (``AP`` over IoU
    0.50:0.95 and ``AP50``, area ``all``, 100 dets, averaged over entries
    ``> -1``, else ``-1.0``; ``num_gts`` = non-crowd GTs), ``num_images`` and
    ``num_detections``.  No detections at all gives 0 (or -1) everywhere.
    """
    gt, cat_ids = build_coco_gt(records, classes, coco_json)
    img_ids = sorted({int(r.image_id) for r in records})
    missing = set(img_ids) - set(gt.getImgIds())
    if missing:
        raise ValueError(f"{len(missing)} record image ids not in coco_json, e.g. {min(missing)}")
    _group_detections(detections, set(img_ids), len(classes))  # validation only
    results = coco_results(detections, cat_ids)

    with _quiet():
        dt = _load_results(gt, results)
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.params.imgIds = img_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()

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
    return metrics


def _valid_mean(p: np.ndarray) -> float:
    """Mean of entries ``> -1``; ``-1.0`` if there are none."""
    p = p[p > -1]
    return float(p.mean()) if p.size else -1.0


# --------------------------------------------------------------------------
# VOC
# --------------------------------------------------------------------------
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
    dets = _group_detections(detections, {int(r.image_id) for r in records}, num_classes)

    all_labels, all_scores, all_tp = [], [], []
    num_gts = np.zeros(num_classes, np.int64)
    for rec in records:
        g_labels = np.asarray(rec.labels).reshape(-1).astype(np.int64)
        num_gts += np.bincount(g_labels, minlength=num_classes)[:num_classes]
        if int(rec.image_id) not in dets:
            continue
        d_boxes, d_scores, d_labels = dets[int(rec.image_id)]
        g_boxes, i_boxes = _boxes(rec.boxes), _boxes(rec.ignore)
        n_gt = len(g_boxes)
        cand = np.concatenate([g_boxes, i_boxes])
        # allowed[d, j]: candidate GT j may match detection d (same class)
        allowed = np.concatenate([d_labels[:, None] == g_labels[None, :],
                                  _ignore_mask(rec, num_classes)[:, d_labels].T], axis=1)
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


# --------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------
def evaluate(
    records: Sequence[Record],
    classes: Sequence[str],
    detections: Detections,
    coco_json: dict | None = None,
    voc: bool = False,
    *,
    voc_mode: str = "area",
) -> dict:
    """COCO metrics, plus ``voc_mAP_50`` and ``per_class[name]['voc_AP50']`` if ``voc``.

    ``voc_mode`` selects the VOC AP definition (``'11points'`` for VOC2007).
    The result is JSON-serialisable (numbers and the ``per_class`` dict).
    """
    metrics = coco_metrics(records, classes, detections, coco_json)
    if voc:
        vm = voc_map(records, classes, detections, iou_thr=0.5, mode=voc_mode)
        metrics["voc_mAP_50"] = vm["mAP"]
        for name, row in vm["per_class"].items():
            metrics["per_class"][name]["voc_AP50"] = row["AP"]
    return metrics


_SUMMARY = (
    ("Average Precision", "0.50:0.95", "all", 100, "bbox_mAP"),
    ("Average Precision", "0.50", "all", 100, "bbox_mAP_50"),
    ("Average Precision", "0.75", "all", 100, "bbox_mAP_75"),
    ("Average Precision", "0.50:0.95", "small", 100, "bbox_mAP_s"),
    ("Average Precision", "0.50:0.95", "medium", 100, "bbox_mAP_m"),
    ("Average Precision", "0.50:0.95", "large", 100, "bbox_mAP_l"),
    ("Average Recall", "0.50:0.95", "all", 1, "bbox_AR_1"),
    ("Average Recall", "0.50:0.95", "all", 10, "bbox_AR_10"),
    ("Average Recall", "0.50:0.95", "all", 100, "bbox_AR_100"),
    ("Average Recall", "0.50:0.95", "small", 100, "bbox_AR_s"),
    ("Average Recall", "0.50:0.95", "medium", 100, "bbox_AR_m"),
    ("Average Recall", "0.50:0.95", "large", 100, "bbox_AR_l"),
)


def format_table(metrics: dict) -> str:
    """Human-readable report of :func:`evaluate`'s output.

    A one-line summary, the 12 pycocotools summary lines (rebuilt from the
    numbers) and a per-class table (class, #GT, AP, AP50 and VOC AP50 if
    present).  ``-1`` (no GT) is shown as ``-``.
    """
    def f(v: Any) -> str:
        return "-" if v is None or v < 0 else f"{v:.3f}"

    head = (f"bbox_mAP {f(metrics.get('bbox_mAP'))} | AP50 {f(metrics.get('bbox_mAP_50'))}"
            f" | AP75 {f(metrics.get('bbox_mAP_75'))}")
    if "voc_mAP_50" in metrics:
        head += f" | VOC mAP50 {f(metrics['voc_mAP_50'])}"
    head += (f" | {metrics.get('num_images', 0)} images,"
             f" {metrics.get('num_detections', 0)} detections")
    lines = [head]
    for kind, iou, area, md, key in _SUMMARY:
        if key in metrics:
            short = "(AP)" if kind.endswith("Precision") else "(AR)"
            lines.append(f" {kind:<18} {short} @[ IoU={iou:<9} | area={area:>6} | "
                         f"maxDets={md:>3} ] = {metrics[key]:0.3f}")
    per_class = metrics.get("per_class") or {}
    if per_class:
        has_voc = any("voc_AP50" in r for r in per_class.values())
        width = max(5, *(len(n) for n in per_class))
        cols = ["#GT", "AP", "AP50"] + (["VOC AP50"] if has_voc else [])
        lines.append("")
        lines.append(f"{'class':<{width}} " + " ".join(f"{c:>8}" for c in cols))
        lines.append("-" * (width + 9 * len(cols)))
        for name, r in per_class.items():
            vals = [str(r.get("num_gts", "")), f(r.get("AP")), f(r.get("AP50"))]
            if has_voc:
                vals.append(f(r.get("voc_AP50")))
            lines.append(f"{name:<{width}} " + " ".join(f"{v:>8}" for v in vals))
    return "\n".join(lines)
