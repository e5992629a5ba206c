"""Shared pieces of the metrics: the duck-typed record and detection inputs.

Inputs are duck-typed so :mod:`ldpipe.metrics` depends on nothing else in ldpipe:

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

Box convention: continuous coordinates everywhere (``w = x2 - x1``, no ``+ 1``).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

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



def as_boxes(a: Any) -> np.ndarray:
    """``a`` as a float64 ``[n, 4]`` array (accepts empty ``[0]``/``[0, 4]``)."""
    return np.asarray(a, dtype=np.float64).reshape(-1, 4)


def ignore_mask(rec: Record, num_classes: int) -> np.ndarray:
    """``[m, C]`` bool: ignore box ``i`` applies to class ``c`` (all if unlabelled or -1)."""
    m = len(as_boxes(rec.ignore))
    lab = getattr(rec, "ignore_labels", None)
    if lab is not None and len(lab) == m:
        lab = np.asarray(lab).reshape(-1).astype(np.int64)
        return (np.arange(num_classes)[None, :] == lab[:, None]) | (lab[:, None] < 0)
    return np.ones((m, num_classes), bool)


def group_detections(
    detections: Detections, valid_ids: set[int], num_classes: int
) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Validate detections and merge them per image: ``{id: (boxes, scores, labels)}``."""
    parts: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
    for det in detections:
        img_id = int(det["image_id"])
        if img_id not in valid_ids:
            raise ValueError(f"detections for image_id {img_id}, which is not in records")
        boxes = as_boxes(det["boxes"])
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


