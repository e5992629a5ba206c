"""GFL's losses, pointwise (reduction is the caller's, as in mmdetection).

* Quality Focal Loss (QFL): sigmoid BCE against an IoU-quality target, scaled
  by ``|target - sigmoid(pred)|^beta``; summed over classes.  ``activated=True`` takes
  probabilities instead of logits (GFocalV2's joint score).
* Distribution Focal Loss (DFL): cross entropy to the two bins around the
  continuous target, linearly weighted.
* GIoU loss: ``1 - GIoU`` (torchvision).
* CIoU loss: ``1 - CIoU`` as the LD reference's ``CIoULoss`` computes it (its VOC recipe),
  with that class's eps (:data:`CIOU_EPS`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou_loss


def quality_focal_loss(pred: torch.Tensor, labels: torch.Tensor, score: torch.Tensor,
                       beta: float = 2.0, activated: bool = False) -> torch.Tensor:
    """QFL per anchor ``[N]``.

    Args:
        pred: class logits ``[N, C]`` or, with ``activated``, probabilities (GFocalV2's joint
            score ``sigmoid(cls) x quality``: the reference calls its QFL with
            ``use_sigmoid=False`` there, i.e. BCE on probabilities, ``mmdet``'s ``activated=True``).
        labels: ``[N]`` class index, ``C`` for background.
        score: ``[N]`` IoU-quality target of positives (ignored elsewhere).
    """
    bce = _bce_prob if activated else F.binary_cross_entropy_with_logits
    sig = pred if activated else pred.sigmoid()
    loss = bce(pred, torch.zeros_like(pred), reduction="none")
    loss = loss * sig.pow(beta)
    num_classes = pred.shape[1]
    pos = torch.nonzero((labels >= 0) & (labels < num_classes)).squeeze(1)
    if pos.numel():
        cls = labels[pos]
        p = pred[pos, cls]
        s = score[pos].to(pred.dtype)
        loss[pos, cls] = bce(p, s, reduction="none") * (
            s - (p if activated else p.sigmoid())).abs().pow(beta)
    return loss.sum(dim=1)


def _bce_prob(p: torch.Tensor, target: torch.Tensor, reduction: str = "none") -> torch.Tensor:
    """``F.binary_cross_entropy`` on probabilities (each log clamped at -100 as torch does),
    written out so that it also runs inside CUDA autocast, which refuses that function."""
    assert reduction == "none"
    log_p = torch.log(p).clamp(min=-100.0)
    log_q = torch.log(1 - p).clamp(min=-100.0)
    return -(target * log_p + (1 - target) * log_q)


def distribution_focal_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """DFL per edge ``[M]`` for logits ``[M, reg_max+1]`` and continuous targets ``[M]``."""
    left = target.long()
    right = left + 1
    w_left = right.float() - target
    w_right = target - left.float()
    return (F.cross_entropy(pred, left, reduction="none") * w_left
            + F.cross_entropy(pred, right, reduction="none") * w_right)


def giou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - GIoU`` per box pair ``[M]``."""
    return generalized_box_iou_loss(pred, target, reduction="none", eps=1e-6)


# The LD reference's ``CIoULoss`` class (what its configs build, ``dict(type='CIoULoss')``)
# defaults to ``eps=1e-6`` and passes it to its ``ciou_loss`` function, whose own default
# (1e-7) is therefore never used by a recipe; this is the class's value.
CIOU_EPS = 1e-6


def ciou_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = CIOU_EPS) -> torch.Tensor:
    """``1 - CIoU`` per box pair ``[M]``, with the LD reference's formula and eps placement.

    ``eps`` (default :data:`CIOU_EPS`, the reference class's 1e-6) is added to the union, to
    ``c^2`` and to both heights, as the reference does; it matters for tiny boxes only.

    ``CIoU = IoU - rho^2 / c^2 - v^2 / (1 - IoU + v)``, ``v = 4/pi^2 (atan(w_t/h_t) -
    atan(w_p/h_p))^2`` (0 where ``v = 0``); unlike torchvision's ``complete_box_iou_loss`` the trade-off term
    ``alpha = v / (1 - IoU + v)`` is not detached (the reference keeps its gradient).
    """
    lt = torch.max(pred[:, :2], target[:, :2])
    rb = torch.min(pred[:, 2:], target[:, 2:])
    overlap = (rb - lt).clamp(min=0).prod(dim=1)
    area_p = (pred[:, 2] - pred[:, 0]) * (pred[:, 3] - pred[:, 1])
    area_t = (target[:, 2] - target[:, 0]) * (target[:, 3] - target[:, 1])
    iou = overlap / (area_p + area_t - overlap + eps)
    enclose = (torch.max(pred[:, 2:], target[:, 2:]) - torch.min(pred[:, :2], target[:, :2])).clamp(min=0)
    c2 = (enclose ** 2).sum(dim=1) + eps
    rho2 = (((target[:, :2] + target[:, 2:]) - (pred[:, :2] + pred[:, 2:])) ** 2).sum(dim=1) / 4
    w_p, h_p = pred[:, 2] - pred[:, 0], pred[:, 3] - pred[:, 1] + eps
    w_t, h_t = target[:, 2] - target[:, 0], target[:, 3] - target[:, 1] + eps
    v = (4 / math.pi ** 2) * (torch.atan(w_t / h_t) - torch.atan(w_p / h_p)) ** 2
    # v = 0 (same aspect ratio) makes the term 0; the reference's 0 / (1 - IoU + v) is NaN when
    # also IoU == 1 in float32, which this avoids (equal wherever the reference is finite)
    aspect = torch.where(v > 0, v ** 2 / (1 - iou + v).clamp(min=1e-12), torch.zeros_like(v))
    return 1 - (iou - (rho2 / c2 + aspect))


BOX_LOSS = {"giou": giou_loss, "ciou": ciou_loss}
