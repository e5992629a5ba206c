"""Checks on annotation files that would otherwise end in a traceback or a silent wrong split.

* COCO ``images[i]``: ``id`` an integer (ids are matched as the file gives them: an
  annotation whose ``image_id`` is the string ``"1"`` matches no image ``1``; string
  ids are refused, naming the file and the entry), ``width`` / ``height`` positive
  integers, ``file_name`` a string.
* COCO ``annotations[j]``: ``image_id`` an integer, ``bbox`` four finite numbers.
* Annotations whose ``image_id`` is not among the images (*orphans*) are counted and
  reported; together with degenerate boxes they are the split's dropped boxes, and a
  split that drops more than ``data.max_dropped_boxes`` (a fraction, default 0.5) of its
  annotated boxes is an error (set it to 1.0 to accept any split).
* A split with no images is an error.

Every failure is a :class:`~ldpipe.data.records.DataError` naming the file and the entry.
"""
from __future__ import annotations

import math

import numpy as np

from ldpipe.data.errors import DataError


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def coco_image(img, i: int, path: str) -> tuple[int, int, int, str]:
    """``(id, width, height, file_name)`` of ``images[i]``, or a DataError naming it."""
    if not isinstance(img, dict):
        raise DataError(f"{path}: images[{i}] is not an object: {img!r:.80}")
    iid = img.get("id")
    if not _is_int(iid):
        raise DataError(f"{path}: images[{i}].id is {iid!r:.40}, not an integer (COCO image ids "
                        "are integers; ldpipe matches ids as the file gives them)")
    for key in ("width", "height"):
        v = img.get(key)
        if not (_is_int(v) or (isinstance(v, float) and v.is_integer())) or v <= 0:
            raise DataError(f"{path}: images[{i}] (id {iid}) has {key} {v!r:.40}, "
                            "expected a positive integer")
    name = img.get("file_name")
    if not isinstance(name, str) or not name:
        raise DataError(f"{path}: images[{i}] (id {iid}) has no file_name")
    return int(iid), int(img["width"]), int(img["height"]), name


def coco_annotation(a, j: int, path: str) -> tuple[int, list[float]]:
    """``(image_id, [x, y, w, h])`` of ``annotations[j]``, or a DataError naming it."""
    if not isinstance(a, dict):
        raise DataError(f"{path}: annotations[{j}] is not an object: {a!r:.80}")
    iid = a.get("image_id")
    if not _is_int(iid):
        kind = "a string" if isinstance(iid, str) else type(iid).__name__
        raise DataError(f"{path}: annotations[{j}].image_id is {iid!r:.40} ({kind}); image ids "
                        "must be integers as in images[].id (ids are matched as given)")
    box = a.get("bbox")
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(_is_number(v) for v in box):
        raise DataError(f"{path}: annotations[{j}] (image {iid}) has a malformed bbox {box!r:.60} "
                        "(expected [x, y, width, height], four finite numbers)")
    if "category_id" not in a:
        raise DataError(f"{path}: annotations[{j}] (image {iid}) has no category_id")
    return int(iid), [float(v) for v in box]


def check_split(source: str, split: str, stats: dict, max_dropped: float,
                orphan_example: object = None) -> None:
    """Refuse an empty split, or one that drops more than ``max_dropped`` of its boxes."""
    if stats["images"] == 0:
        raise DataError(f"{source}: split {split!r} has no images")
    dropped = stats.get("boxes_dropped_degenerate", 0) + stats.get("annotations_orphaned", 0)
    annotated = stats.get("boxes_kept", 0) + stats.get("ignore_kept", 0) + dropped
    if annotated and dropped / annotated > max_dropped:
        orphans = stats.get("annotations_orphaned", 0)
        detail = (f"{orphans} annotations name an image_id that is not among the images"
                  + (f" (e.g. {orphan_example!r})" if orphan_example is not None else "")
                  + f", {stats.get('boxes_dropped_degenerate', 0)} boxes are degenerate")
        raise DataError(f"{source}: split {split!r} drops {dropped} of its {annotated} boxes "
                        f"({detail}); above data.max_dropped_boxes = {max_dropped:g} "
                        "(set it to 1.0 to train on such a split anyway)")


__all__ = ["check_split", "coco_annotation", "coco_image"]
