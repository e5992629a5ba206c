"""Views: one seeded draw of the ``[[data.augment]]`` steps, as a small record that replays.

A :class:`View` is the main image's index in its split and, per step, what was drawn (a scale,
a flip, a crop window, a mosaic's partners and centre, a mixup's partner, jitter, flip and
offset) together with the step settings the pixels need, so :func:`compose` ``(view, records,
data)`` is a pure function of the record and the source images: the same view composes to the
same tensor and boxes, bit for bit, in any process.  :func:`draw_view` makes one from a
``numpy.random.Generator``; :func:`view_rng` seeds one per ``(seed, image, slot)``, so any
image's views are drawn without drawing the others'.  ``to_dict`` / :meth:`View.from_dict` are
its JSON form (what a cache stores).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mmcv
import numpy as np
import torch

from ldpipe.config import (AugmentStep, CropStep, DataConfig, FlipStep, MixUpStep, MosaicStep,
                           ResizeStep)
from ldpipe.data import augment as A
from ldpipe.data.decode import load_checked
from ldpipe.data.errors import DataError
from ldpipe.data.meta import SampleMeta
from ldpipe.data.records import Record

CROP_TRIES = 15  # as mmdetection's MultiImageMixDataset.max_refetch: then the step is left out


@dataclass(frozen=True)
class ResizeDraw:
    scale: tuple[int, int]  # keep_ratio: (long, short) bounds; else (w, h)
    keep_ratio: bool = True
    type: str = "Resize"


@dataclass(frozen=True)
class FlipDraw:
    direction: str | None  # None: not flipped
    type: str = "RandomFlip"


@dataclass(frozen=True)
class CropDraw:
    top: int
    left: int
    height: int
    width: int
    applied: bool = True  # False: no crop kept a GT box in CROP_TRIES draws (step left out)
    type: str = "RandomCrop"


@dataclass(frozen=True)
class MosaicDraw:
    partners: tuple[int, ...]  # three split indices; () = not applied (prob)
    center: tuple[int, int]  # (x, y) on the 2h x 2w canvas
    img_scale: tuple[int, int]  # (h, w) of a tile
    pad_val: float
    type: str = "Mosaic"


@dataclass(frozen=True)
class MixUpDraw:
    partner: int  # split index; -1 = not applied (no partner with a GT box drawn)
    jit: float
    flipped: bool
    offset: tuple[int, int]  # (x, y) of the crop in the partner's padded canvas
    img_scale: tuple[int, int]  # (h, w)
    pad_val: float
    type: str = "MixUp"


Draw = ResizeDraw | FlipDraw | CropDraw | MosaicDraw | MixUpDraw
DRAWS = {cls.type: cls for cls in (ResizeDraw, FlipDraw, CropDraw, MosaicDraw, MixUpDraw)}


def _tuples(v):
    return tuple(_tuples(x) for x in v) if isinstance(v, (list, tuple)) else v


def _plain(v):
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


@dataclass(frozen=True)
class View:
    """One training input: the main image (split index) and each step's draw, in order."""

    image: int
    draws: tuple[Draw, ...] = ()

    def sources(self) -> tuple[int, ...]:
        """Split indices of every image the view reads: the main one, then mixing partners."""
        out = [self.image]
        for d in self.draws:
            if isinstance(d, MosaicDraw):
                out += d.partners
            elif isinstance(d, MixUpDraw) and d.partner >= 0:
                out.append(d.partner)
        return tuple(out)

    def to_dict(self) -> dict:
        return {"image": self.image, "draws": [{k: _plain(v) for k, v in dataclasses.asdict(d).items()}
                                               for d in self.draws]}

    @classmethod
    def from_dict(cls, d: dict) -> "View":
        """A view from :meth:`to_dict`'s form; a :class:`DataError` for one no draw made."""
        try:
            draws = []
            for entry in d["draws"]:
                kind = DRAWS[entry["type"]]
                names = {f.name for f in dataclasses.fields(kind)}
                if set(entry) != names:
                    raise KeyError(sorted(set(entry) ^ names))
                draws.append(kind(**{k: _tuples(v) for k, v in entry.items()}))
            return cls(int(d["image"]), tuple(draws))
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"not a view record ({type(exc).__name__}: {exc}): {str(d)[:200]}") from None


def view_rng(seed: int, image: int, slot: int, stream: int = 0) -> np.random.Generator:
    """The generator of view ``slot`` of image ``image`` (``stream`` keeps schedules apart)."""
    return np.random.default_rng([int(seed), int(stream), int(image), int(slot)])


