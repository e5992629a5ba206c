"""The embedded default data set: procedurally rendered shapes in COCO format.

Four classes with distinct shapes -- ``disc`` (filled ellipse), ``square``
(rectangle, slightly rotated), ``triangle`` and ``ring`` (elliptic annulus) --
of 8 to 150 px (long side), aspect ratio 1:1 to 2:1, each with a random colour
(a weak per-class hue preference) and texture (noise, stripes or a checker),
on gradient backgrounds with smooth blotches, 2 to 10 per image, plus Gaussian
pixel noise over everything, partly occluding each other.

Every object's mask is blurred with a random Gaussian sigma (0.3 px up to about
5 % of its size), so its edge is a soft ramp and a box edge is ambiguous by a few
pixels.  Objects are composited back to front with the blurred mask as alpha.

**Box rule.**  An object's *visible alpha* is its alpha times ``(1 - alpha)`` of
every object drawn after it.  Its box is the pixel-edge extent of the pixels
where the visible alpha is at least 0.5: ``[x0, y0, x1 + 1 - x0, y1 + 1 - y0]``
for the first/last such columns ``x0, x1`` and rows ``y0, y1`` (COCO ``xywh``);
``area`` is the number of those pixels.  An object with no such pixel is not
annotated; one whose visible part is less than 25 % of its in-image mask, or is
under 3 px on a side, is annotated as ``iscrowd = 1`` (an ignore region).

``DEMO_ARGS`` are the arguments of the demo's set (``ldpipe data synth``'s defaults):
400 + 200 images of about 192 px, objects of 12 to 96 px, 2 to 8 per image.

Output (deterministic for a seed, byte for byte)::

    OUT/annotations/{train,val}.json
    OUT/images/{train,val}/000001.jpg ...    (JPEG quality 92)
"""
from __future__ import annotations

import json
import math
import os
import time

import cv2
import numpy as np

CLASSES = ["disc", "square", "triangle", "ring"]
_HUE = [0, 45, 90, 135]  # OpenCV hue (0..180) each class prefers
JPEG_QUALITY = 92
MIN_SIZE, MAX_SIZE = 8, 150  # long side of an object's shape, px
MAX_OBJECTS = 10
# ``ldpipe data synth OUT`` (and so ``make demo``) writes this set: smaller images with
# fewer, larger objects than the renderer's general defaults, so a CPU-sized teacher
# trained for a few minutes is clearly better than the student (pipelines/demo.toml).
DEMO_ARGS = dict(n_train=400, n_val=200, seed=0, size=192, min_size=12.0, max_size=96.0,
                 max_objects=8)


