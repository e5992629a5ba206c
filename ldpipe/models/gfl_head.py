"""GFL head (Li et al., Generalized Focal Loss, NeurIPS 2020) with mmdetection's names.

Shared across levels: ``stacked_convs`` 3x3 conv + GroupNorm + ReLU towers for
classification (``cls_convs``) and regression (``reg_convs``), then ``gfl_cls``
(class logits, sigmoid) and ``gfl_reg`` (4 x (reg_max+1) edge-distribution
logits).  Each level has a learnable ``Scale`` on the regression output.
``integral.project`` holds ``0..reg_max``; the expected bin of each edge
distribution, times the stride, is the edge distance.

Training losses are computed over the whole batch at once, on anchors flattened
level by level (this equals mmdetection's per-level loops, whose sums share the
same normalisers):

* QFL summed over all valid anchors / ``max(mean_over_ranks(sum_img max(n_pos,1)), 1)``
* GIoU or CIoU (``loss.box_loss``, x2) and DFL (x0.25, per edge, / 4) on positives weighted
  by the student's detached max class score, each / ``mean_over_ranks(sum of those weights
  + 1e-6)`` as the LD reference's heads (``loss.box_norm = "sum"``), or / ``max(.., 1)``
  as later mmdetection GFLHeads (``"clamp"``)
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from mmcv.cnn import ConvModule, Scale
from torch import nn

from ..config import LossConfig, TestConfig
from .boxes import aligned_iou, anchor_centers, bbox2distance, distance2bbox
from .losses import BOX_LOSS, distribution_focal_loss, quality_focal_loss
from .nms import suppress
from .targets import BatchTargets, PositiveSet

if TYPE_CHECKING:
    from .detector import DenseOutput


class Integral(nn.Module):
    """Expected value of each edge distribution (in bins)."""

    def __init__(self, reg_max: int = 16) -> None:
        super().__init__()
        self.reg_max = reg_max
        self.register_buffer("project", torch.linspace(0, reg_max, reg_max + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prob = F.softmax(x.reshape(-1, self.reg_max + 1).float(), dim=1)
        return (prob @ self.project.float()).reshape(-1, 4)


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that also normalises a group holding a single value.

    With fewer channels than 32 a group can be one channel (a CPU-sized head of 16 channels
    has 16 groups); on a 1x1 level (P7 of an image up to 128 px) with one image that group
    has one value, which ``F.group_norm`` refuses ("Expected more than 1 value per
    channel").  The formula is defined there: (x - mean) is 0, so the output is the bias.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] * (x.shape[1] // self.num_groups) * x[0, 0].numel() == 1:
            out = x * 0  # keeps the graph (and dtype/device) of x
            return out + self.bias.view(1, -1, *([1] * (x.dim() - 2))) if self.affine else out
        return super().forward(x)


def _conv_gn(cin: int, cout: int, groups: int) -> ConvModule:
    """mmcv's conv + GN + ReLU brick (its parameter names: ``conv``, ``gn``) with the
    :class:`GroupNorm` above in place of torch's."""
    m = ConvModule(cin, cout, 3, padding=1, norm_cfg=dict(type="GN", num_groups=groups, requires_grad=True))
    setattr(m, m.norm_name, GroupNorm(groups, cout))
    return m


