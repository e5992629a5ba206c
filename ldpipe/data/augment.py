"""What each ``[[data.augment]]`` step does to an image and its boxes, given its drawn parameters.

A :class:`Canvas` is the state between steps: the uint8 BGR image (or ``None`` while only the
geometry is followed: the view draw, ``ldpipe.data.views``, runs the same functions without
pixels, so a crop can be checked against the boxes it keeps before any image is decoded), its
size, GT boxes (``xyxy`` float32 ``[n, 4]``), labels (int64 ``[n]``) and ignore boxes
(``[m, 4]``).  Every function is pure: the same canvas and parameters give the same output.

The semantics are mmdetection's (2.x ``Resize`` / ``RandomFlip`` / ``RandomCrop``, 3.x
``Mosaic`` / ``MixUp``), with mmcv's image ops; box rules as there: a resize clips boxes to the
image, a crop shifts, clips and drops boxes left without area, a mosaic clips to its canvas and
drops boxes outside it, a mixup adds the partner's boxes clipped to the image and drops those
outside.  The last rule of every view (``ldpipe.data.views.compose``) drops boxes of zero width
or height, as the fixed variants do.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import mmcv
import numpy as np

from ldpipe.data.errors import DataError
from ldpipe.data.records import Record


@dataclass(frozen=True)
class Canvas:
    """One image between steps (``img`` ``[h, w, 3]`` uint8 BGR, or None: geometry only)."""

    img: np.ndarray | None
    h: int
    w: int
    boxes: np.ndarray  # [n, 4] float32 xyxy
    labels: np.ndarray  # [n] int64
    ignore: np.ndarray  # [m, 4] float32
    scale: tuple[float, float] = (1.0, 1.0)  # (w, h) resize factor of the main image so far
    flip: bool = False  # the main image is mirrored left-right (an odd number of such flips)
    name: str = ""  # the main image's file, for errors

    def with_(self, **kw) -> "Canvas":
        return dataclasses.replace(self, **kw)


def canvas_of(record: Record, img: np.ndarray | None = None) -> Canvas:
    """The canvas of a record's image as loaded (``img`` None: its geometry only)."""
    return Canvas(img, int(record.height), int(record.width),
                  np.asarray(record.boxes, dtype=np.float32).reshape(-1, 4),
                  np.asarray(record.labels, dtype=np.int64).reshape(-1),
                  np.asarray(record.ignore, dtype=np.float32).reshape(-1, 4), name=record.file_name)


def _clip(boxes: np.ndarray, h: int, w: int) -> np.ndarray:
    out = boxes.copy()
    out[:, 0::2] = np.clip(out[:, 0::2], 0, w)
    out[:, 1::2] = np.clip(out[:, 1::2], 0, h)
    return out


