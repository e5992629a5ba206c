"""CrossKD's formulas (ldpipe.distill.crosskd) against independent float64 ports of the authors'
per-level code (jbwang1997/CrossKD ``CrossKDGFL``: ``align_scale``, ``reuse_teacher_head``,
``pred_mimicking_loss_single``, ``kd_quality_focal_loss``, ``knowledge_distillation_kl_div_loss``),
the exact combination of per-image moments, and the head part."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ldpipe.distill.bckd import bckd_cls_loss
from ldpipe.distill.crosskd import (align_scale, batch_stats, combine_moments, cross_head,
                                    crosskd_reg_loss, image_moments)
from ldpipe.models.gfl_head import GFLHead
from ldpipe.models.head_part import HeadPart

EPS = float(torch.finfo(torch.float32).eps)


def _feats(seed: int, b: int = 3, c: int = 8, sizes=((6, 5), (3, 3), (2, 2))):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, c, h, w, generator=g) * 2 + 0.5 for h, w in sizes]


def test_per_image_moments_combine_to_the_batch_mean_and_unbiased_std():
    for x in _feats(0):
        counts = torch.full((x.shape[0],), float(x.shape[2] * x.shape[3]))
        got = combine_moments(image_moments(x), counts)
        flat = x.double().transpose(0, 1).reshape(x.shape[1], -1)  # the reference's permute+reshape
        assert torch.allclose(got[0].double(), flat.mean(1), atol=1e-6)
        assert torch.allclose(got[1].double(), flat.std(1), atol=1e-6)
        assert torch.allclose(got, batch_stats(x), atol=1e-5)
    # any split of the batch into images gives the same statistics: moments add
    x = _feats(1)[0]
    whole = combine_moments(image_moments(x), torch.full((3,), 30.0))
    parts = combine_moments(torch.cat([image_moments(x[:1]), image_moments(x[1:])]), torch.full((3,), 30.0))
    assert torch.allclose(whole, parts, atol=1e-6)


def _align_reference(stu: torch.Tensor, tea: torch.Tensor) -> torch.Tensor:
    """The reference's ``align_scale``, one channel at a time in float64."""
    out = torch.empty_like(stu, dtype=torch.float64)
    for c in range(stu.shape[1]):
        s, t = stu[:, c].double().reshape(-1), tea[:, c].double().reshape(-1)
        out[:, c] = ((stu[:, c].double() - s.mean()) / (s.std() + 1e-6)) * t.std() + t.mean()
    return out


def test_align_scale_is_the_reference_per_channel_rescaling():
    stu, tea = _feats(2)[0], _feats(3)[0] * 0.3 + 1.0
    got = align_scale(stu, batch_stats(tea))
    assert torch.allclose(got.double(), _align_reference(stu, tea), atol=1e-5)


def _head(c: int = 8, convs: int = 2, seed: int = 0) -> GFLHead:
    torch.manual_seed(seed)
    h = GFLHead(3, c, c, convs, reg_max=16, num_levels=3, norm_groups=4)
    with torch.no_grad():
        for p in h.parameters():
            p.normal_(0, 0.2)
    return h


def test_student_equal_to_teacher_gets_the_teachers_own_predictions():
    """Fed its own held features and its own batch statistics, the head part reproduces the
    teacher's predictions (align_scale is then the identity up to the 1e-6 in the std)."""
    head = _head()
    feats = _feats(4)
    for idx in (0, 1):
        cls_maps, reg_maps, hc, hr = head.forward_held(feats, idx)
        stats = torch.stack([torch.stack([batch_stats(c), batch_stats(r)]) for c, r in zip(hc, hr)])
        cls, reg = cross_head(HeadPart.of_head(head, idx), (hc, hr), stats)
        want_cls = torch.cat([m.permute(0, 2, 3, 1).reshape(3, -1, 3) for m in cls_maps], 1)
        want_reg = torch.cat([m.permute(0, 2, 3, 1).reshape(3, -1, 68) for m in reg_maps], 1)
        assert torch.allclose(cls, want_cls, atol=1e-4)
        assert torch.allclose(reg.reshape(3, -1, 68), want_reg, atol=1e-4)


