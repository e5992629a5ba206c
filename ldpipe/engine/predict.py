"""``ldpipe predict``: detect objects in image files and draw them.

Each image goes through the data pipeline's test-time geometry (the keep-ratio resize to
``data.test_scale``, normalisation and padding of :func:`ldpipe.data.make_sample`, no flip),
one image per forward pass, and through the same :func:`~ldpipe.engine.infer.detect_batch`
as ``ldpipe eval``, so the boxes are in original image pixels and equal ``eval``'s
detections of that image.  The output folder receives one PNG per image (the boxes drawn
with :func:`torchvision.utils.draw_bounding_boxes`, labelled with class name and score) and
``detections.json`` with every detection at or above ``score_thr``.
"""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import torch

from ..config import DataConfig, Pipeline
from ..data import TEST_VARIANT, DataError, Record, collate, load_image, load_split, make_sample
from ..files import atomic_write, blocking_file
from ..models import GFL, load_detector
from ..models.checkpoint import load_file
from .infer import detect_batch
from .runtime import progress_bar, resolve_device

log = logging.getLogger("ldpipe.predict")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
JSON_NAME = "detections.json"
# one colour per class (tab10), cycling for more classes
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf"]


def checkpoint_classes(data: DataConfig, checkpoint: str, obj: dict | None = None) -> list[str]:
    """The class names of a checkpoint: what ldpipe recorded in it (``meta.ldpipe.classes``),
    mmdetection's ``meta.CLASSES``, else ``data.classes``, else the validation split's.
    ``obj``: the checkpoint's :func:`load_file` dict, if already read."""
    meta = (load_file(checkpoint) if obj is None else obj).get("meta") or {}
    own = (meta.get("ldpipe") or {}).get("classes") if isinstance(meta, dict) else None
    mmdet = meta.get("CLASSES") if isinstance(meta, dict) else None
    for names in (own, mmdet, data.classes):
        if names:
            return [str(n) for n in names]
    return list(load_split(data, "val").classes)


def open_detector(pipe: Pipeline, model_name: str, checkpoint: str,
                  device: torch.device) -> tuple[GFL, list[str], dict]:
    """The model ``model_name`` with the weights of ``checkpoint`` (strict), in eval mode;
    its class names (from the checkpoint, else the pipeline or its val split) and the
    checkpoint's ``meta`` (:func:`ldpipe.models.load_detector` once the classes are known)."""
    obj = load_file(checkpoint)  # read once for the classes, the weights and the meta
    classes = checkpoint_classes(pipe.data, checkpoint, obj)
    model, meta = load_detector(pipe.model(model_name), len(classes), checkpoint, device, obj)
    return model, classes, meta


def collect_images(paths: list[str]) -> list[str]:
    """Image files from files and folders (a folder: its image files, sorted, not recursive).
    A missing path or a folder without images is a :class:`DataError` naming it."""
    if not paths:
        raise DataError("no images given")
    out = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(os.path.join(p, n) for n in os.listdir(p)
                           if n.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(os.path.join(p, n)))
            if not found:
                raise DataError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in folder {p}")
            out.extend(found)
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise DataError(f"image not found: {p}")
    return out


def _png_names(images: list[str], out_dir: str) -> list[str]:
    """``<stem>.png`` per image, ``<stem>_<k>.png`` when stems repeat; never an input file."""
    used: set[str] = set()
    names = []
    inputs = {os.path.realpath(p) for p in images}
    for p in images:
        stem = os.path.splitext(os.path.basename(p))[0]
        name, k = f"{stem}.png", 1
        while name in used or os.path.realpath(os.path.join(out_dir, name)) in inputs:
            name, k = f"{stem}_{k}.png", k + 1
        used.add(name)
        names.append(name)
    return names


def image_sample(path: str, index: int, data: DataConfig) -> tuple[np.ndarray, dict]:
    """The decoded BGR image and its test-time sample (no annotations)."""
    image = load_image(path)
    h, w = image.shape[:2]
    record = Record(image_id=index, file_name=path, width=w, height=h,
                    boxes=np.zeros((0, 4), np.float32), labels=np.zeros(0, np.int64),
                    ignore=np.zeros((0, 4), np.float32))
    return image, make_sample(record, image, TEST_VARIANT, data)


def draw(image_bgr: np.ndarray, boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray,
         classes: list[str]) -> np.ndarray:
    """RGB uint8 ``[H, W, 3]`` with the boxes drawn and labelled ``class score``."""
    from torchvision.utils import draw_bounding_boxes
    img = torch.from_numpy(np.ascontiguousarray(image_bgr[..., ::-1].transpose(2, 0, 1)))
    if len(boxes) == 0:
        return img.permute(1, 2, 0).numpy()
    text = [f"{classes[int(c)]} {float(s):.2f}" for c, s in zip(labels, scores)]
    colors = [PALETTE[int(c) % len(PALETTE)] for c in labels]
    width = max(1, round(max(image_bgr.shape[:2]) / 300))
    drawn = draw_bounding_boxes(img, torch.from_numpy(np.asarray(boxes, np.float32)), labels=text,
                                colors=colors, width=width)
    return drawn.permute(1, 2, 0).numpy()


def predict_images(pipe: Pipeline, model_name: str, checkpoint: str, images: list[str], out_dir: str,
                   score_thr: float = 0.3, device: str | None = None, progress: bool = True) -> dict:
    """Detect, draw and write ``out_dir/<stem>.png`` per image and ``out_dir/detections.json``.

    Returns the JSON's content.  ``score_thr`` filters after the model's own test
    settings (``models.NAME.test``: its ``score_thr``, NMS, ``max_per_img``).
    """
    from PIL import Image

    above = blocking_file(out_dir)
    if above is not None:
        raise DataError(f"--out {out_dir}: {above} is a file, not a folder; choose another --out")
    dev = resolve_device(device)
    files = collect_images(list(images))
    model, classes, _ = open_detector(pipe, model_name, checkpoint, dev)
    os.makedirs(out_dir, exist_ok=True)
    names = _png_names(files, out_dir)
    entries = []
    for index, (path, name) in enumerate(progress_bar(iterable=list(zip(files, names)), desc="predict",
                                                      disable=not progress, leave=False)):
        image, sample = image_sample(path, index, pipe.data)
        det = detect_batch(model, collate([sample]), dev)[0]
        keep = det["scores"] >= score_thr
        boxes, scores, labels = det["boxes"][keep], det["scores"][keep], det["labels"][keep]
        Image.fromarray(draw(image, boxes, labels, scores, classes)).save(os.path.join(out_dir, name))
        entries.append({
            "file": os.path.abspath(path), "png": name,
            "width": int(image.shape[1]), "height": int(image.shape[0]),
            "detections": [{"bbox": [float(v) for v in b], "score": float(s), "label": int(c),
                            "class": classes[int(c)]} for b, s, c in zip(boxes, scores, labels)]})
    result = {"model": model_name, "checkpoint": os.path.abspath(checkpoint), "classes": classes,
              "score_thr": score_thr, "bbox_format": "xyxy (original image pixels)", "images": entries}
    atomic_write(os.path.join(out_dir, JSON_NAME), json.dumps(result, indent=1))
    log.info("%d images, %d detections >= %.2f -> %s", len(entries),
             sum(len(e["detections"]) for e in entries), score_thr, out_dir)
    return result
