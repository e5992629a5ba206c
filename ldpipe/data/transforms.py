"""Input geometry, equal to mmdetection 2.x train/test pipelines.

``LoadImageFromFile -> Resize(keep_ratio) -> RandomFlip -> Normalize -> Pad ->
DefaultFormatBundle``, except that the flip and the scale are not random: a
:class:`Variant` names them, so an offline teacher cache can hold one entry per
(image, variant) and the student sees exactly the same pixels.
"""
from __future__ import annotations

from dataclasses import dataclass

import mmcv
import numpy as np
import torch

from ldpipe.config import DataConfig
from ldpipe.data.decode import read_image
from ldpipe.data.errors import DataError
from ldpipe.data.meta import SampleMeta
from ldpipe.data.records import Record


@dataclass(frozen=True)
class Variant:
    """A deterministic augmentation: a scale index and a horizontal flip."""

    scale_idx: int  # index into data.train_scales; -1 = data.test_scale
    flip: bool

    @property
    def key(self) -> str:
        """``'s0n'``, ``'s0f'``, ``'s1n'``, ... or ``'test'``."""
        if self.scale_idx < 0:
            return "test" if not self.flip else "testf"
        return f"s{self.scale_idx}{'f' if self.flip else 'n'}"


TEST_VARIANT = Variant(scale_idx=-1, flip=False)


def train_variants(d: DataConfig) -> list[Variant]:
    """Every (scale, flip) combination, scale-major, no-flip first."""
    flips = (False, True) if d.flip else (False,)
    return [Variant(i, f) for i in range(len(d.train_scales)) for f in flips]


def variant_scale(variant: Variant, d: DataConfig) -> tuple[int, int]:
    """The ``(long, short)`` target scale of a variant."""
    scale = d.test_scale if variant.scale_idx < 0 else d.train_scales[variant.scale_idx]
    return int(scale[0]), int(scale[1])


def padded_shape(record: Record, variant: Variant, d: DataConfig) -> tuple[int, int]:
    """The padded input shape of a sample, from its annotation alone (no image decode)."""
    w, h = mmcv.rescale_size((record.width, record.height), tuple(variant_scale(variant, d)))
    k = d.pad_divisor
    return (-(-h // k) * k, -(-w // k) * k)


def load_image(path: str) -> np.ndarray:
    """BGR uint8 ``[H, W, 3]`` via :func:`mmcv.imread` (PIL for what OpenCV 5 refuses, see
    :mod:`ldpipe.data.decode`); :class:`DataError` naming a bad file."""
    return read_image(path)


def _scale_boxes(boxes: np.ndarray, factor: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    out = boxes.reshape(-1, 4) * factor
    out[:, 0::2] = np.clip(out[:, 0::2], 0, shape[1])
    out[:, 1::2] = np.clip(out[:, 1::2], 0, shape[0])
    return out


def _flip_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    out = boxes.copy()
    out[:, 0] = width - boxes[:, 2]
    out[:, 2] = width - boxes[:, 0]
    return out


def _valid(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def make_sample(record: Record, image: np.ndarray, variant: Variant, d: DataConfig) -> dict:
    """The network input and targets of one (image, variant).

    ``img`` is a float32 tensor ``[3, Hp, Wp]``; ``gt_boxes`` / ``ignore_boxes`` are
    float32 tensors in the resized (and flipped) frame, ``gt_labels`` int64; ``meta`` a
    :class:`SampleMeta` whose ``index`` / ``variant_index`` are left at -1 (the data set sets them).
    """
    h, w = image.shape[:2]
    scale = variant_scale(variant, d)
    new_size = mmcv.rescale_size((w, h), scale)  # what imrescale makes: (w, h)
    if min(new_size) < 1:
        raise DataError(f"{record.file_name}: a {w}x{h} image (width x height) resizes to "
                        f"{new_size[0]}x{new_size[1]} pixels at scale {list(scale)} (keep-ratio): "
                        "too thin to detect in; crop or pad it, or leave it out")
    img = mmcv.imrescale(image, scale, return_scale=False, interpolation="bilinear")
    new_h, new_w = img.shape[:2]
    w_scale, h_scale = new_w / w, new_h / h
    factor = np.array([w_scale, h_scale, w_scale, h_scale], dtype=np.float32)
    boxes = _scale_boxes(record.boxes, factor, (new_h, new_w))
    ignore = _scale_boxes(record.ignore, factor, (new_h, new_w))
    if variant.flip:
        img = mmcv.imflip(img, direction="horizontal")
        boxes, ignore = _flip_boxes(boxes, new_w), _flip_boxes(ignore, new_w)
    keep = _valid(boxes)
    boxes, labels = boxes[keep], record.labels.reshape(-1)[keep]
    ignore = ignore[_valid(ignore)]
    img = mmcv.imnormalize(img, np.asarray(d.mean, dtype=np.float32),
                           np.asarray(d.std, dtype=np.float32), d.to_rgb)
    img = mmcv.impad_to_multiple(img, d.pad_divisor, pad_val=0)
    tensor = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32))
    meta = SampleMeta(image_id=int(record.image_id), file_name=record.file_name, variant=variant.key,
                      ori_shape=(h, w), img_shape=(new_h, new_w),
                      pad_shape=(int(img.shape[0]), int(img.shape[1])),
                      scale_factor=(w_scale, h_scale), flip=bool(variant.flip))
    return {
        "img": tensor,
        "gt_boxes": torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32)),
        "gt_labels": torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)),
        "ignore_boxes": torch.from_numpy(np.ascontiguousarray(ignore, dtype=np.float32)),
        "meta": meta,
    }


def boxes_to_original(boxes, meta: SampleMeta):
    """Map ``[..., 4]`` xyxy boxes from the network frame back to the original image.

    Undoes the flip (about the resized width), then the scale; clips to
    ``meta.ori_shape``.  Accepts a tensor or an ndarray and returns the same kind.
    """
    is_tensor = isinstance(boxes, torch.Tensor)
    out = boxes.clone() if is_tensor else np.array(boxes, dtype=np.float32, copy=True)
    if meta.flip:
        width = meta.img_shape[1]
        x1 = out[..., 0].clone() if is_tensor else out[..., 0].copy()
        out[..., 0] = width - out[..., 2]
        out[..., 2] = width - x1
    w_scale, h_scale = meta.scale_factor
    out[..., 0::2] = out[..., 0::2] / w_scale
    out[..., 1::2] = out[..., 1::2] / h_scale
    h, w = meta.ori_shape
    if is_tensor:
        out[..., 0::2] = out[..., 0::2].clamp(0, w)
        out[..., 1::2] = out[..., 1::2].clamp(0, h)
    else:
        out[..., 0::2] = np.clip(out[..., 0::2], 0, w)
        out[..., 1::2] = np.clip(out[..., 1::2], 0, h)
    return out


__all__ = ["TEST_VARIANT", "Variant", "boxes_to_original", "load_image", "make_sample",
           "train_variants", "variant_scale"]
