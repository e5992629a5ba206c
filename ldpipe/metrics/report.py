"""The evaluation entry point and its human-readable report."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .coco import coco_metrics
from .common import Detections, Record
from .voc import voc_map


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
