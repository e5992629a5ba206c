"""LD losses with the reference implementation's reductions.

``kd_kl`` is mmdetection's ``knowledge_distillation_kl_div_loss``: the
pointwise KL between ``softmax(teacher / T)`` and ``softmax(student / T)``,
*averaged* over the distribution's bins (classes for KD), times ``T^2``.  The
teacher may be given as raw logits or as log-probabilities: softmax is
unchanged by a per-row constant, so both give the same value.

Reductions (LD reference, ``LDHead.loss_single``, summed over levels):

* LD (main region = ATSS positives): ``sum(kl * w) / 4`` over the 4 edges of every
  positive, ``w`` = the student's detached max class score; not divided by the
  number of positives.
* VLR LD: ``sum(kl * w) / 16`` over the 4 edges of every VLR anchor, ``w`` = its IoU.
* Classification KD on positives: per FPN level, ``sum(kl * label_weight) / n_pos(level)``,
  summed over levels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_kl(student: torch.Tensor, teacher: torch.Tensor, T: float) -> torch.Tensor:
    """Per-row KD loss ``[M]`` for logits ``[M, K]`` (teacher detached)."""
    log_q = F.log_softmax(student.float() / T, dim=1)
    log_p = F.log_softmax(teacher.detach().float() / T, dim=1)
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).mean(dim=1) * (T * T)


def _edge_kd(student_corners: torch.Tensor, teacher_corners: torch.Tensor, weight: torch.Tensor,
             T: float, divisor: float) -> torch.Tensor:
    """``sum(kd_kl * w) / divisor`` over edges; ``weight`` ``[A]`` per anchor, repeated for its 4 edges."""
    if student_corners.numel() == 0:
        return student_corners.sum() * 0
    w = weight[:, None].expand(-1, 4).reshape(-1)
    return (kd_kl(student_corners, teacher_corners, T) * w).sum() / divisor


def ld_loss(student_corners: torch.Tensor, teacher_corners: torch.Tensor, weight: torch.Tensor,
            T: float = 10.0) -> torch.Tensor:
    """LD on the main region. corners: ``[4P, reg_max+1]``; weight: ``[P]`` per box."""
    return _edge_kd(student_corners, teacher_corners, weight, T, 4.0)


def vlr_loss(student_corners: torch.Tensor, teacher_corners: torch.Tensor, iou: torch.Tensor,
             T: float = 10.0) -> torch.Tensor:
    """LD on the valuable localization region; ``iou`` ``[V]`` weights each anchor."""
    return _edge_kd(student_corners, teacher_corners, iou, T, 16.0)


def cls_kd_loss(student_cls: torch.Tensor, teacher_cls: torch.Tensor, weight: torch.Tensor,
                level: torch.Tensor, T: float = 2.0) -> torch.Tensor:
    """Class KD on positives, averaged per level over its positives, summed over levels."""
    if student_cls.numel() == 0:
        return student_cls.sum() * 0
    per = kd_kl(student_cls, teacher_cls, T) * weight
    total = student_cls.new_zeros(())
    for lv in torch.unique(level):
        m = level == lv
        total = total + per[m].sum() / m.sum()
    return total