def test_forward_held_keeps_the_activated_input_of_conv_idx_and_the_plain_outputs():
    head = _head()
    feats = _feats(5)
    cls_maps, reg_maps = head(feats)
    c2, r2, hc, hr = head.forward_held(feats, 1)
    assert all(torch.equal(a, b) for a, b in zip(cls_maps, c2))
    assert all(torch.equal(a, b) for a, b in zip(reg_maps, r2))
    # the reference's "pre-activation" hold is its conv's output after mmcv's in-place ReLU
    assert torch.equal(hc[0], head.cls_convs[0](feats[0]))
    assert (hc[0] >= 0).all()
    assert torch.equal(head.forward_held(feats, 0)[2][1], feats[1])


def test_gradients_reach_the_student_not_the_frozen_head_part():
    teacher, student = _head(seed=1), _head(seed=2)
    feats = [f.requires_grad_(True) for f in _feats(6)]
    _, _, hc, hr = student.forward_held(feats, 1)
    t_hc, t_hr = teacher.forward_held(_feats(7), 1)[2:]
    stats = torch.stack([torch.stack([batch_stats(c), batch_stats(r)]) for c, r in zip(t_hc, t_hr)])
    part = HeadPart.of_head(teacher, 1)
    cls, reg = cross_head(part, (hc, hr), stats)
    (cls.sum() + reg.sum()).backward()
    assert all(p.grad is None for p in part.parameters())
    assert student.cls_convs[0].conv.weight.grad is not None and feats[0].grad is not None


def _reg_reference(s_reg_levels, t_reg_levels, t_cls_levels, lw_levels, T):
    """``pred_mimicking_loss_single`` (regression half) per level, then ``/ kd_avg_factor``."""
    losses, factor = [], 0.0
    for s, t, tc, lw in zip(s_reg_levels, t_reg_levels, t_cls_levels, lw_levels):
        s, t, tc = s.double().reshape(-1, 17), t.double().reshape(-1, 17), tc.double()
        target = F.softmax(t / T, dim=1)
        kl = (target * (target.log() - F.log_softmax(s / T, dim=1))).sum(1) * T * T
        w = tc.max(dim=1).values.sigmoid()
        w[lw == 0] = 0
        losses.append((kl * w[:, None].expand(-1, 4).reshape(-1)).sum() / (4.0 + EPS))
        factor += float(w.sum())
    return sum(x / factor for x in losses)


def _qfl_reference(s_levels, t_levels, lw_levels, avg_factor, beta=1.0):
    """``kd_quality_focal_loss`` per level (weight = label weights over classes), summed."""
    total = 0.0
    for s, t, lw in zip(s_levels, t_levels, lw_levels):
        s, t = s.double(), t.double().sigmoid()
        loss = F.binary_cross_entropy_with_logits(s, t, reduction="none") * (s.sigmoid() - t).abs().pow(beta)
        total = total + (loss * lw.double()[:, None]).sum() / (avg_factor + EPS)
    return total


def test_losses_equal_the_reference_reductions_per_level():
    g = torch.Generator().manual_seed(8)
    sizes = (40, 12, 5)
    s_cls = [torch.randn(n, 3, generator=g) for n in sizes]
    t_cls = [torch.randn(n, 3, generator=g) * 2 for n in sizes]
    s_reg = [torch.randn(n, 4, 17, generator=g) for n in sizes]
    t_reg = [torch.randn(n, 4, 17, generator=g) * 3 for n in sizes]
    lw = [(torch.rand(n, generator=g) > 0.2).float() for n in sizes]
    cat = torch.cat
    for T in (1.0, 2.0):
        want = _reg_reference(s_reg, t_reg, t_cls, lw, T)
        got = crosskd_reg_loss(cat(s_reg), cat(t_reg), cat(t_cls), cat(lw), T)
        assert abs(float(got) - float(want)) < 1e-5 * max(1.0, float(want))
        # the teacher may come as log-probabilities (the cache's box rows): the same loss
        got_lp = crosskd_reg_loss(cat(s_reg), F.log_softmax(cat(t_reg), -1), cat(t_cls), cat(lw), T)
        assert abs(float(got_lp) - float(want)) < 1e-5 * max(1.0, float(want))
    # invalid anchors (label weight 0) are left out of both the sum and the normaliser
    keep = cat(lw) > 0
    got = crosskd_reg_loss(cat(s_reg)[keep], cat(t_reg)[keep], cat(t_cls)[keep], cat(lw)[keep])
    assert abs(float(got) - float(_reg_reference(s_reg, t_reg, t_cls, lw, 1.0))) < 1e-5
    want = _qfl_reference(s_cls, t_cls, lw, 7.0)
    assert abs(float(bckd_cls_loss(cat(s_cls), cat(t_cls), cat(lw), 7.0)) - float(want)) < 1e-5
