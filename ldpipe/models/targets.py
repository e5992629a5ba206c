"""Training targets: ATSS labels, box targets and VLR weights per image, then per batch.

Per image (:func:`image_targets`, in the loader workers) on the image's own anchor
grid; per batch (:func:`batch_targets`, in the training step) scattered into the
batch-flat layout the model's :class:`~ldpipe.models.detector.DenseOutput` uses: image
``b``'s anchor ``j`` of the batch grid is flat row ``b * N + j``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .anchors import Grid, grid_tensors, grid_to_batch_index, make_grid
from .assigner import atss_assign, vlr_weights


@dataclass
class ImageTargets:
    """Training targets of one image on its own anchor grid (CPU tensors)."""

    grid: Grid
    labels: torch.Tensor  # [N] long, num_classes = background
    label_weights: torch.Tensor  # [N] float, 0 for ignored anchors
    bbox_targets: torch.Tensor  # [N,4] assigned GT box (zeros for non-positives)
    vlr: torch.Tensor | None  # [N] VLR IoU weights, or None
    num_classes: int



def image_targets(gt: torch.Tensor, labels: torch.Tensor, ignore: torch.Tensor | None,
                  pad_shape: tuple[int, int], strides, anchor_scale: float, num_classes: int,
                  topk: int = 9, ignore_iof_thr: float = -1.0, with_vlr: bool = False,
                  vlr_region: str = "reference") -> ImageTargets:
    """Assign one image's anchors; everything on the CPU in float32."""
    grid = make_grid(pad_shape, strides, anchor_scale)
    anchors, _ = grid_tensors(grid)
    gt = gt.float().cpu().reshape(-1, 4)
    res = atss_assign(anchors, grid.num_level_anchors, gt, ignore, topk, ignore_iof_thr)
    n = anchors.shape[0]
    out_labels = torch.full((n,), num_classes, dtype=torch.long)
    weights = (res.gt_index >= 0).float()
    targets = torch.zeros(n, 4)
    pos = res.gt_index > 0
    if pos.any():
        k = res.gt_index[pos] - 1
        out_labels[pos] = labels.long().cpu()[k]
        targets[pos] = gt[k]
    vlr = (vlr_weights(anchors, gt, res.thr, overlaps=res.overlaps, region=vlr_region)
           if with_vlr else None)
    return ImageTargets(grid, out_labels, weights, targets, vlr, num_classes)


@dataclass(frozen=True)
class PositiveSet:
    """The batch's ATSS positives as the GFL losses weighted them (what LD reuses)."""

    index: torch.Tensor  # [P] int64 batch-flat anchor rows of the positives
    weight: torch.Tensor  # [P] the student's detached max class (or joint) score at each


@dataclass
class BatchTargets:
    """Per-image targets scattered into the batch's flattened anchor layout."""

    anchors: torch.Tensor  # [B*N, 4]
    strides: torch.Tensor  # [B*N]
    labels: torch.Tensor  # [B*N]
    label_weights: torch.Tensor  # [B*N]
    bbox_targets: torch.Tensor  # [B*N, 4]
    vlr: torch.Tensor | None  # [B*N]
    own_to_batch: list[torch.Tensor]  # per image: own-grid flat index -> flat index in [B*N]
    num_pos_images: float  # sum over images of max(n_pos, 1)


def batch_targets(targets: list[ImageTargets], batch_sizes: list[tuple[int, int]],
                  strides: list[int], anchor_scale: float, num_classes: int,
                  device: torch.device) -> BatchTargets:
    """Scatter own-grid targets into the batch grid.

    Anchors outside an image's own padded extent get label weight 0 (mmdetection's
    valid flags).  Flat index of image ``b`` anchor ``j`` is ``b * N + j``.
    """
    grid = Grid(tuple(batch_sizes), tuple(strides), float(anchor_scale))
    anchors, stride_of = grid_tensors(grid)
    n = anchors.shape[0]
    bsz = len(targets)
    labels = torch.full((bsz, n), num_classes, dtype=torch.long)
    weights = torch.zeros(bsz, n)
    boxes = torch.zeros(bsz, n, 4)
    with_vlr = bool(targets) and targets[0].vlr is not None
    vlr = torch.zeros(bsz, n) if with_vlr else None
    maps, num_pos = [], 0.0
    for b, t in enumerate(targets):
        idx = grid_to_batch_index(list(t.grid.sizes), batch_sizes)
        labels[b, idx] = t.labels
        weights[b, idx] = t.label_weights
        boxes[b, idx] = t.bbox_targets
        if vlr is not None:
            vlr[b, idx] = t.vlr
        maps.append((idx + b * n).to(device))
        num_pos += max(int((t.labels < num_classes).sum()), 1)
    return BatchTargets(
        anchors.repeat(bsz, 1).to(device), stride_of.repeat(bsz).to(device),
        labels.reshape(-1).to(device), weights.reshape(-1).to(device),
        boxes.reshape(-1, 4).to(device), vlr.reshape(-1).to(device) if vlr is not None else None,
        maps, num_pos)
