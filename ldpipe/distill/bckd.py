"""BCKD's two terms (Yang et al., "Bridging Cross-task Protocol Inconsistency for Distillation
in Dense Object Detection", ICCV 2023), with the reductions of the authors' code
(TinyTigerPan/BCKD: ``LDHead.loss_single``, ``NovelKDLoss``; its recipe
``configs/bckd/bckd_r50_gflv1_r101_fpn_coco_1x.py``).

Both read every *valid* anchor (label weight > 0: the image's own padded extent, not ignored)
of the FPN levels that hold at least one positive in the batch: the reference computes them
inside its ``if len(pos_inds) > 0`` branch, per level, so a level without positives adds
nothing.  Both are divided by ``num_total`` (the GFL classification normaliser: the mean over
ranks of ``sum_img max(n_pos, 1)``, at least 1) plus float32 eps, as mmdetection's
``weight_reduce_loss`` does with an ``avg_factor``.

* classification: ``sum_c BCE(s_c, sigma(t_c)) * |sigma(t_c) - sigma(s_c)|^beta`` per anchor,
  times its label weight (the student's sigmoid in the modulating factor is *not* detached,
  as the reference's ``novel_kd_loss``);
* box: ``1 - GIoU(b_s, b_t)`` between the boxes decoded (in stride units) from the student's
  and the teacher's expected edge distances, weighted by ``max_c |sigma(t_c) - sigma(s_c)|``
  (detached) times the label weight; GIoU as mmdetection's ``bbox_overlaps(mode="giou",
  eps=1e-6)`` (the union and the enclosing area clamped below at eps).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.boxes import anchor_centers, distance2bbox

# mmdetection's weight_reduce_loss: loss.sum() / (avg_factor + eps)
AVG_EPS = float(torch.finfo(torch.float32).eps)
GIOU_EPS = 1e-6  # mmdetection's GIoULoss default


def expected_distances(corners: torch.Tensor) -> torch.Tensor:
    """``[k, 4]`` expected bin of each edge distribution ``[k, 4, reg_max + 1]`` (logits or
    log-probabilities: the softmax is the same), as ``ldpipe.models.gfl_head.Integral``."""
    bins = corners.shape[-1]
    prob = F.softmax(corners.reshape(-1, bins).float(), dim=1)
    project = torch.linspace(0, bins - 1, bins, device=corners.device)
    return (prob @ project.float()).reshape(-1, 4)


def giou(pred: torch.Tensor, target: torch.Tensor, eps: float = GIOU_EPS) -> torch.Tensor:
    """Aligned GIoU ``[k]`` of boxes ``[k, 4]`` (x1, y1, x2, y2), mmdetection's eps placement."""
    lt = torch.max(pred[:, :2], target[:, :2])
    rb = torch.min(pred[:, 2:], target[:, 2:])
    overlap = (rb - lt).clamp(min=0).prod(dim=1)
    area_p = (pred[:, 2] - pred[:, 0]) * (pred[:, 3] - pred[:, 1])
    area_t = (target[:, 2] - target[:, 0]) * (target[:, 3] - target[:, 1])
    union = (area_p + area_t - overlap).clamp(min=eps)
    enclose = (torch.max(pred[:, 2:], target[:, 2:]) - torch.min(pred[:, :2], target[:, :2]))
    enclose_area = enclose.clamp(min=0).prod(dim=1).clamp(min=eps)
    return overlap / union - (enclose_area - union) / enclose_area


def bckd_anchors(label_weights: torch.Tensor, strides: torch.Tensor,
                 pos_index: torch.Tensor) -> torch.Tensor:
    """Batch-flat rows ``[V]`` BCKD reads: valid anchors of the levels holding a positive."""
    levels = torch.unique(strides[pos_index])
    keep = (label_weights > 0) & torch.isin(strides, levels)
    return torch.nonzero(keep).squeeze(1)


def bckd_cls_loss(student_cls: torch.Tensor, teacher_cls: torch.Tensor, weight: torch.Tensor,
                  num_total: float, beta: float = 1.0) -> torch.Tensor:
    """Binary classification distillation over anchors ``[V, C]`` (logits both; ``weight``
    ``[V]`` label weights): ``sum(BCE * |sigma_t - sigma_s|^beta * w) / (num_total + eps)``."""
    if student_cls.numel() == 0:
        return student_cls.sum() * 0
    s = student_cls.float()
    target = teacher_cls.detach().float().sigmoid()
    per = F.binary_cross_entropy_with_logits(s, target, reduction="none")
    per = per * (target - s.sigmoid()).abs().pow(beta)
    return (per.sum(dim=1) * weight).sum() / (num_total + AVG_EPS)


def bckd_box_loss(student_cls: torch.Tensor, teacher_cls: torch.Tensor, student_corners: torch.Tensor,
                  teacher_dist: torch.Tensor, anchors: torch.Tensor, strides: torch.Tensor,
                  weight: torch.Tensor, num_total: float) -> torch.Tensor:
    """The IoU-based box term over anchors ``[V]``: the student's corners ``[V, 4, reg_max + 1]``,
    the teacher's expected edge distances ``[V, 4]`` in bins (:func:`expected_distances`),
    anchors ``[V, 4]`` in pixels, strides ``[V]``, ``weight`` ``[V]`` label weights."""
    if student_cls.numel() == 0:
        return student_corners.sum() * 0
    gap = (teacher_cls.detach().float().sigmoid() - student_cls.detach().float().sigmoid()).abs()
    w = gap.max(dim=1).values * weight
    centers = anchor_centers(anchors) / strides[:, None]
    box_s = distance2bbox(centers, expected_distances(student_corners))
    box_t = distance2bbox(centers, teacher_dist.detach().float())
    return ((1 - giou(box_s, box_t)) * w).sum() / (num_total + AVG_EPS)
