"""Criteria: everything a training step minimises, given the model's outputs and targets.

As DETR's ``SetCriterion``: the loop forwards the batch and hands the output to a criterion,
which returns named loss terms (summed by the loop in the order given).

* :class:`GFLCriterion` - GFL's own losses (QFL, GIoU/CIoU, DFL): plain training.
* :class:`DistillCriterion` - GFL's losses plus LD on the main region, VLR LD and class KD,
  read from a teacher :class:`~ldpipe.distill.sources.TargetSource` (cached or online).

A new distillation method is one more criterion (or term) here; the loop does not change.
"""
from __future__ import annotations

import torch

from ..config import DistillConfig, LossConfig
from ..models import GFL, BatchTargets, DenseOutput, PositiveSet
from ..models.device_ops import mean_over_ranks
from .bckd import bckd_anchors, bckd_box_loss, bckd_cls_loss, expected_distances
from .losses import cls_kd_loss, ld_loss, vlr_loss
from .sources import TargetSource

Losses = dict[str, torch.Tensor]


def _per_image(terms: Losses, images: int) -> Losses:
    return {k: (v / images if k in ("loss_ld", "loss_ld_vlr") else v) for k, v in terms.items()}


# distill.ld_norm -> how LD and VLR reduce over the ``images`` of a process's batch: the
# reference's sum (its README keeps <= 3 images per GPU because the sum grows with them), or
# that sum per image (class KD is a per-level mean over positives either way)
LD_NORM = {"sum": lambda terms, images: terms, "image": _per_image}


class Criterion:
    """The contract: ``criterion(model, batch, out, bt) -> {name: scalar tensor}``."""

    # whether the loader must compute the per-image VLR weights (``bt.vlr``)
    with_vlr: bool = False

    def __call__(self, model: GFL, batch: dict, out: DenseOutput, bt: BatchTargets) -> Losses:
        raise NotImplementedError


class GFLCriterion(Criterion):
    """GFL's losses (``loss_cls``, ``loss_bbox``, ``loss_dfl``), means over DDP ranks as
    mmdetection's; ``loss`` defaults to the model's own ``[models.NAME.loss]``."""

    def __init__(self, loss: LossConfig | None = None) -> None:
        self.loss = loss

    def gfl(self, model: GFL, out: DenseOutput, bt: BatchTargets) -> tuple[Losses, PositiveSet]:
        """The GFL terms and the positives they weighted."""
        return model.bbox_head.loss(out, bt, self.loss or model.cfg.loss, reduce=mean_over_ranks)

    def __call__(self, model: GFL, batch: dict, out: DenseOutput, bt: BatchTargets) -> Losses:
        return self.gfl(model, out, bt)[0]


class DistillCriterion(GFLCriterion):
    """GFL's losses + the enabled LD terms against ``teacher`` (LD paper / reference names):

    * ``loss_ld`` - LD on the ATSS positives, weighted by the student's detached max score;
    * ``loss_kd`` - class KD on the positives, per level over its positives;
    * ``loss_ld_vlr`` - LD on the valuable localization region, weighted by its IoU;
    * ``loss_bckd_cls`` / ``loss_bckd_box`` - BCKD's binary classification and IoU-based box
      distillation on every valid anchor (:mod:`ldpipe.distill.bckd`), / the positives;

    LD and VLR summed over the batch (the reference's ``distill.ld_norm = "sum"``) or per image
    (``"image"``: divided by the batch's images, so a term does not grow with images per GPU).

    ``terms``: the enabled subset of ``config.DISTILL_TERMS`` (``config.enabled_terms``).
    """

    def __init__(self, cfg: DistillConfig, terms: set[str], teacher: TargetSource,
                 loss: LossConfig | None = None) -> None:
        super().__init__(loss)
        self.cfg, self.terms, self.teacher = cfg, set(terms), teacher
        self.with_vlr = "vlr" in self.terms

    def __call__(self, model: GFL, batch: dict, out: DenseOutput, bt: BatchTargets) -> Losses:
        losses, pos = self.gfl(model, out, bt)
        losses.update(self.distill_terms(batch, out, bt, pos))
        return losses

    def distill_terms(self, batch: dict, out: DenseOutput, bt: BatchTargets,
                      pos: PositiveSet) -> Losses:
        """The LD / class-KD / VLR terms alone (``pos``: the GFL losses' positives)."""
        cfg, terms = self.cfg, {}
        cls_flat, reg_flat, rb = out.flat_cls(), out.flat_reg(), out.reg_bins
        teacher = self.teacher.prepare(batch, bt, reg_flat.device)
        if "ld" in self.terms or "kd" in self.terms:
            t = teacher.at(pos.index)
            if "ld" in self.terms:
                terms["loss_ld"] = cfg.ld_weight * ld_loss(
                    reg_flat[pos.index].reshape(-1, rb), t.box.reshape(-1, rb), pos.weight, cfg.ld_T)
            if "kd" in self.terms:
                terms["loss_kd"] = cfg.kd_weight * cls_kd_loss(
                    cls_flat[pos.index], t.cls, bt.label_weights[pos.index], bt.strides[pos.index],
                    cfg.kd_T)
        if "vlr" in self.terms:
            vidx = torch.nonzero(bt.vlr > 0).squeeze(1)
            t = teacher.at(vidx, need_cls=False)
            terms["loss_ld_vlr"] = cfg.vlr_weight * vlr_loss(
                reg_flat[vidx].reshape(-1, rb), t.box.reshape(-1, rb), bt.vlr[vidx], cfg.vlr_T)
        if "bckd_cls" in self.terms or "bckd_box" in self.terms:
            terms.update(self.bckd_terms(cls_flat, reg_flat, bt, pos, teacher))
        return LD_NORM[cfg.ld_norm](terms, out.cls.shape[0])

    def bckd_terms(self, cls_flat: torch.Tensor, reg_flat: torch.Tensor, bt: BatchTargets,
                   pos: PositiveSet, teacher) -> Losses:
        """BCKD's terms on every valid anchor of the levels holding a positive."""
        cfg, terms = self.cfg, {}
        device = cls_flat.device
        num_total = max(float(mean_over_ranks(torch.tensor(float(bt.num_pos_images), device=device))), 1.0)
        idx = bckd_anchors(bt.label_weights, bt.strides, pos.index)
        t = teacher.at(idx)
        w = bt.label_weights[idx]
        if "bckd_cls" in self.terms:
            terms["loss_bckd_cls"] = cfg.bckd_cls_weight * bckd_cls_loss(
                cls_flat[idx], t.cls, w, num_total, cfg.bckd_beta)
        if "bckd_box" in self.terms:
            terms["loss_bckd_box"] = cfg.bckd_box_weight * bckd_box_loss(
                cls_flat[idx], t.cls, reg_flat[idx], expected_distances(t.box), bt.anchors[idx],
                bt.strides[idx], w, num_total)
        return terms
