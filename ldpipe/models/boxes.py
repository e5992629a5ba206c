"""Box geometry: distance encoding and IoU variants.  Boxes are ``xyxy`` in input pixels."""
from __future__ import annotations

import torch
from torchvision.ops import box_iou, distance_box_iou


def anchor_centers(anchors: torch.Tensor) -> torch.Tensor:
    return (anchors[:, :2] + anchors[:, 2:]) / 2


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


def reference_vlr_diou(anchors: torch.Tensor, gt: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``[N, M]``: the "DIoU" that decides VLR membership in the LD reference code.

    Its IoU calculator in ``diou`` mode takes the union as the *anchor's* area (every mode
    but ``iou``/``giou`` does), so this is ``inter / area(anchor) - rho^2 / c^2`` (``rho``:
    centre distance, ``c``: diagonal of the enclosing box; both denominators at least
    ``eps``), not true DIoU (torchvision's ``distance_box_iou``).
    """
    lt = torch.max(anchors[:, None, :2], gt[None, :, :2])
    rb = torch.min(anchors[:, None, 2:], gt[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)
    area = (anchors[:, 2:] - anchors[:, :2]).prod(dim=1)
    rho2 = ((anchor_centers(anchors)[:, None, :] - anchor_centers(gt)[None, :, :]) ** 2).sum(dim=2)
    enclose = (torch.max(anchors[:, None, 2:], gt[None, :, 2:])
               - torch.min(anchors[:, None, :2], gt[None, :, :2])).clamp(min=0)
    return inter / area.clamp(min=eps)[:, None] - rho2 / (enclose ** 2).sum(dim=2).clamp(min=eps)


__all__ = [
    "aligned_iou", "anchor_centers", "bbox2distance", "box_iou", "distance2bbox",
    "distance_box_iou", "iof", "reference_vlr_diou",
]