# ---------------------------------------------------------------------- drawing
def _draw_resize(s: ResizeStep, c: A.Canvas, gen: np.random.Generator) -> ResizeDraw:
    scales = [tuple(int(x) for x in sc) for sc in s.img_scale]
    if len(scales) == 1:
        scale = scales[0]
    elif s.multiscale_mode == "range":  # mmdetection 2.x Resize.random_sample
        longs, shorts = [max(sc) for sc in scales], [min(sc) for sc in scales]
        scale = (int(gen.integers(min(longs), max(longs) + 1)), int(gen.integers(min(shorts), max(shorts) + 1)))
    else:  # Resize.random_select
        scale = scales[int(gen.integers(len(scales)))]
    return ResizeDraw(scale, s.keep_ratio)


def _crop_size(s: CropStep, h: int, w: int, gen: np.random.Generator) -> tuple[int, int]:
    """mmdetection 2.x ``RandomCrop._get_crop_size``: ``(crop_h, crop_w)`` in pixels."""
    a, b = s.crop_size
    if s.crop_type == "absolute":
        return min(int(a), h), min(int(b), w)
    if s.crop_type == "absolute_range":
        return (int(gen.integers(min(h, int(a)), min(h, int(b)) + 1)),
                int(gen.integers(min(w, int(a)), min(w, int(b)) + 1)))
    if s.crop_type == "relative":
        return int(h * a + 0.5), int(w * b + 0.5)
    size = np.asarray(s.crop_size, dtype=np.float32)
    ch, cw = size + gen.random(2) * (1 - size)
    return int(h * ch + 0.5), int(w * cw + 0.5)


def _draw_crop(s: CropStep, c: A.Canvas, gen: np.random.Generator) -> CropDraw:
    for _ in range(CROP_TRIES):
        ch, cw = _crop_size(s, c.h, c.w, gen)
        top = int(gen.integers(0, max(c.h - ch, 0) + 1))
        left = int(gen.integers(0, max(c.w - cw, 0) + 1))
        _, keep = A.crop_boxes(c.boxes, top, left, min(ch, c.h - top), min(cw, c.w - left))
        if s.allow_negative_crop or not len(c.boxes) or keep.any():
            return CropDraw(top, left, ch, cw)
    return CropDraw(0, 0, c.h, c.w, applied=False)


def _draw_mosaic(s: MosaicStep, n: int, gen: np.random.Generator) -> MosaicDraw:
    h, w = (int(x) for x in s.img_scale)
    if gen.random() > s.prob:
        return MosaicDraw((), (0, 0), (h, w), float(s.pad_val))
    partners = tuple(int(i) for i in gen.integers(0, n, 3))
    lo, hi = s.center_ratio_range
    cx, cy = int(gen.uniform(lo, hi) * w), int(gen.uniform(lo, hi) * h)
    return MosaicDraw(partners, (cx, cy), (h, w), float(s.pad_val))


def _draw_mixup(s: MixUpStep, c: A.Canvas, records: Sequence[Record], gen: np.random.Generator) -> MixUpDraw:
    scale = tuple(int(x) for x in s.img_scale)
    index = 0
    for _ in range(s.max_iters):  # MixUp.get_indexes
        index = int(gen.integers(0, len(records)))
        if len(records[index].boxes):
            break
    if not len(records[index].boxes):  # MixUp.transform: an empty partner leaves the image
        return MixUpDraw(-1, 1.0, False, (0, 0), scale, float(s.pad_val))
    jit = float(gen.uniform(*s.ratio_range))
    flipped = bool(gen.random() > s.flip_ratio)
    oh, ow = A.mixup_size(A.canvas_of(records[index]), scale, jit)
    ph, pw = max(oh, c.h), max(ow, c.w)
    y_off = int(gen.integers(0, ph - c.h)) if ph > c.h else 0
    x_off = int(gen.integers(0, pw - c.w)) if pw > c.w else 0
    return MixUpDraw(index, jit, flipped, (x_off, y_off), scale, float(s.pad_val))


