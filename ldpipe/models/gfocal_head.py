"""GFocalV2 head (Li et al., Generalized Focal Loss V2, CVPR 2021) with the reference's names.

A :class:`~ldpipe.models.gfl_head.GFLHead` plus the distribution-guided quality predictor
(DGQP), parameter names as the reference's ``GFocalHead`` (mmdetection 2.x /
HikariTJU/LD ``mmdet/models/dense_heads/gfocal_head.py``), so its checkpoints load with
``strict=True``:

* per level, the ``4 x (reg_max+1)`` regression logits (after the level's ``Scale``) are
  softmaxed per edge; the ``reg_topk`` largest probabilities of each edge, in descending
  order, and (``add_mean``) their mean form ``4 x (reg_topk + add_mean)`` statistics, edge
  after edge (:func:`dgqp_statistics`);
* ``reg_conf`` = ``Sequential(Conv2d(4 (reg_topk + add_mean), reg_channels, 1), ReLU,
  Conv2d(reg_channels, 1, 1), Sigmoid)`` (indices 0 and 2 hold the weights; the reference
  uses 1x1 convolutions, so the weights are ``[reg_channels, 4 (k + m), 1, 1]`` and
  ``[1, reg_channels, 1, 1]``) maps them to a quality in (0, 1);
* the joint score is ``sigmoid(gfl_cls) x quality``: QFL is applied to it as probabilities
  (the reference's ``QualityFocalLoss(use_sigmoid=False)``), the box and DFL weights are its
  detached max over classes, and the test path ranks and thresholds it.

The statistics are not detached: QFL's gradient reaches the edge distributions through the
DGQP, as in the reference.  The model output keeps ``cls`` = the ``gfl_cls`` logits and adds
``quality`` (see :class:`~ldpipe.models.detector.DenseOutput`).  Initialisation as the
reference: the two ``reg_conf`` convs ``normal(0, 0.01)``, bias 0; the rest as GFL.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .gfl_head import GFLHead


def dgqp_statistics(bbox_pred: torch.Tensor, reg_topk: int, add_mean: bool) -> torch.Tensor:
    """DGQP input ``[N, 4 (reg_topk + add_mean), H, W]`` from regression logits ``[N, 4 B, H, W]``.

    Per edge: the ``reg_topk`` largest softmax probabilities (descending), then their mean.
    """
    n, c, h, w = bbox_pred.shape
    prob = F.softmax(bbox_pred.float().reshape(n, 4, c // 4, h, w), dim=2)
    top = prob.topk(reg_topk, dim=2).values
    stat = torch.cat([top, top.mean(dim=2, keepdim=True)], dim=2) if add_mean else top
    return stat.reshape(n, -1, h, w)


class GFocalHead(GFLHead):
    # the ``gfl_cls`` logits' sigmoid is the classification score only; the joint score is
    # it times the DGQP quality (GFLHead: the logits' sigmoid is the joint score itself)
    cls_logits = "class"

    def forward_held(self, feats, idx):
        raise NotImplementedError("CrossKD's held features are implemented for GFLHead only")

    def __init__(self, num_classes: int, in_channels: int = 256, feat_channels: int = 256,
                 stacked_convs: int = 4, reg_max: int = 16, num_levels: int = 5,
                 norm_groups: int = 32, prior_prob: float = 0.01, reg_topk: int = 4,
                 reg_channels: int = 64, add_mean: bool = True) -> None:
        super().__init__(num_classes, in_channels, feat_channels, stacked_convs, reg_max,
                         num_levels, norm_groups, prior_prob)
        self.reg_topk, self.reg_channels, self.add_mean = reg_topk, reg_channels, add_mean
        self.total_dim = reg_topk + int(add_mean)
        self.reg_conf = nn.Sequential(nn.Conv2d(4 * self.total_dim, reg_channels, 1),
                                      nn.ReLU(inplace=True),
                                      nn.Conv2d(reg_channels, 1, 1), nn.Sigmoid())
        for m in self.reg_conf:
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def forward(self, feats: list[torch.Tensor]
                ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Per level: class logits, edge-distribution logits and the DGQP quality ``[N, 1, H, W]``."""
        cls_scores, bbox_preds = super().forward(feats)
        qualities = [self.reg_conf(dgqp_statistics(r, self.reg_topk, self.add_mean)) for r in bbox_preds]
        return cls_scores, bbox_preds, qualities
