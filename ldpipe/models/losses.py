"""GFL's losses, pointwise (reduction is the caller's, as in mmdetection).

* Quality Focal Loss (QFL): sigmoid BCE against an IoU-quality target, scaled
  by ``|target - sigmoid(pred)|^beta``; summed over classes.
* Distribution Focal Loss (DFL): cross entropy to the two bins around the
  continuous target, linearly weighted.
* GIoU loss: ``1 - GIoU`` (torchvision).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou_loss


def quality_focal_loss(pred: torch.Tensor, labels: torch.Tensor, score: torch.Tensor,
                       beta: float = 2.0) -> torch.Tensor:
    """QFL per anchor ``[N]``.

    Args:
        pred: class logits ``[N, C]``.
        labels: ``[N]`` class index, ``C`` for background.
        score: ``[N]`` IoU-quality target of positives (ignored elsewhere).
    """
    sig = pred.sigmoid()
    loss = F.binary_cross_entropy_with_logits(pred, torch.zeros_like(pred), reduction="none")
    loss = loss * sig.pow(beta)
    num_classes = pred.shape[1]
    pos = torch.nonzero((labels >= 0) & (labels < num_classes)).squeeze(1)
    if pos.numel():
        cls = labels[pos]
        p = pred[pos, cls]
        s = score[pos].to(pred.dtype)
        loss[pos, cls] = F.binary_cross_entropy_with_logits(p, s, reduction="none") * (
            s - p.sigmoid()).abs().pow(beta)
    return loss.sum(dim=1)


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
