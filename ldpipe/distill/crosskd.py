"""CrossKD's terms (Wang et al., "CrossKD: Cross-Head Knowledge Distillation for Object
Detection", CVPR 2024), with the semantics of the authors' code (jbwang1997/CrossKD:
``CrossKDGFL`` in ``mmdet/models/detectors/crosskd_gfl.py``, ``kd_loss.py``; recipe
``configs/crosskd/crosskd_r50_gflv1_r101-2x-ms_fpn_1x_coco.py``), written anew here.

The student's held head features (each tower's input to conv ``idx``, per level) are
normalised per channel over the whole batch and level (mean, unbiased std + 1e-6), rescaled to
the teacher's mean and unbiased std at the same place (:func:`align_scale`), passed through a
ReLU when ``idx > 0`` and through the teacher's remaining head (:class:`ldpipe.models.HeadPart`,
frozen, gradients flow to the student).  Those *cross-head* predictions are distilled against
the teacher's own at every anchor:

* ``crosskd_cls`` - KD quality focal loss: ``BCE(s, sigma(t)) * |sigma(s) - sigma(t)|^beta``
  summed over classes and valid anchors (label weight), / (the GFL positives normaliser +
  eps) - the formula of BCKD's classification term (:func:`ldpipe.distill.bckd.bckd_cls_loss`),
  here over every level;
* ``crosskd_reg`` - KL at temperature T (summed over the bins, times T^2) of every edge
  distribution, weighted by the teacher's max class sigmoid (0 on invalid anchors), / (4 +
  eps) / the sum of those weights.

The teacher's statistics come either from its own features on the batch (an online teacher,
as the reference) or, offline, from per-image sums and squared sums stored in the cache,
combined exactly for any batch (:func:`combine_moments`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .bckd import AVG_EPS

STD_EPS = 1e-6  # the reference's align_scale: (x - mean) / (std + 1e-6)


def image_moments(feat: torch.Tensor) -> torch.Tensor:
    """``[B, 2, C]`` float64 per-image (sum, sum of squares) over the positions of ``feat``
    ``[B, C, h, w]``."""
    x = feat.detach().double().flatten(2)
    return torch.stack([x.sum(dim=2), (x * x).sum(dim=2)], dim=1)


def combine_moments(moments: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``[2, C]`` (mean, unbiased std) of a batch from per-image moments ``[B, 2, C]`` (sum,
    sum of squares) over ``counts`` ``[B]`` positions each - what ``Tensor.std`` over the
    batch's positions gives (float64 sums; float32 result)."""
    n = counts.double().sum()
    total = moments.double().sum(dim=0)
    mean = total[0] / n
    var = (total[1] - n * mean * mean) / (n - 1).clamp(min=1)
    return torch.stack([mean, var.clamp(min=0).sqrt()]).float()


def batch_stats(feat: torch.Tensor) -> torch.Tensor:
    """``[2, C]`` (mean, unbiased std) per channel of ``feat`` ``[B, C, h, w]`` over (B, h, w),
    as the reference computes the teacher's (``Tensor.mean`` / ``Tensor.std``)."""
    x = feat.detach().transpose(0, 1).reshape(feat.shape[1], -1)
    return torch.stack([x.mean(dim=1), x.std(dim=1)]).float()


def align_scale(student: torch.Tensor, teacher_stats: torch.Tensor) -> torch.Tensor:
    """The student's features ``[B, C, h, w]`` normalised per channel over (B, h, w) and
    rescaled to the teacher's (mean, std) ``[2, C]``."""
    b, c, h, w = student.shape
    x = student.transpose(0, 1).reshape(c, -1)
    x = (x - x.mean(dim=1, keepdim=True)) / (x.std(dim=1, keepdim=True) + STD_EPS)
    x = x * teacher_stats[1][:, None] + teacher_stats[0][:, None]
    return x.reshape(c, b, h, w).transpose(0, 1)


def cross_head(part, held: tuple[list[torch.Tensor], list[torch.Tensor]],
               stats: torch.Tensor, align=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher head part's predictions on the student's held features.

    ``held``: per level the student's cls and reg tower inputs ``[B, Cs, h, w]``; ``stats``
    ``[L, 2 (cls, reg), 2 (mean, std), C]`` the teacher's; ``align``: optional (cls, reg) 1x1
    convs mapping Cs to the teacher's C.  Returns class logits ``[B, N, num_classes]`` and
    edge logits ``[B, N, 4, reg_max + 1]`` in the detector's flat anchor order."""
    cls_out, reg_out = [], []
    for level, (c, r) in enumerate(zip(*held)):
        if align is not None:
            c, r = align[0](c), align[1](r)
        c = align_scale(c, stats[level, 0])
        r = align_scale(r, stats[level, 1])
        if part.idx:
            c, r = F.relu(c), F.relu(r)
        pc, pr = part(c, r, level)
        cls_out.append(pc.permute(0, 2, 3, 1).reshape(pc.shape[0], -1, pc.shape[1]))
        reg_out.append(pr.permute(0, 2, 3, 1).reshape(pr.shape[0], -1, pr.shape[1]))
    cls, reg = torch.cat(cls_out, 1).float(), torch.cat(reg_out, 1).float()
    return cls, reg.reshape(reg.shape[0], reg.shape[1], 4, -1)


def crosskd_reg_loss(student_corners: torch.Tensor, teacher_corners: torch.Tensor,
                     teacher_cls: torch.Tensor, label_weight: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """KL of the cross-head edge distributions ``[V, 4, bins]`` against the teacher's (logits
    or log-probabilities), each anchor weighted by ``sigmoid(max_c teacher_cls)`` ``[V, C]``
    (0 where ``label_weight`` ``[V]`` is 0): ``sum(kl * w) / (4 + eps) / sum(w)``."""
    if student_corners.numel() == 0:
        return student_corners.sum() * 0
    bins = student_corners.shape[-1]
    log_q = F.log_softmax(student_corners.reshape(-1, bins).float() / T, dim=1)
    log_p = F.log_softmax(teacher_corners.detach().reshape(-1, bins).float() / T, dim=1)
    kl = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=1) * (T * T)
    w = teacher_cls.detach().float().max(dim=1).values.sigmoid() * (label_weight > 0)
    total = (kl * w[:, None].expand(-1, 4).reshape(-1)).sum() / (4.0 + AVG_EPS)
    return total / w.sum().clamp(min=AVG_EPS)
