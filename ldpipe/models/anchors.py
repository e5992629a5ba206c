"""The anchor grid: one square anchor per feature-map location, level by level.

The layout follows mmdetection's ``AnchorGenerator`` with one anchor per location of
side ``anchor_scale * stride`` centred at ``(x * stride, y * stride)`` (centre offset 0),
flattened level by level, row-major (``y * W + x``).  An image's *own* grid is that of
its padded input; a batch's grid is that of the largest padded input in the batch, and
:func:`grid_to_batch_index` maps one to the other.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch


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


@dataclass(frozen=True)
class Grid:
    """The anchor grid of one padded input."""

    sizes: tuple[tuple[int, int], ...]
    strides: tuple[int, ...]
    anchor_scale: float

    @property
    def num_level_anchors(self) -> list[int]:
        return [h * w for h, w in self.sizes]

    @property
    def num_anchors(self) -> int:
        return sum(self.num_level_anchors)


def make_grid(pad_shape: tuple[int, int], strides, anchor_scale: float) -> Grid:
    sizes = tuple(level_sizes(tuple(pad_shape), list(strides)))
    return Grid(sizes, tuple(int(s) for s in strides), float(anchor_scale))


@lru_cache(maxsize=64)
def grid_tensors(grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchors ``[N,4]`` and per-anchor stride ``[N]`` (CPU, cached)."""
    return grid_anchors(list(grid.sizes), list(grid.strides), grid.anchor_scale)


def grid_to_batch_index(own, batch) -> torch.Tensor:
    """Map each flat index of an image's own grid to the flat index in a batch grid.

    The batch grid is at least as large per level (the batch pads to its largest
    image); positions ``(y, x)`` keep their meaning.  Cached per pair of grids (the
    result is shared: do not modify it in place).
    """
    return _grid_to_batch_index(tuple(map(tuple, own)), tuple(map(tuple, batch)))


@lru_cache(maxsize=256)
def _grid_to_batch_index(own: tuple, batch: tuple) -> torch.Tensor:
    out, batch_off = [], 0
    for (h, w), (bh, bw) in zip(own, batch):
        if h > bh or w > bw:
            raise ValueError(f"image grid {h}x{w} exceeds batch grid {bh}x{bw}")
        ys = torch.arange(h).repeat_interleave(w)
        xs = torch.arange(w).repeat(h)
        out.append(batch_off + ys * bw + xs)
        batch_off += bh * bw
    return torch.cat(out)


__all__ = ["Grid", "grid_anchors", "grid_tensors", "grid_to_batch_index", "level_sizes", "make_grid"]
