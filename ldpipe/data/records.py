"""Annotations (COCO JSON or a Pascal VOC directory) read into plain records.

A :class:`Split` holds one :class:`Record` per image with clean boxes in original
pixels (``xyxy``, float32), labels indexing ``Split.classes`` and ignore regions
(COCO ``iscrowd=1``, VOC ``difficult=1``).

Cleaning never fails: a box reaching outside the image is clipped to
``[0, w] x [0, h]``; a box that afterwards is narrower or lower than 1 px, inverted
or not finite is dropped.  Ignore boxes get the same treatment.  The counts are
in ``Split.stats`` and one summary line goes to the ``ldpipe.data`` logger.

VOC coordinates follow mmdetection 2.x ``XMLDataset``: ``int(float(text))``, no
``-1`` offset.  COCO boxes ``[x, y, w, h]`` become ``[x, y, x + w, y + h]``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ldpipe import files
from ldpipe.config import DataConfig
from ldpipe.data.errors import DataError
from ldpipe.data.quality import check_split, coco_annotation, coco_image

log = logging.getLogger("ldpipe.data")


@dataclass
class Record:
    """One image and its annotations, boxes ``xyxy`` in original pixels."""

    image_id: int
    file_name: str  # resolved path of the image file
    width: int
    height: int
    boxes: np.ndarray  # [n, 4] float32
    labels: np.ndarray  # [n] int64 in 0..C-1
    ignore: np.ndarray  # [m, 4] float32 ignore regions (COCO crowd, VOC difficult)
    # [m] int64 label of each ignore region (the class it ignores detections of in
    # evaluation, as VOC's difficult flag and COCO's crowd boxes work); None = every class.
    ignore_labels: np.ndarray | None = None


@dataclass
class Split:
    """All records of one split plus what identifies them."""

    name: str
    classes: list[str]
    records: list[Record]
    fingerprint: str  # sha256 hex of annotation bytes + classes + sorted image ids
    image_ids: list[int]
    stats: dict
    source: str  # COCO annotation path or VOC root
    coco_json: dict | None  # raw COCO JSON (for pycocotools); None for VOC

    def __len__(self) -> int:
        return len(self.records)


# ---------------------------------------------------------------------- cleaning
class _Cleaner:
    """Clips boxes to the image and drops degenerate ones, counting both."""

    def __init__(self) -> None:
        self.clipped = 0
        self.dropped = 0

    def clean(self, boxes: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        """The kept rows, clipped, and the boolean keep mask over the input rows."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        finite = np.isfinite(boxes).all(axis=1)
        clipped = boxes.copy()
        clipped[:, 0::2] = np.clip(clipped[:, 0::2], 0, width)
        clipped[:, 1::2] = np.clip(clipped[:, 1::2], 0, height)
        changed = finite & (clipped != boxes).any(axis=1)
        wh = clipped[:, 2:] - clipped[:, :2]
        keep = finite & (wh >= 1).all(axis=1)
        self.clipped += int((changed & keep).sum())
        self.dropped += int((~keep).sum())
        return clipped[keep].astype(np.float32), keep


def _as_boxes(rows: list) -> np.ndarray:
    return np.asarray(rows, dtype=np.float32).reshape(-1, 4)


def _fingerprint(blobs: list[bytes], classes: list[str], image_ids: list[int]) -> str:
    h = hashlib.sha256()
    for blob in blobs:
        h.update(blob)
    h.update(json.dumps(classes).encode())
    h.update(json.dumps(sorted(image_ids)).encode())
    return h.hexdigest()


def _read_bytes(path: str, what: str) -> bytes:
    """The bytes of one annotation or split file: a regular file of at most
    ``files.ANNOTATION_FILE_BOUND`` bytes, checked before it is opened (``files.read_bounded``)."""
    try:
        return files.read_bounded(path, files.ANNOTATION_FILE_BOUND, what, DataError)
    except OSError as exc:
        raise DataError(f"{what} not found or unreadable: {path} ({exc.strerror})") from None


