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
from .crosskd import cross_head, crosskd_reg_loss
from .losses import cls_kd_loss, ld_loss, vlr_loss
from .sources import TargetSource

Losses = dict[str, torch.Tensor]


def _per_image(terms: Losses, images: int) -> Losses:
    return {k: (v / images if k in ("loss_ld", "loss_ld_vlr") else v) for k, v in terms.items()}


# distill.ld_norm -> how LD and VLR reduce over the ``images`` of a process's batch: the
# reference's sum (its README keeps <= 3 images per GPU because the sum grows with them), or
# that sum per image (class KD is a per-level mean over positives either way)
LD_NORM = {"sum": lambda terms, images: terms, "image": _per_image}


def served(teacher, bt: BatchTargets, idx: torch.Tensor) -> torch.Tensor:
    """``[k]`` bool: which batch-flat anchors ``idx`` lie on a level the teacher has targets at
    (all but the student's top k levels for a teacher at 2^k x its input: the distillation terms
    leave the others out; their normalisers stay the reference's, docs/cache-format.md section 11)."""
    if teacher.strides is None:
        return torch.ones_like(idx, dtype=torch.bool)
    return torch.isin(bt.strides[idx], torch.tensor(teacher.strides, dtype=bt.strides.dtype,
                                                     device=idx.device))


class Criterion:
    """The contract: ``criterion(model, batch, out, bt) -> {name: scalar tensor}``."""

    # whether the loader must compute the per-image VLR weights (``bt.vlr``)
    with_vlr: bool = False
    # CrossKD: the head conv whose input the model's forward must hold (``DenseOutput.held``)
    hold: int | None = None

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
    * ``loss_crosskd_cls`` / ``loss_crosskd_reg`` - CrossKD: the teacher head part's
      predictions on the student's held features against the teacher's own, every valid
      anchor (:mod:`ldpipe.distill.crosskd`);

    LD and VLR summed over the batch (the reference's ``distill.ld_norm = "sum"``) or per image
    (``"image"``: divided by the batch's images, so a term does not grow with images per GPU).

    ``terms``: the enabled subset of ``config.DISTILL_TERMS`` (``config.enabled_terms``).
    """

    def __init__(self, cfg: DistillConfig, terms: set[str], teacher: TargetSource,
                 loss: LossConfig | None = None) -> None:
        super().__init__(loss)
        self.cfg, self.terms, self.teacher = cfg, set(terms), teacher
        self.with_vlr = "vlr" in self.terms
        if self.terms & {"crosskd_cls", "crosskd_reg"}:
            self.hold = teacher.reuse_idx

    def __call__(self, model: GFL, batch: dict, out: DenseOutput, bt: BatchTargets) -> Losses:
        losses, pos = self.gfl(model, out, bt)
        losses.update(self.distill_terms(batch, out, bt, pos, model))
        return losses

    def distill_terms(self, batch: dict, out: DenseOutput, bt: BatchTargets,
                      pos: PositiveSet, model: GFL | None = None) -> Losses:
        """The distillation terms alone (``pos``: the GFL losses' positives; ``model``: the
        student, whose head's 1x1 align maps CrossKD uses when it has them)."""
        cfg, terms = self.cfg, {}
        cls_flat, reg_flat, rb = out.flat_cls(), out.flat_reg(), out.reg_bins
        teacher = self.teacher.prepare(batch, bt, reg_flat.device)
        if "ld" in self.terms or "kd" in self.terms:
            keep = served(teacher, bt, pos.index)
            index, weight = pos.index[keep], pos.weight[keep]
            t = teacher.at(index)
            if "ld" in self.terms:
                terms["loss_ld"] = cfg.ld_weight * ld_loss(
                    reg_flat[index].reshape(-1, rb), t.box.reshape(-1, rb), weight, cfg.ld_T)
            if "kd" in self.terms:
                terms["loss_kd"] = cfg.kd_weight * cls_kd_loss(
                    cls_flat[index], t.cls, bt.label_weights[index], bt.strides[index], cfg.kd_T)
        if "vlr" in self.terms:
            vidx = torch.nonzero(bt.vlr > 0).squeeze(1)
            vidx = vidx[served(teacher, bt, vidx)]
            t = teacher.at(vidx, need_cls=False)
            terms["loss_ld_vlr"] = cfg.vlr_weight * vlr_loss(
                reg_flat[vidx].reshape(-1, rb), t.box.reshape(-1, rb), bt.vlr[vidx], cfg.vlr_T)
        if "bckd_cls" in self.terms or "bckd_box" in self.terms:
            terms.update(self.bckd_terms(cls_flat, reg_flat, bt, pos, teacher))
        if "crosskd_cls" in self.terms or "crosskd_reg" in self.terms:
            terms.update(self.crosskd_terms(model, out, bt, teacher))
        return LD_NORM[cfg.ld_norm](terms, out.cls.shape[0])

    @staticmethod
    def _num_total(bt: BatchTargets, device) -> float:
        """The GFL classification normaliser: mean over ranks of sum_img max(n_pos, 1), >= 1."""
        return max(float(mean_over_ranks(torch.tensor(float(bt.num_pos_images), device=device))), 1.0)

    def crosskd_terms(self, model: GFL, out: DenseOutput, bt: BatchTargets, teacher) -> Losses:
        """CrossKD's terms: the teacher's head part on the student's held features."""
        cfg, terms = self.cfg, {}
        device = out.cls.device
        head = model.bbox_head if model is not None else None
        align = (head.align_cls, head.align_reg) if hasattr(head, "align_cls") else None
        cls, reg = cross_head(self.teacher.head_part(device), out.held, teacher.head_stats, align)
        idx = torch.nonzero(bt.label_weights > 0).squeeze(1)
        t = teacher.at(idx)
        w = bt.label_weights[idx]
        if "crosskd_cls" in self.terms:  # KD quality focal loss: BCKD's classification formula
            terms["loss_crosskd_cls"] = cfg.crosskd_cls_weight * bckd_cls_loss(
                cls.reshape(-1, cls.shape[-1])[idx], t.cls, w, self._num_total(bt, device), cfg.crosskd_beta)
        if "crosskd_reg" in self.terms:
            terms["loss_crosskd_reg"] = cfg.crosskd_reg_weight * crosskd_reg_loss(
                reg.reshape(-1, 4, reg.shape[-1])[idx], t.box, t.cls, w, cfg.crosskd_T)
        return terms

    def bckd_terms(self, cls_flat: torch.Tensor, reg_flat: torch.Tensor, bt: BatchTargets,
                   pos: PositiveSet, teacher) -> Losses:
        """BCKD's terms on every valid anchor of the levels holding a positive."""
        cfg, terms = self.cfg, {}
        device = cls_flat.device
        num_total = self._num_total(bt, device)
        idx = bckd_anchors(bt.label_weights, bt.strides, pos.index)
        idx = idx[served(teacher, bt, idx)]  # the normaliser stays every positive's (num_total)
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
