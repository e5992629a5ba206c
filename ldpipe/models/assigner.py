"""ATSS assignment and the LD regions, per image, on the image's own anchor grid.

Everything here is a pure function of the ground-truth boxes and the anchor
grid, so the teacher dump and the student compute the same sets.  Ties in the
centre-distance ranking are broken by anchor index (a stable sort), so the
result does not depend on the device or on the batch an image is in.

* ``atss_assign`` - Adaptive Training Sample Selection (Zhang et al. 2020), as
  mmdetection's ``ATSSAssigner``: per level the ``topk`` anchors closest to the
  GT centre are candidates; IoU threshold = mean + std of their IoUs; positives
  are candidates at or above it whose centre lies inside the GT; an anchor
  claimed by several GTs takes the one of highest IoU.
* ``vlr_weights`` - the valuable localization region of LD v2: per GT the
  anchors with ``0.25 thr <= D < thr`` (``thr`` is that GT's ATSS threshold),
  weighted by IoU; an anchor in several GTs' regions takes the highest IoU among
  them (the LD reference implementation's rule).  ``D`` is, by ``region``, the
  reference code's "DIoU" (intersection over the anchor's area minus the centre
  distance term: ``boxes.reference_vlr_diou``, the default) or true DIoU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .boxes import anchor_centers, box_iou, distance_box_iou, iof, reference_vlr_diou

INF = 1e8


@dataclass
class Assignment:
    gt_index: torch.Tensor  # [N] long: -1 ignored, 0 negative, k+1 positive for GT k
    max_iou: torch.Tensor  # [N] IoU with the assigned GT (0 elsewhere)
    thr: torch.Tensor  # [G] ATSS IoU threshold per GT
    overlaps: torch.Tensor | None = None  # [N, G] anchor-GT IoU (reused by vlr_weights)


def _candidates(distances: torch.Tensor, num_level: list[int], topk: int) -> torch.Tensor:
    """Per level and GT, the ``topk`` anchors nearest the GT centre: ``[K, G]`` rows, nearest
    first, ties broken by the lower anchor index (the first ``topk`` of a stable sort).

    ``topk`` finds the k-th smallest distance; the anchors below it and the lowest-index ones
    equal to it make the set, which is then stably sorted - the same result as stably sorting
    the whole level, at a fraction of its cost on large grids.
    """
    idx, start = [], 0
    g = distances.shape[1]
    for n in num_level:
        k = min(topk, n)
        if k == 0:  # an empty level (or topk 0) contributes no candidates
            start += n
            continue
        d = distances[start:start + n]
        kth = d.topk(k, dim=0, largest=False).values[-1]  # [G]
        below, ties = d < kth, d == kth
        take = below | (ties & (ties.cumsum(0) <= k - below.sum(0)))
        rows = torch.nonzero(take.T)[:, 1].reshape(g, k).T  # [k, G], ascending index
        order = torch.sort(d.gather(0, rows), dim=0, stable=True).indices
        idx.append(rows.gather(0, order) + start)
        start += n
    if not idx:
        return torch.zeros((0, g), dtype=torch.long)
    return torch.cat(idx, dim=0)  # [K, G]


def atss_assign(anchors: torch.Tensor, num_level: list[int], gt: torch.Tensor,
                ignore: torch.Tensor | None = None, topk: int = 9,
                ignore_iof_thr: float = -1.0) -> Assignment:
    n, g = anchors.shape[0], gt.shape[0]
    gt_index = torch.zeros(n, dtype=torch.long)
    if g == 0 or n == 0:
        return Assignment(gt_index, anchors.new_zeros(n), anchors.new_zeros(g))
    overlaps = box_iou(anchors, gt)
    centers = anchor_centers(anchors)
    gt_centers = (gt[:, :2] + gt[:, 2:]) / 2
    distances = torch.cdist(centers, gt_centers, compute_mode="donot_use_mm_for_euclid_dist")
    if ignore_iof_thr > 0 and ignore is not None and ignore.numel():
        ignored = iof(anchors, ignore).max(dim=1).values > ignore_iof_thr
        distances[ignored] = INF
        gt_index[ignored] = -1
    cand = _candidates(distances, num_level, topk)
    cols = torch.arange(g)
    cand_iou = overlaps[cand, cols]
    thr = cand_iou.mean(0) + cand_iou.std(0)
    cx, cy = centers[cand, 0], centers[cand, 1]
    inside = torch.stack([cx - gt[:, 0], cy - gt[:, 1], gt[:, 2] - cx, gt[:, 3] - cy],
                         dim=0).min(dim=0).values > 0.01
    is_pos = (cand_iou >= thr[None]) & inside
    masked = torch.full_like(overlaps, -INF)
    pos_rows, pos_cols = cand[is_pos], cols.expand_as(cand)[is_pos]
    masked[pos_rows, pos_cols] = overlaps[pos_rows, pos_cols]
    best, arg = masked.max(dim=1)
    pos = best != -INF
    gt_index[pos] = arg[pos] + 1
    max_iou = torch.where(pos, best, torch.zeros_like(best))
    return Assignment(gt_index, max_iou, thr, overlaps)


# assigner.vlr_region -> the D of its membership test (config.VLR_REGIONS names exactly these)
VLR_D = {"reference": reference_vlr_diou, "diou": distance_box_iou}


def vlr_weights(anchors: torch.Tensor, gt: torch.Tensor, thr: torch.Tensor,
                low: float = 0.25, overlaps: torch.Tensor | None = None,
                region: str = "reference") -> torch.Tensor:
    """IoU weight of each anchor in the valuable localization region (0 outside).
    ``overlaps``: the anchor-GT IoU if already computed (``Assignment.overlaps``);
    ``region``: ``"reference"`` or ``"diou"`` (config ``assigner.vlr_region``)."""
    n = anchors.shape[0]
    if gt.shape[0] == 0 or n == 0:
        return anchors.new_zeros(n)
    if overlaps is None:
        overlaps = box_iou(anchors, gt)
    # Either D is at most an overlap ratio (IoU, or intersection over the anchor's area), so
    # with low > 0 (D >= low * thr > 0; thr = 0 gives an empty region) only anchors that
    # overlap some GT can qualify: compute D for those rows alone (most anchors of an image).
    rows = torch.nonzero((overlaps > 0).any(dim=1)).squeeze(1) if low > 0 else torch.arange(n)
    if region not in VLR_D:
        raise ValueError(f"unknown VLR region {region!r} (reference or diou)")
    diou = VLR_D[region](anchors[rows], gt)
    inside = (diou < thr[None]) & (diou >= low * thr[None])
    ov = overlaps[rows]
    best = torch.where(inside, ov, torch.full_like(ov, -INF)).max(dim=1).values
    out = anchors.new_zeros(n)
    out[rows] = torch.where(best != -INF, best, torch.zeros_like(best))
    return out


def overlap_mask(anchors: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Anchors with IoU > 0 with any GT (the assigner-agnostic region)."""
    if gt.shape[0] == 0:
        return torch.zeros(anchors.shape[0], dtype=torch.bool)
    return (box_iou(anchors, gt) > 0).any(dim=1)