def _area(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def _inside(boxes: np.ndarray, h: int, w: int) -> np.ndarray:
    """mmdetection 3's ``HorizontalBoxes.is_inside``: any part of the box within ``[0, w) x [0, h)``."""
    return (boxes[:, 0] < w) & (boxes[:, 1] < h) & (boxes[:, 2] > 0) & (boxes[:, 3] > 0)


def _times(boxes: np.ndarray, sx: float, sy: float) -> np.ndarray:
    return boxes * np.array([sx, sy, sx, sy], dtype=np.float32)


def _shift(boxes: np.ndarray, dx: float, dy: float) -> np.ndarray:
    return boxes + np.array([dx, dy, dx, dy], dtype=np.float32)


def _check_size(c: Canvas, w: int, h: int, step: str) -> None:
    if min(w, h) < 1:
        raise DataError(f"{c.name}: a {c.w}x{c.h} image (width x height) resizes to {w}x{h} pixels "
                        f"in {step}: too thin to detect in; leave it out of the split")


# ---------------------------------------------------------------------- Resize
def resized_size(c: Canvas, scale: tuple[int, int], keep_ratio: bool) -> tuple[int, int]:
    """``(w, h)`` after resizing to ``scale`` (keep-ratio: ``(long, short)`` bounds, mmcv's
    ``rescale_size``; else exactly ``(w, h)``)."""
    if not keep_ratio:
        return int(scale[0]), int(scale[1])
    return mmcv.rescale_size((c.w, c.h), tuple(int(s) for s in scale))


def resize(c: Canvas, scale: tuple[int, int], keep_ratio: bool = True) -> Canvas:
    new_w, new_h = resized_size(c, scale, keep_ratio)
    if min(new_w, new_h) < 1:
        raise DataError(f"{c.name}: a {c.w}x{c.h} input (width x height) resizes to {new_w}x{new_h} "
                        f"pixels at scale {list(scale)}: too thin to detect in")
    img = None
    if c.img is not None:
        img = (mmcv.imrescale(c.img, tuple(scale), interpolation="bilinear") if keep_ratio
               else mmcv.imresize(c.img, (new_w, new_h), interpolation="bilinear"))
        if img.shape[:2] != (new_h, new_w):  # the geometry and the pixels must agree
            raise DataError(f"{c.name}: resized to {img.shape[1]}x{img.shape[0]}, expected {new_w}x{new_h}")
    sx, sy = new_w / c.w, new_h / c.h
    return c.with_(img=img, h=new_h, w=new_w, boxes=_clip(_times(c.boxes, sx, sy), new_h, new_w),
                   ignore=_clip(_times(c.ignore, sx, sy), new_h, new_w),
                   scale=(c.scale[0] * sx, c.scale[1] * sy))


# ---------------------------------------------------------------------- RandomFlip
def _flip_boxes(boxes: np.ndarray, h: int, w: int, direction: str) -> np.ndarray:
    out = boxes.copy()
    if direction in ("horizontal", "diagonal"):
        out[:, 0], out[:, 2] = w - boxes[:, 2], w - boxes[:, 0]
    if direction in ("vertical", "diagonal"):
        out[:, 1], out[:, 3] = h - boxes[:, 3], h - boxes[:, 1]
    return out


def flip(c: Canvas, direction: str | None) -> Canvas:
    """``direction`` None: unchanged (the flip was not drawn)."""
    if direction is None:
        return c
    img = mmcv.imflip(c.img, direction=direction) if c.img is not None else None
    return c.with_(img=img, boxes=_flip_boxes(c.boxes, c.h, c.w, direction),
                   ignore=_flip_boxes(c.ignore, c.h, c.w, direction),
                   flip=c.flip != (direction in ("horizontal", "diagonal")))


# ---------------------------------------------------------------------- RandomCrop
def crop_boxes(boxes: np.ndarray, top: int, left: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """mmdetection 2.x ``RandomCrop``: boxes shifted by the crop's corner, clipped to it, and the
    mask of those with area left."""
    out = _clip(_shift(boxes, -left, -top), h, w)
    return out, _area(out)


def crop(c: Canvas, top: int, left: int, height: int, width: int) -> Canvas:
    """The ``height`` x ``width`` window at ``(top, left)`` (within the image)."""
    h, w = min(height, c.h - top), min(width, c.w - left)
    img = c.img[top:top + h, left:left + w, ...] if c.img is not None else None
    boxes, keep = crop_boxes(c.boxes, top, left, h, w)
    ignore, keep_ig = crop_boxes(c.ignore, top, left, h, w)
    return c.with_(img=img, h=h, w=w, boxes=boxes[keep], labels=c.labels[keep], ignore=ignore[keep_ig])


# ---------------------------------------------------------------------- Mosaic
def mosaic_combine(loc: int, center: tuple[int, int], tile_wh: tuple[int, int],
                   canvas_hw: tuple[int, int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """mmdetection 3 ``Mosaic._mosaic_combine``: the paste box on the ``2h x 2w`` canvas and the
    crop box of the tile, ``(x1, y1, x2, y2)`` each, for tile ``loc`` (0 top left, 1 top right,
    2 bottom left, 3 bottom right) of size ``tile_wh`` around ``center`` ``(x, y)``."""
    cx, cy = center
    tw, th = tile_wh
    big_h, big_w = canvas_hw
    if loc == 0:
        x1, y1, x2, y2 = max(cx - tw, 0), max(cy - th, 0), cx, cy
        return (x1, y1, x2, y2), (tw - (x2 - x1), th - (y2 - y1), tw, th)
    if loc == 1:
        x1, y1, x2, y2 = cx, max(cy - th, 0), min(cx + tw, big_w), cy
        return (x1, y1, x2, y2), (0, th - (y2 - y1), min(tw, x2 - x1), th)
    if loc == 2:
        x1, y1, x2, y2 = max(cx - tw, 0), cy, cx, min(big_h, cy + th)
        return (x1, y1, x2, y2), (tw - (x2 - x1), 0, tw, min(y2 - y1, th))
    x1, y1, x2, y2 = cx, cy, min(cx + tw, big_w), min(big_h, cy + th)
    return (x1, y1, x2, y2), (0, 0, min(tw, x2 - x1), min(y2 - y1, th))


def mosaic(tiles: list[Canvas], center: tuple[int, int], img_scale: tuple[int, int],
           pad_val: float) -> Canvas:
    """Four canvases (the main one first) on a ``2h x 2w`` canvas (``img_scale`` = ``(h, w)``)."""
    sh, sw = int(img_scale[0]), int(img_scale[1])
    big_h, big_w = 2 * sh, 2 * sw
    with_img = tiles[0].img is not None
    out = np.full((big_h, big_w, 3), pad_val, dtype=tiles[0].img.dtype) if with_img else None
    boxes, labels, ignore, main_ratio = [], [], [], 1.0
    for loc, t in enumerate(tiles):
        ratio = min(sh / t.h, sw / t.w)
        tw, th = int(t.w * ratio), int(t.h * ratio)
        _check_size(t, tw, th, "Mosaic")
        if loc == 0:
            main_ratio = ratio
        (px1, py1, px2, py2), (cx1, cy1, cx2, cy2) = mosaic_combine(loc, center, (tw, th), (big_h, big_w))
        if with_img:
            tile = mmcv.imresize(t.img, (tw, th))
            out[py1:py2, px1:px2] = tile[cy1:cy2, cx1:cx2]
        padw, padh = px1 - cx1, py1 - cy1
        boxes.append(_shift(_times(t.boxes, ratio, ratio), padw, padh))
        ignore.append(_shift(_times(t.ignore, ratio, ratio), padw, padh))
        labels.append(t.labels)
    boxes_all = _clip(np.concatenate(boxes), big_h, big_w)
    ignore_all = _clip(np.concatenate(ignore), big_h, big_w)
    keep, keep_ig = _inside(boxes_all, big_h, big_w), _inside(ignore_all, big_h, big_w)
    main = tiles[0]
    return main.with_(img=out, h=big_h, w=big_w, boxes=boxes_all[keep],
                      labels=np.concatenate(labels)[keep], ignore=ignore_all[keep_ig],
                      scale=(main.scale[0] * main_ratio, main.scale[1] * main_ratio))


# ---------------------------------------------------------------------- MixUp
def mixup_size(partner: Canvas, img_scale: tuple[int, int], jit: float) -> tuple[int, int]:
    """``(h, w)`` of the partner's jittered canvas, before the crop to the main image."""
    sh, sw = int(img_scale[0]), int(img_scale[1])
    return int(sh * jit), int(sw * jit)


def mixup(c: Canvas, partner: Canvas, img_scale: tuple[int, int], jit: float, flipped: bool,
          offset: tuple[int, int], pad_val: float) -> Canvas:
    """mmdetection 3 ``MixUp``: the partner resized (keep-ratio) into an ``img_scale`` canvas,
    scaled by ``jit``, mirrored when ``flipped``, cropped at ``offset`` ``(x, y)`` to this
    image's size and blended 0.5 / 0.5; its boxes follow and join this image's."""
    sh, sw = int(img_scale[0]), int(img_scale[1])
    ratio = min(sh / partner.h, sw / partner.w)
    origin_h, origin_w = mixup_size(partner, img_scale, jit)
    _check_size(partner, int(partner.w * ratio), int(partner.h * ratio), "MixUp")
    x_off, y_off = offset
    img = None
    if c.img is not None:
        out = np.ones((sh, sw, 3), dtype=partner.img.dtype) * pad_val  # float64, as mmdetection
        small = mmcv.imresize(partner.img, (int(partner.w * ratio), int(partner.h * ratio)))
        out[:small.shape[0], :small.shape[1]] = small
        out = mmcv.imresize(out, (int(out.shape[1] * jit), int(out.shape[0] * jit)))
        if flipped:
            out = out[:, ::-1, :]
        padded = np.zeros((max(origin_h, c.h), max(origin_w, c.w), 3), dtype=np.uint8)
        padded[:origin_h, :origin_w] = out
        window = padded[y_off:y_off + c.h, x_off:x_off + c.w]
        img = (0.5 * c.img.astype(np.float32) + 0.5 * window.astype(np.float32)).astype(np.uint8)
    r = ratio * jit

    def follow(b: np.ndarray) -> np.ndarray:
        b = _clip(_times(b, r, r), origin_h, origin_w)
        if flipped:
            b = _flip_boxes(b, origin_h, origin_w, "horizontal")
        return _clip(_shift(b, -x_off, -y_off), c.h, c.w)

    boxes = np.concatenate([c.boxes, follow(partner.boxes)])
    ignore = np.concatenate([c.ignore, follow(partner.ignore)])
    keep, keep_ig = _inside(boxes, c.h, c.w), _inside(ignore, c.h, c.w)
    return c.with_(img=img, boxes=boxes[keep], labels=np.concatenate([c.labels, partner.labels])[keep],
                   ignore=ignore[keep_ig])


__all__ = ["Canvas", "canvas_of", "crop", "crop_boxes", "flip", "mixup", "mixup_size", "mosaic",
           "mosaic_combine", "resize", "resized_size"]