def _image_size(path: str) -> tuple[int, int]:
    """(width, height) from the image header, as decoded: after its EXIF orientation."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
            tag = int(im.getexif().get(0x0112, 1) or 1)  # EXIF orientation; 5-8 swap the sides
    except (OSError, ValueError) as exc:
        raise DataError(f"image not found or unreadable: {path} ({exc})") from None
    return (h, w) if tag in (5, 6, 7, 8) else (w, h)


# -------------------------------------------------------------------------- COCO
def _load_coco(d: DataConfig, split: str) -> Split:
    if split == "train":
        ann, img_dir = d.train, d.train_images
    elif split == "val":
        ann, img_dir = d.val, d.val_images
    else:  # an annotation path relative to data.root; images from val_images
        ann, img_dir = split, d.val_images
    ann_path = d.resolve(ann)
    img_root = d.resolve(img_dir)
    blob = _read_bytes(ann_path, "annotation file")
    try:
        coco = json.loads(blob)
    except ValueError as exc:
        raise DataError(f"annotation file is not valid JSON: {ann_path} ({exc})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise DataError(f"annotation file {ann_path} has no {key!r} list")

    cats = sorted(coco["categories"], key=lambda c: c["id"])
    json_names = [c["name"] for c in cats]
    if len(set(json_names)) != len(json_names):
        raise DataError(f"{ann_path}: duplicate category names {json_names}")
    if d.classes:
        if sorted(d.classes) != sorted(json_names):
            raise DataError(f"data.classes {list(d.classes)} do not match the categories "
                            f"of {ann_path}: {json_names}")
        classes = list(d.classes)
    else:
        classes = json_names
    name_to_id = {c["name"]: c["id"] for c in cats}
    cat_ids = [name_to_id[n] for n in classes]
    cat2label = {cid: i for i, cid in enumerate(cat_ids)}

    images = [coco_image(img, i, ann_path) for i, img in enumerate(coco["images"])]
    known = {iid for iid, *_ in images}
    per_image: dict[int, list[tuple[dict, list[float]]]] = {}
    orphans, orphan_example = 0, None
    for j, a in enumerate(coco["annotations"]):
        aid, xywh = coco_annotation(a, j, ann_path)
        if aid not in known:  # counted and reported (quality.check_split), not dropped unseen
            orphans += 1
            orphan_example = orphan_example if orphan_example is not None else aid
            continue
        per_image.setdefault(aid, []).append((a, xywh))
    if orphans:
        log.warning("%s: %d annotations name an image_id that is not among its %d images "
                    "(e.g. %r); they are not used", ann_path, orphans, len(images), orphan_example)

    clean = _Cleaner()
    records = []
    unknown_cat = 0
    for iid, w, h, file_name in images:
        boxes, labels, ignore, ignore_labels = [], [], [], []
        for a, (x, y, bw, bh) in per_image.get(iid, []):
            if a["category_id"] not in cat2label:
                unknown_cat += 1
                continue
            box = [x, y, x + bw, y + bh]
            if a.get("iscrowd", 0):
                ignore.append(box)
                ignore_labels.append(cat2label[a["category_id"]])
            else:
                boxes.append(box)
                labels.append(cat2label[a["category_id"]])
        kept, keep = clean.clean(_as_boxes(boxes), w, h)
        ign, ign_keep = clean.clean(_as_boxes(ignore), w, h)
        records.append(Record(
            image_id=iid, file_name=os.path.join(img_root, file_name), width=w, height=h,
            boxes=kept, labels=np.asarray(labels, dtype=np.int64).reshape(-1)[keep],
            ignore=ign, ignore_labels=np.asarray(ignore_labels, dtype=np.int64).reshape(-1)[ign_keep]))
    if unknown_cat:
        raise DataError(f"{ann_path}: {unknown_cat} annotations use category ids not in 'categories'")
    return _finish(split, classes, records, [blob], clean, ann_path, coco, d,
                   {"annotations_orphaned": orphans}, orphan_example)


# --------------------------------------------------------------------------- VOC
def _voc_object(obj: ET.Element, xml_path: str) -> tuple[str, list[float], bool]:
    name = (obj.findtext("name") or "").strip()
    bnd = obj.find("bndbox")
    if bnd is None:
        raise DataError(f"{xml_path}: object {name!r} has no <bndbox>")
    try:
        box = [float(int(float(bnd.findtext(k)))) for k in ("xmin", "ymin", "xmax", "ymax")]
    except (TypeError, ValueError):
        raise DataError(f"{xml_path}: object {name!r} has a bad <bndbox>") from None
    text = (obj.findtext("difficult") or "0").strip() or "0"
    try:
        difficult = bool(int(float(text)))
    except ValueError:
        raise DataError(f"{xml_path}: object {name!r} has a bad <difficult> {text!r}") from None
    return name, box, difficult


def _voc_size(size: ET.Element | None, key: str, xml_path: str) -> int:
    """``<size><width>`` / ``<height>`` as an int; 0 when absent (then the image header decides)."""
    text = (size.findtext(key) or "").strip() if size is not None else ""
    try:
        value = float(text) if text else 0.0
    except ValueError:
        raise DataError(f"{xml_path}: <size><{key}> is {text!r}, not a number") from None
    if not math.isfinite(value) or value < 0:
        raise DataError(f"{xml_path}: <size><{key}> is {text!r}, expected a positive size")
    return int(value)


def _load_voc(d: DataConfig, split: str) -> Split:
    name = {"train": d.train, "val": d.val}.get(split, split)
    if name.endswith(".json"):  # the COCO defaults left in place: use the split name
        log.info("data.%s = %r is a COCO path; VOC split %r is used instead", split, name, split)
        name = split
    root = str(Path(d.root))
    split_file = os.path.join(root, "ImageSets", "Main", f"{name}.txt")
    split_blob = _read_bytes(split_file, "split file")
    ids = [line.strip() for line in split_blob.decode().splitlines() if line.strip()]
    classes = list(d.classes)
    if not classes:
        raise DataError(f"data.classes is required for the VOC data at {root}")
    label_of = {c: i for i, c in enumerate(classes)}

    clean = _Cleaner()
    blobs = [split_blob]
    records = []
    for index, sid in enumerate(ids):
        xml_path = os.path.join(root, "Annotations", f"{sid}.xml")
        blob = _read_bytes(xml_path, "annotation file")
        blobs.append(blob)
        try:
            tree = ET.fromstring(blob)
        except ET.ParseError as exc:
            raise DataError(f"annotation file is not valid XML: {xml_path} ({exc})") from None
        img_path = os.path.join(root, "JPEGImages", f"{sid}.jpg")
        size = tree.find("size")
        w, h = (_voc_size(size, key, xml_path) for key in ("width", "height"))
        if w <= 0 or h <= 0:
            w, h = _image_size(img_path)
        boxes, labels, ignore, ignore_labels = [], [], [], []
        for obj in tree.findall("object"):
            cls, box, difficult = _voc_object(obj, xml_path)
            if cls not in label_of:
                raise DataError(f"{xml_path}: class {cls!r} is not in data.classes {classes}")
            if difficult:
                ignore.append(box)
                ignore_labels.append(label_of[cls])
            else:
                boxes.append(box)
                labels.append(label_of[cls])
        kept, keep = clean.clean(_as_boxes(boxes), w, h)
        ign, ign_keep = clean.clean(_as_boxes(ignore), w, h)
        records.append(Record(
            image_id=index, file_name=img_path, width=w, height=h, boxes=kept,
            labels=np.asarray(labels, dtype=np.int64).reshape(-1)[keep],
            ignore=ign, ignore_labels=np.asarray(ignore_labels, dtype=np.int64).reshape(-1)[ign_keep]))
    return _finish(split, classes, records, blobs, clean, root, None, d)


# ------------------------------------------------------------------------ public
def _finish(split: str, classes: list[str], records: list[Record], blobs: list[bytes],
            clean: _Cleaner, source: str, coco: dict | None, d: DataConfig,
            extra_stats: dict | None = None, orphan_example=None) -> Split:
    image_ids = [r.image_id for r in records]
    if len(set(image_ids)) != len(image_ids):
        raise DataError(f"{source}: duplicate image ids in split {split!r}")
    stats = {
        "images": len(records),
        "boxes_kept": int(sum(len(r.boxes) for r in records)),
        "ignore_kept": int(sum(len(r.ignore) for r in records)),
        "boxes_clipped": clean.clipped,
        "boxes_dropped_degenerate": clean.dropped,
        **(extra_stats or {}),
    }
    check_split(source, split, stats, d.max_dropped_boxes, orphan_example)
    log.info("split %s (%s): %d images, %d boxes kept, %d ignore, %d clipped, %d dropped (degenerate)",
             split, source, stats["images"], stats["boxes_kept"], stats["ignore_kept"],
             stats["boxes_clipped"], stats["boxes_dropped_degenerate"])
    return Split(name=split, classes=classes, records=records,
                 fingerprint=_fingerprint(blobs, classes, image_ids), image_ids=image_ids,
                 stats=stats, source=source, coco_json=coco)


LOADERS = {"coco": _load_coco, "voc": _load_voc}  # data.format -> its reader


def load_split(data: DataConfig, split: str) -> Split:
    """Read one split of the ``[data]`` section ``data``.

    ``split`` is ``'train'`` / ``'val'`` (``data.train`` / ``data.val``) or, for COCO,
    an annotation path relative to ``data.root`` (images from ``data.val_images``),
    for VOC an ``ImageSets/Main`` name such as ``'test'`` or ``'trainval'``.
    """
    fmt = data.format
    if fmt in LOADERS:
        return LOADERS[fmt](data, split)
    raise DataError(f"unknown data.format {fmt!r} (expected 'coco' or 'voc')")


__all__ = ["DataError", "Record", "Split", "load_split"]
