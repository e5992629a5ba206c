"""The dense raw-logit cache's fp16 codec keeps every BCKD and CrossKD term within 1% of fp32,
for a trained teacher and for the same teacher sharpened x3 and x5 (its logits times k), with a
student far from the teacher and one that has nearly learned it (as the int8 codec's test)."""
from __future__ import annotations

import torch

from ldpipe.cache import codec as C
from ldpipe.data import DetectionDataset, load_split, train_variants
from ldpipe.distill.bckd import bckd_box_loss, bckd_cls_loss, expected_distances
from ldpipe.distill.crosskd import crosskd_reg_loss
from ldpipe.engine.step import TrainCollate
from ldpipe.models import batch_targets, load_detector


def _teacher_outputs(pipe, ckpt):
    split = load_split(pipe.data, "train")
    ds = DetectionDataset(split, pipe.data, train_variants(pipe.data))
    cfg = pipe.model("teacher")
    batch = TrainCollate(cfg, len(split.classes), with_vlr=False)([ds[(i, 0)] for i in range(2)])
    model, _ = load_detector(cfg, len(split.classes), ckpt, torch.device("cpu"))
    with torch.no_grad():
        out = model(batch["img"])
    bt = batch_targets(batch["targets"], out.level_sizes, cfg.strides, cfg.anchor_scale,
                       model.num_classes, torch.device("cpu"))
    keep = bt.label_weights > 0
    return out.flat_cls()[keep], out.flat_reg()[keep], bt.anchors[keep], bt.strides[keep]


def _terms(t_cls, t_box, s_cls, s_reg, anchors, strides):
    w = torch.ones(t_cls.shape[0])
    return {"bckd_cls / crosskd_cls": float(bckd_cls_loss(s_cls, t_cls, w, 5.0)),
            "bckd_box": float(bckd_box_loss(s_cls, t_cls, s_reg, expected_distances(t_box), anchors,
                                            strides, w, 5.0)),
            "crosskd_reg": float(crosskd_reg_loss(s_reg, t_box, t_cls, w, 1.0))}


def test_fp16_keeps_the_dense_terms_within_one_percent(make_tiny_pipe, trained_tiny_teacher):
    cls, reg, anchors, strides = _teacher_outputs(make_tiny_pipe(), trained_tiny_teacher)
    gen = torch.Generator().manual_seed(0)
    fp16 = C.codec_for("fp16")
    worst = 0.0
    for k in (1.0, 3.0, 5.0):
        t_cls = cls.double() * k  # what the dump stores: raw class logits, box log-probabilities
        t_box = torch.log_softmax(reg.double() * k, dim=-1).float()
        t_cls = t_cls.float()
        q_cls = fp16.decode(*_enc(fp16, t_cls))
        q_box = fp16.decode(*_enc(fp16, t_box))
        assert float((q_box - t_box).abs().max()) > 0  # fp16 does round them
        for s_cls, s_reg in ((torch.randn(t_cls.shape, generator=gen) * 3, torch.randn(t_box.shape, generator=gen) * 3),
                             (t_cls + 0.3 * torch.randn(t_cls.shape, generator=gen),
                              t_box + 0.3 * torch.randn(t_box.shape, generator=gen))):
            ref = _terms(t_cls, t_box, s_cls, s_reg, anchors, strides)
            got = _terms(q_cls, q_box, s_cls, s_reg, anchors, strides)
            for name in ref:
                assert ref[name] > 0, (name, k)
                err = abs(got[name] - ref[name]) / ref[name]
                worst = max(worst, err)
                assert err <= 0.01, (name, k, ref[name], got[name])
    assert worst > 0  # the comparison saw the rounding


def _enc(coder, x):
    e = coder.encode(x)
    return e.values, e.scale
