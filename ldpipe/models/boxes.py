"""Box geometry: anchors, distance encoding, IoU variants.

Boxes are ``xyxy`` in input pixels.  The anchor layout follows mmdetection's
``AnchorGenerator`` with one square anchor per location of side
``anchor_scale * stride`` centred at ``(x * stride, y * stride)`` (centre
offset 0), flattened level by level, row-major (``y * W + x``).
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
from torchvision.ops import box_iou, distance_box_iou


def level_sizes(pad_shape: tuple[int, int], strides: list[int]) -> list[tuple[int, int]]:
    """Anchor grid ``(h, w)`` per level for an input padded to ``pad_shape``.

    Equal to the feature-map sizes of a ResNet/FPN on that input when it is a
    multiple of 32, and to mmdetection's valid-flag extent otherwise.
    """
    h, w = pad_shape
    return [(math.ceil(h / s), math.ceil(w / s)) for s in strides]


def grid_anchors(sizes: list[tuple[int, int]], strides: list[int], anchor_scale: float,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """All anchors of a grid: ``(anchors [N,4], stride per anchor [N])``."""
    boxes, stride_of = [], []
    for (h, w), s in zip(sizes, strides):
        ys = torch.arange(h, device=device, dtype=torch.float32) * s
        xs = torch.arange(w, device=device, dtype=torch.float32) * s
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        half = anchor_scale * s / 2
        c = torch.stack([cx.reshape(-1), cy.reshape(-1)], dim=1)
        boxes.append(torch.cat([c - half, c + half], dim=1))
        stride_of.append(torch.full((h * w,), float(s), device=device))
    return torch.cat(boxes), torch.cat(stride_of)


def anchor_centers(anchors: torch.Tensor) -> torch.Tensor:
    return (anchors[:, :2] + anchors[:, 2:]) / 2


def grid_to_batch_index(own, batch) -> torch.Tensor:
    """Map each flat index of an image's own grid to the flat index in a batch grid.

    The batch grid is at least as large per level (the batch pads to its largest
    image); positions ``(y, x)`` keep their meaning.  Cached per pair of grids (the
    result is shared: do not modify it in place).
    """
    return _grid_to_batch_index(tuple(map(tuple, own)), tuple(map(tuple, batch)))


@lru_cache(maxsize=256)
def _grid_to_batch_index(own: tuple, batch: tuple) -> torch.Tensor:
    out, own_off, batch_off = [], 0, 0
    for (h, w), (bh, bw) in zip(own, batch):
        if h > bh or w > bw:
            raise ValueError(f"image grid {h}x{w} exceeds batch grid {bh}x{bw}")
        ys = torch.arange(h).repeat_interleave(w)
        xs = torch.arange(w).repeat(h)
        out.append(batch_off + ys * bw + xs)
        own_off += h * w
        batch_off += bh * bw
    return torch.cat(out)


def distance2bbox(points: torch.Tensor, dist: torch.Tensor,
                  max_shape: tuple[int, int] | None = None) -> torch.Tensor:
    """Decode ``(l, t, r, b)`` distances from points into boxes (clipped to max_shape)."""
    x1 = points[..., 0] - dist[..., 0]
    y1 = points[..., 1] - dist[..., 1]
    x2 = points[..., 0] + dist[..., 2]
    y2 = points[..., 1] + dist[..., 3]
    if max_shape is not None:
        h, w = max_shape
        x1, x2 = x1.clamp(0, w), x2.clamp(0, w)
        y1, y2 = y1.clamp(0, h), y2.clamp(0, h)
    return torch.stack([x1, y1, x2, y2], dim=-1)


def bbox2distance(points: torch.Tensor, boxes: torch.Tensor, max_dis: float | None = None,
                  eps: float = 0.1) -> torch.Tensor:
    """Encode boxes as ``(l, t, r, b)`` distances, clamped to ``[0, max_dis - eps]``."""
    d = torch.stack([points[:, 0] - boxes[:, 0], points[:, 1] - boxes[:, 1],
                     boxes[:, 2] - points[:, 0], boxes[:, 3] - points[:, 1]], dim=-1)
    if max_dis is not None:
        d = d.clamp(min=0, max=max_dis - eps)
    return d


def aligned_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """IoU of corresponding rows of ``a`` and ``b`` ([N,4] each)."""
    lt = torch.max(a[:, :2], b[:, :2])
    rb = torch.min(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(dim=1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(dim=1)
    return inter / (area_a + area_b - inter).clamp(min=eps)


def iof(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise intersection over the area of ``a`` ([N,M])."""
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(dim=1)
    return inter / area_a.clamp(min=1e-6)[:, None]


__all__ = [
    "aligned_iou", "anchor_centers", "bbox2distance", "box_iou", "distance2bbox",
    "distance_box_iou", "grid_anchors", "grid_to_batch_index", "iof", "level_sizes",
]