# ------------------------------------------------------------------- rendering
def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Linear colour gradient + smooth blotches, float32 [h, w, 3] (pixel noise is
    added to the whole image after the objects)."""
    c0, c1 = rng.uniform(20, 235, 3), rng.uniform(20, 235, 3)
    angle = rng.uniform(0, 2 * math.pi)
    xx = np.arange(w, dtype=np.float32)[None, :] * np.float32(math.cos(angle))
    yy = np.arange(h, dtype=np.float32)[:, None] * np.float32(math.sin(angle))
    t = xx + yy
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    img = (c0.astype(np.float32) + (c1 - c0).astype(np.float32) * t[..., None])
    blotch = rng.normal(0, rng.uniform(5, 25), (max(h // 32, 2), max(w // 32, 2), 3))
    img += cv2.resize(blotch.astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    return img


def _shape_mask(rng: np.random.Generator, cls: int, bw: int, bh: int, pad: int) -> np.ndarray:
    """Binary (0/1 float32) mask of a class shape filling a ``bw x bh`` box inside
    a patch with ``pad`` px margin on every side."""
    ph, pw = bh + 2 * pad, bw + 2 * pad
    mask = np.zeros((ph, pw), np.uint8)
    s = 8  # sub-pixel precision bits for cv2 drawing
    f = 1 << s
    cx, cy = pad + bw / 2, pad + bh / 2
    if cls in (0, 3):  # disc / ring
        axes = (round(bw / 2 * f), round(bh / 2 * f))
        cv2.ellipse(mask, (round(cx * f), round(cy * f)), axes, 0, 0, 360, 1, -1, cv2.LINE_AA, s)
        if cls == 3:
            k = rng.uniform(0.45, 0.7)
            inner = (round(bw / 2 * k * f), round(bh / 2 * k * f))
            cv2.ellipse(mask, (round(cx * f), round(cy * f)), inner, 0, 0, 360, 0, -1,
                        cv2.LINE_AA, s)
    elif cls == 1:  # square: a rectangle rotated a little about its centre
        a = math.radians(rng.uniform(-12, 12))
        c, si = math.cos(a), math.sin(a)
        corners = np.array([[-bw, -bh], [bw, -bh], [bw, bh], [-bw, bh]], np.float64) / 2
        rot = corners @ np.array([[c, si], [-si, c]])
        scale = min(bw / np.ptp(rot[:, 0]), bh / np.ptp(rot[:, 1]))  # keep inside the box
        pts = rot * scale + [cx, cy]
        cv2.fillPoly(mask, [np.round(pts * f).astype(np.int32)], 1, cv2.LINE_AA, s)
    else:  # triangle pointing up / down / left / right
        x0, y0, x1, y1 = pad, pad, pad + bw, pad + bh
        apex = rng.uniform(0.2, 0.8)
        pts = {
            0: [(x0 + apex * bw, y0), (x1, y1), (x0, y1)],
            1: [(x0, y0), (x1, y0), (x0 + apex * bw, y1)],
            2: [(x0, y0 + apex * bh), (x1, y0), (x1, y1)],
            3: [(x0, y0), (x1, y0 + apex * bh), (x0, y1)],
        }[int(rng.integers(4))]
        cv2.fillPoly(mask, [np.round(np.array(pts) * f).astype(np.int32)], 1, cv2.LINE_AA, s)
    return mask.astype(np.float32)


def _texture(rng: np.random.Generator, cls: int, h: int, w: int) -> np.ndarray:
    """A coloured texture, float32 [h, w, 3]."""
    hue = (_HUE[cls] + rng.normal(0, 25)) % 180
    hsv = np.uint8([[[hue, rng.uniform(80, 255), rng.uniform(70, 255)]]])
    base = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0].astype(np.float32)
    kind = int(rng.integers(3))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 0:  # noise
        tex = rng.normal(0, rng.uniform(3, 20), (h, w, 1))
    elif kind == 1:  # stripes
        a = rng.uniform(0, math.pi)
        period = rng.uniform(3, 12)
        tex = np.sin((xx * math.cos(a) + yy * math.sin(a)) * 2 * math.pi / period)[..., None]
        tex = tex * rng.uniform(10, 40)
    else:  # checker
        cell = int(rng.integers(2, 8))
        tex = (((xx // cell + yy // cell) % 2) * 2 - 1)[..., None] * rng.uniform(8, 30)
    return base[None, None, :] + tex.astype(np.float32)


def _place(rng: np.random.Generator, h: int, w: int, taken: list[tuple[float, ...]],
           min_size: float = MIN_SIZE, max_size: float = MAX_SIZE) -> tuple[int, int, int, int]:
    """An object box ``(x, y, bw, bh)``; mostly inside the image, limited overlap."""
    for _ in range(12):
        long_side = math.exp(rng.uniform(math.log(min_size), math.log(max_size)))
        short_side = long_side * rng.uniform(0.5, 1.0)
        bw, bh = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
        bw, bh = max(int(round(bw)), 4), max(int(round(bh)), 4)
        if rng.random() < 0.85:  # fully inside
            x = int(rng.integers(0, max(w - bw, 0) + 1))
            y = int(rng.integers(0, max(h - bh, 0) + 1))
        else:  # may cross the border (at most half outside)
            x = int(rng.integers(-bw // 2, w - bw // 2))
            y = int(rng.integers(-bh // 2, h - bh // 2))
        ok = True
        for tx, ty, tw, th in taken:
            iw = min(x + bw, tx + tw) - max(x, tx)
            ih = min(y + bh, ty + th) - max(y, ty)
            if iw > 0 and ih > 0 and iw * ih > 0.5 * min(bw * bh, tw * th):
                ok = False
                break
        if ok:
            return x, y, bw, bh
    return x, y, bw, bh  # give up on the overlap limit after a few tries


def render_image(rng: np.random.Generator, h: int, w: int, min_size: float = MIN_SIZE,
                 max_size: float = MAX_SIZE, max_objects: int = MAX_OBJECTS
                 ) -> tuple[np.ndarray, list[dict]]:
    """One image (BGR uint8) and its annotations (``bbox``, ``category_id``, ...)."""
    img = _background(rng, h, w)
    objects = []  # (cls, alpha patch float32, patch x, patch y)
    taken: list[tuple[float, ...]] = []
    for _ in range(int(rng.integers(2, max_objects + 1))):
        cls = int(rng.integers(len(CLASSES)))
        x, y, bw, bh = _place(rng, h, w, taken, min_size, max_size)
        taken.append((x, y, bw, bh))
        sigma = rng.uniform(0.3, max(0.3, 0.05 * max(bw, bh)) + 0.3)
        pad = int(math.ceil(3 * sigma)) + 2
        mask = _shape_mask(rng, cls, bw, bh, pad)
        mask = cv2.GaussianBlur(mask, (0, 0), sigma, borderType=cv2.BORDER_CONSTANT)
        # crop the patch (origin x - pad, y - pad) to the image
        px0, py0 = x - pad, y - pad
        sx0, sy0 = max(px0, 0), max(py0, 0)
        sx1, sy1 = min(px0 + mask.shape[1], w), min(py0 + mask.shape[0], h)
        if sx1 <= sx0 or sy1 <= sy0:
            continue
        alpha = mask[sy0 - py0:sy1 - py0, sx0 - px0:sx1 - px0]
        tex = _texture(rng, cls, sy1 - sy0, sx1 - sx0)
        a = alpha[..., None]
        img[sy0:sy1, sx0:sx1] = img[sy0:sy1, sx0:sx1] * (1 - a) + tex * a
        objects.append((cls, alpha, sx0, sy0))
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(2, 10))
    img = np.clip(img, 0, 255).astype(np.uint8)

    anns = []
    cover = np.zeros((h, w), np.float32)  # 1 - prod(1 - alpha) of objects drawn later
    for cls, alpha, sx0, sy0 in reversed(objects):
        region = cover[sy0:sy0 + alpha.shape[0], sx0:sx0 + alpha.shape[1]]
        vis = alpha * (1 - region) >= 0.5
        region[:] = 1 - (1 - region) * (1 - alpha)
        count = int(vis.sum())
        if not count:
            continue
        cols, rows = np.flatnonzero(vis.any(axis=0)), np.flatnonzero(vis.any(axis=1))
        x0, x1 = sx0 + int(cols[0]), sx0 + int(cols[-1]) + 1
        y0, y1 = sy0 + int(rows[0]), sy0 + int(rows[-1]) + 1
        crowd = count < 0.25 * int((alpha >= 0.5).sum()) or min(x1 - x0, y1 - y0) < 3
        anns.append({"category_id": cls + 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                     "area": count, "iscrowd": int(crowd)})
    anns.reverse()  # back-to-front drawing order
    return img, anns


# ----------------------------------------------------------------------- writing
def _write_split(out: str, name: str, n: int, seed: int, size: int, **shape) -> dict:
    img_dir = os.path.join(out, "images", name)
    os.makedirs(img_dir, exist_ok=True)
    split_key = {"train": 0, "val": 1}.get(name, 2)
    images, annotations = [], []
    for i in range(n):
        # one generator per image: image i is the same whatever n_train / n_val are
        rng = np.random.default_rng([seed, split_key, i])
        w = int(rng.integers(size * 9 // 10, size * 11 // 10 + 1))
        h = int(rng.integers(size * 9 // 10, size * 11 // 10 + 1))
        img, anns = render_image(rng, h, w, **shape)
        file_name = f"{i + 1:06d}.jpg"
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise RuntimeError(f"cannot encode {file_name}")
        with open(os.path.join(img_dir, file_name), "wb") as fh:
            fh.write(buf.tobytes())
        images.append({"id": i + 1, "file_name": file_name, "width": w, "height": h})
        for a in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, **a})
    coco = {
        "info": {"description": f"ldpipe synthetic shapes ({name}, seed {seed})"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": c, "supercategory": "shape"}
                       for k, c in enumerate(CLASSES)],
    }
    os.makedirs(os.path.join(out, "annotations"), exist_ok=True)
    with open(os.path.join(out, "annotations", f"{name}.json"), "w") as fh:
        json.dump(coco, fh, sort_keys=True, separators=(",", ":"))
    return {"images": n, "boxes": sum(1 for a in annotations if not a["iscrowd"]),
            "crowd": sum(1 for a in annotations if a["iscrowd"])}


def synthesize(out: str, n_train: int = 240, n_val: int = 60, seed: int = 0,
               size: int = 320, min_size: float = MIN_SIZE, max_size: float = MAX_SIZE,
               max_objects: int = MAX_OBJECTS) -> dict:
    """Write the synthetic COCO data set under ``out``; returns a summary.

    Image sides vary in ``[0.9 * size, 1.1 * size]``; object long sides in
    ``[min_size, max_size]`` (log-uniform); 2 to ``max_objects`` objects per image.
    Same arguments, same bytes.
    """
    start = time.perf_counter()
    shape = dict(min_size=min_size, max_size=max_size, max_objects=max_objects)
    summary = {"root": os.path.abspath(out), "classes": list(CLASSES), "seed": seed,
               "train": _write_split(out, "train", n_train, seed, size, **shape),
               "val": _write_split(out, "val", n_val, seed, size, **shape)}
    summary["seconds"] = round(time.perf_counter() - start, 3)
    return summary


if __name__ == "__main__":  # python -m ldpipe.data.synth OUT [n_train n_val seed]
    import sys

    args = sys.argv[1:]
    if not args:
        sys.exit("usage: python -m ldpipe.data.synth OUT [n_train [n_val [seed]]]")
    nums = [int(a) for a in args[1:4]]
    print(json.dumps(synthesize(args[0], *nums), indent=1))


__all__ = ["CLASSES", "DEMO_ARGS", "render_image", "synthesize"]