def draw_view(steps: Sequence[AugmentStep], records: Sequence[Record], image: int,
              gen: np.random.Generator) -> View:
    """One view of image ``image`` (index into ``records``): each step's parameters drawn from
    ``gen`` in order, each checked against the geometry the steps before it made (no pixels)."""
    c = A.canvas_of(records[image])
    draws: list[Draw] = []
    for s in steps:
        if isinstance(s, ResizeStep):
            d = _draw_resize(s, c, gen)
        elif isinstance(s, FlipStep):
            d = FlipDraw(s.direction if gen.random() < s.flip_ratio else None)
        elif isinstance(s, CropStep):
            d = _draw_crop(s, c, gen)
        elif isinstance(s, MosaicStep):
            d = _draw_mosaic(s, len(records), gen)
        elif isinstance(s, MixUpStep):
            d = _draw_mixup(s, c, records, gen)
        else:
            raise TypeError(f"not an augment step: {s!r}")
        c = apply(d, c, lambda i: A.canvas_of(records[i]))
        draws.append(d)
    return View(int(image), tuple(draws))


# ---------------------------------------------------------------------- composing
def apply(d: Draw, c: A.Canvas, partner: Callable[[int], A.Canvas]) -> A.Canvas:
    """One drawn step on canvas ``c``; ``partner(i)``: the loaded canvas of split index ``i``."""
    if isinstance(d, ResizeDraw):
        return A.resize(c, d.scale, d.keep_ratio)
    if isinstance(d, FlipDraw):
        return A.flip(c, d.direction)
    if isinstance(d, CropDraw):
        return A.crop(c, d.top, d.left, d.height, d.width) if d.applied else c
    if isinstance(d, MosaicDraw):
        if not d.partners:
            return c
        return A.mosaic([c, *(partner(i) for i in d.partners)], d.center, d.img_scale, d.pad_val)
    if isinstance(d, MixUpDraw):
        if d.partner < 0:
            return c
        return A.mixup(c, partner(d.partner), d.img_scale, d.jit, d.flipped, d.offset, d.pad_val)
    raise TypeError(f"not a view draw: {d!r}")


def _loaded(record: Record) -> A.Canvas:
    return A.canvas_of(record, load_checked(record.file_name, record.width, record.height))


def final_canvas(view: View, records: Sequence[Record],
                 load: Callable[[Record], A.Canvas] | None = _loaded) -> A.Canvas:
    """The view's canvas after its last step (``load`` None: geometry only, no image decoded)."""
    load = load or A.canvas_of
    c = load(records[view.image])
    for d in view.draws:
        c = apply(d, c, lambda i: load(records[i]))
    return c


def padded_view_shape(view: View, records: Sequence[Record], d: DataConfig) -> tuple[int, int]:
    """The padded input shape of a view, from the annotations alone (no image decode)."""
    c = final_canvas(view, records, load=None)
    k = d.pad_divisor
    return (-(-c.h // k) * k, -(-c.w // k) * k)


def compose(view: View, records: Sequence[Record], d: DataConfig,
            load: Callable[[Record], A.Canvas] | None = _loaded) -> dict:
    """The network input and targets of a view: ``img`` float32 ``[3, Hp, Wp]`` (normalised and
    padded as ``data`` says), ``gt_boxes`` ``[n, 4]`` / ``ignore_boxes`` float32, ``gt_labels``
    int64 and ``meta`` (variant ``"view"``; ``scale_factor`` and ``flip``: the main image's)."""
    c = final_canvas(view, records, load)
    keep = A._area(c.boxes)
    boxes, labels = c.boxes[keep], c.labels[keep]
    ignore = c.ignore[A._area(c.ignore)]
    img = mmcv.imnormalize(c.img, np.asarray(d.mean, dtype=np.float32),
                           np.asarray(d.std, dtype=np.float32), d.to_rgb)
    img = mmcv.impad_to_multiple(img, d.pad_divisor, pad_val=0)
    record = records[view.image]
    meta = SampleMeta(image_id=int(record.image_id), file_name=record.file_name, variant="view",
                      ori_shape=(int(record.height), int(record.width)), img_shape=(c.h, c.w),
                      pad_shape=(int(img.shape[0]), int(img.shape[1])),
                      scale_factor=(float(c.scale[0]), float(c.scale[1])), flip=bool(c.flip))
    return {
        "img": torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32)),
        "gt_boxes": torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32)),
        "gt_labels": torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)),
        "ignore_boxes": torch.from_numpy(np.ascontiguousarray(ignore, dtype=np.float32)),
        "meta": meta,
    }


__all__ = ["CROP_TRIES", "CropDraw", "DRAWS", "Draw", "FlipDraw", "MixUpDraw", "MosaicDraw",
           "ResizeDraw", "View", "apply", "compose", "draw_view", "final_canvas",
           "padded_view_shape", "view_rng"]