class GFLHead(nn.Module):
    # what the ``gfl_cls`` logits are: their sigmoid is the joint class-IoU score (QFL's target)
    cls_logits = "joint"

    def __init__(self, num_classes: int, in_channels: int = 256, feat_channels: int = 256,
                 stacked_convs: int = 4, reg_max: int = 16, num_levels: int = 5,
                 norm_groups: int = 32, prior_prob: float = 0.01, align_channels: int = 0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.reg_max = reg_max
        groups = math.gcd(norm_groups, feat_channels)  # GroupNorm needs a divisor
        self.cls_convs = nn.ModuleList()
        self.reg_convs = nn.ModuleList()
        for i in range(stacked_convs):
            c = in_channels if i == 0 else feat_channels
            self.cls_convs.append(_conv_gn(c, feat_channels, groups))
            self.reg_convs.append(_conv_gn(c, feat_channels, groups))
        last = feat_channels if stacked_convs else in_channels
        self.gfl_cls = nn.Conv2d(last, num_classes, 3, padding=1)
        self.gfl_reg = nn.Conv2d(last, 4 * (reg_max + 1), 3, padding=1)
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(num_levels))
        self.integral = Integral(reg_max)
        if align_channels:  # CrossKD with a wider teacher (head.align_channels): 1x1 maps
            self.align_cls = nn.Conv2d(feat_channels, align_channels, 1)
            self.align_reg = nn.Conv2d(feat_channels, align_channels, 1)
        for m in list(self.cls_convs.modules()) + list(self.reg_convs.modules()):
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
        nn.init.normal_(self.gfl_cls.weight, std=0.01)
        nn.init.constant_(self.gfl_cls.bias, -float(torch.log(torch.tensor((1 - prior_prob) / prior_prob))))
        nn.init.normal_(self.gfl_reg.weight, std=0.01)
        nn.init.zeros_(self.gfl_reg.bias)

    def forward(self, feats: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        cls_scores, bbox_preds = [], []
        for x, scale in zip(feats, self.scales):
            c, r = x, x
            for conv in self.cls_convs:
                c = conv(c)
            for conv in self.reg_convs:
                r = conv(r)
            cls_scores.append(self.gfl_cls(c))
            bbox_preds.append(scale(self.gfl_reg(r)).float())
        return cls_scores, bbox_preds

    def forward_held(self, feats: list[torch.Tensor], idx: int):
        """:meth:`forward` that also returns, per level, the towers' input to conv ``idx``
        (``[B, feat_channels, h, w]``; idx 0: the FPN feature) - CrossKD's held features.

        CrossKD's reference keeps "the output of conv idx - 1 before its activation", but
        mmcv's ConvModule applies its ReLU in place, so the tensor it keeps is the activated
        one: this input, which is what its published numbers used."""
        cls_scores, bbox_preds, held_cls, held_reg = [], [], [], []
        for x, scale in zip(feats, self.scales):
            c, r = x, x
            for i, conv in enumerate(self.cls_convs):
                if i == idx:
                    held_cls.append(c)
                c = conv(c)
            for i, conv in enumerate(self.reg_convs):
                if i == idx:
                    held_reg.append(r)
                r = conv(r)
            cls_scores.append(self.gfl_cls(c))
            bbox_preds.append(scale(self.gfl_reg(r)).float())
        return cls_scores, bbox_preds, held_cls, held_reg

    @property
    def reg_bins(self) -> int:
        """Bins of one edge distribution (``reg_max + 1``)."""
        return self.reg_max + 1

    # ------------------------------------------------------------------ losses
    def loss(self, out: DenseOutput, targets: BatchTargets, cfg: LossConfig,
             reduce=None) -> tuple[dict[str, torch.Tensor], PositiveSet]:
        """GFL losses of a batch, on its batch-flat anchors.

        Args:
            out: the model's :class:`~ldpipe.models.detector.DenseOutput`.
            targets: the batch's :class:`~ldpipe.models.targets.BatchTargets` (same layout).
            reduce: callable averaging a scalar tensor over DDP ranks (or None).

        Returns:
            ``(losses, positives)``: ``loss_cls``, ``loss_bbox``, ``loss_dfl`` and the
            :class:`~ldpipe.models.targets.PositiveSet` they used (what LD reuses).
        """
        reduce = reduce or (lambda t: t)
        cls_flat = out.flat_cls()
        # GFocalV2 (a DGQP quality in ``out``): QFL and the weights read the joint score
        # sigmoid(cls) x quality as probabilities; GFL: the class logits
        activated = out.quality is not None
        qfl_in = out.flat_scores() if activated else cls_flat
        reg_flat = out.flat_reg()
        device = cls_flat.device
        labels, anchors, strides = targets.labels, targets.anchors, targets.strides
        num_pos_images = targets.num_pos_images
        pos = torch.nonzero((labels >= 0) & (labels < self.num_classes)).squeeze(1)
        score = cls_flat.new_zeros(labels.shape[0])
        num_total = max(float(reduce(torch.tensor(float(num_pos_images), device=device))), 1.0)
        if pos.numel():
            s = strides[pos][:, None]
            centers = anchor_centers(anchors[pos]) / s
            pos_reg = reg_flat[pos]
            pred_box = distance2bbox(centers, self.integral(pos_reg))
            target_box = targets.bbox_targets[pos] / s
            weight = (qfl_in.detach() if activated else cls_flat.detach().sigmoid()).max(dim=1).values[pos]
            score[pos] = aligned_iou(pred_box.detach(), target_box)
            corners = pos_reg.reshape(-1, self.reg_bins)
            target_corners = bbox2distance(centers, target_box, self.reg_max).reshape(-1)
            loss_bbox = (BOX_LOSS[cfg.box_loss](pred_box, target_box) * weight).sum()
            loss_dfl = (distribution_focal_loss(corners, target_corners)
                        * weight[:, None].expand(-1, 4).reshape(-1)).sum() / 4.0
            avg = float(reduce(weight.sum().detach() + (1e-6 if cfg.box_norm == "sum" else 0.0)))
            if cfg.box_norm == "clamp":
                avg = max(avg, 1.0)
            loss_bbox = cfg.box_weight * loss_bbox / avg
            loss_dfl = cfg.dfl_weight * loss_dfl / avg
        else:
            weight = reg_flat.new_zeros(0)
            loss_bbox = reg_flat.sum() * 0
            loss_dfl = reg_flat.sum() * 0
            reduce(torch.zeros((), device=device))  # keep collective calls in step
        qfl = quality_focal_loss(qfl_in, labels, score, cfg.qfl_beta, activated=activated)
        loss_cls = cfg.qfl_weight * (qfl * targets.label_weights).sum() / num_total
        losses = {"loss_cls": loss_cls, "loss_bbox": loss_bbox, "loss_dfl": loss_dfl}
        return losses, PositiveSet(pos, weight)

    # --------------------------------------------------------------- inference
    @torch.no_grad()
    def predict(self, out: DenseOutput, anchors_per_level: list[torch.Tensor], strides: list[int],
                img_shapes: list[tuple[int, int]], cfg: TestConfig) -> list[dict]:
        """Boxes in input coordinates per image: ``{'boxes','scores','labels'}``
        (``img_shapes``: each image's ``(h, w)`` before padding, which the boxes are clipped to).

        As mmdetection's GFL test path: per level keep the ``nms_pre`` anchors
        of highest max score, decode, clip to the image, then class-wise NMS
        (``cfg.nms``: IoU NMS or Score-voting Cluster-DIoU-NMS, :mod:`.nms`)
        over scores above ``score_thr`` and keep ``max_per_img``.  The score is
        :meth:`DenseOutput.scores` (GFocalV2: the joint score with the DGQP quality).
        """
        results = []
        levels = out.level_slices()
        joint = out.scores()  # sigmoid(cls), times the DGQP quality for GFocalV2
        for b, (h_img, w_img) in enumerate(img_shapes):
            boxes_all, scores_all = [], []
            for sl, anchors, s in zip(levels, anchors_per_level, strides):
                scores = joint[b, sl]
                reg = out.reg[b, sl]
                if 0 < cfg.nms_pre < scores.shape[0]:
                    keep = scores.max(dim=1).values.topk(cfg.nms_pre).indices
                    scores, reg, anchors = scores[keep], reg[keep], anchors[keep]
                dist = self.integral(reg) * s
                boxes_all.append(distance2bbox(anchor_centers(anchors), dist, (h_img, w_img)))
                scores_all.append(scores)
            boxes = torch.cat(boxes_all)
            scores = torch.cat(scores_all)
            idx, cls = torch.nonzero(scores > cfg.score_thr, as_tuple=True)
            boxes, sc = boxes[idx], scores[idx, cls]
            results.append(suppress(boxes, sc, cls, cfg))
        return results
