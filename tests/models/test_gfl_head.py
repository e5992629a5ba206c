"""GFLHead and GFL.predict against hand computations: decoding known boxes (clip, NMS, score
threshold, ``max_per_img``), ``boxes_to_original``, mmdetection's initialisation, QFL with
several positives, and the loss reading ``qfl_beta``.

The predict tests are hand-computed guards of issue 12 ("tests first"): each was written to
fail on a plausible bug that the rest of the suite let through.  The initialisation and loss
tests were written from mutation-testing survivors (``tools/mutation.py``): each pins a
behaviour whose change the rest of the suite did not notice.
"""
from __future__ import annotations

import math

import pytest
import torch

from helpers import DEMO_PIPELINE, TINY_STUDENT
from ldpipe.config import TestConfig as HeadTestConfig
from ldpipe.config import load_pipeline
from ldpipe.data import SampleMeta, boxes_to_original
from ldpipe.models import build_model
from ldpipe.models.anchors import grid_tensors, make_grid
from ldpipe.models.detector import DenseOutput, flatten_levels
from ldpipe.models.gfl_head import GFLHead
from ldpipe.models.losses import quality_focal_loss


# ---------------------------------------------------------------------------- predict
def _peaked(bins: list[int], reg_max: int) -> torch.Tensor:
    """Edge logits whose softmax is one-hot (in float32) at ``bins``."""
    out = torch.zeros(4, reg_max + 1)
    for e, k in enumerate(bins):
        out[e, k] = 100.0
    return out.reshape(-1)


def _maps(sizes, num_classes, reg_max, cells):
    """Per-level class/edge maps for one image; ``cells``: (level, y, x, class, logit, bins)."""
    cls = [torch.full((1, num_classes, h, w), -10.0) for h, w in sizes]
    reg = [torch.zeros(1, 4 * (reg_max + 1), h, w) for h, w in sizes]
    for lv, y, x, c, logit, bins in cells:
        cls[lv][0, c, y, x] = logit
        reg[lv][0, :, y, x] = _peaked(bins, reg_max)
    return DenseOutput(flatten_levels(cls), flatten_levels(reg).reshape(1, -1, 4, reg_max + 1),
                       list(sizes))


def test_head_predict_decodes_known_boxes():
    """GFLHead.predict: expected bin x stride from the anchor centre, clip to ``img_shape``,
    class-wise NMS, score threshold, ``max_per_img``; values by hand."""
    head = GFLHead(num_classes=2, in_channels=8, feat_channels=8, stacked_convs=0, reg_max=4,
                   num_levels=2)
    strides, sizes = [8, 16], [(2, 3), (1, 2)]
    cells = [
        (0, 1, 2, 1, 2.0, [1, 0, 3, 4]),  # centre (16, 8): (8, 8, 40, 40) -> clip (8, 8, 36, 30)
        (0, 1, 1, 1, 1.5, [0, 0, 4, 4]),  # centre (8, 8): same clipped box, lower score: NMS'd
        (1, 0, 1, 0, 1.0, [0, 0, 1, 1]),  # centre (16, 0) stride 16: (16, 0, 32, 16)
        (0, 0, 0, 0, 0.5, [0, 0, 1, 1]),  # (0, 0, 8, 8): different class from its overlaps
    ]
    out_maps = _maps(sizes, 2, 4, cells)
    anchors = [grid_tensors(make_grid((16, 24), [8], 8.0))[0],
               grid_tensors(make_grid((16, 32), [16], 8.0))[0]]
    assert [a.shape[0] for a in anchors] == [6, 2]
    metas = [(30, 36)]  # img_shapes
    cfg = HeadTestConfig(score_thr=0.05, nms_pre=1000, nms_iou=0.6, max_per_img=100)
    out = head.predict(out_maps, anchors, strides, metas, cfg)[0]
    sig = torch.sigmoid
    assert out["boxes"].tolist() == [[8.0, 8.0, 36.0, 30.0], [16.0, 0.0, 32.0, 16.0], [0.0, 0.0, 8.0, 8.0]]
    assert torch.equal(out["scores"], sig(torch.tensor([2.0, 1.0, 0.5])))
    assert out["labels"].tolist() == [1, 0, 0]
    cfg = HeadTestConfig(score_thr=0.65, nms_pre=1000, nms_iou=0.6, max_per_img=100)
    assert head.predict(out_maps, anchors, strides, metas, cfg)[0]["labels"].tolist() == [1, 0]
    cfg = HeadTestConfig(score_thr=0.05, nms_pre=1, nms_iou=0.6, max_per_img=2)
    out = head.predict(out_maps, anchors, strides, metas, cfg)[0]
    assert out["labels"].tolist() == [1, 0] and out["boxes"][1].tolist() == [16.0, 0.0, 32.0, 16.0]


def test_model_predict_and_boxes_to_original():
    """GFL.predict builds each level's anchors from its stride (P3-P7) and decodes there;
    boxes_to_original undoes flip and scale and clips to the original image."""
    pipe = load_pipeline(DEMO_PIPELINE, list(TINY_STUDENT))
    model = build_model(pipe.model("student"), 3).eval()
    sizes = [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]  # a 64 x 64 input
    cells = [(1, 2, 3, 2, 3.0, [1, 1, 2, 1]),  # stride 16, centre (48, 32): (32, 16, 80, 48)
             (3, 0, 0, 0, 2.0, [0, 0, 1, 1])]  # stride 64, centre (0, 0): (0, 0, 64, 64)
    dense = _maps(sizes, 3, model.cfg.reg_max, cells)
    model.forward = lambda img: dense  # known head outputs
    meta = SampleMeta(image_id=1, file_name="x.jpg", variant="s0f", img_shape=(60, 64), pad_shape=(64, 64),
                      flip=True, scale_factor=(2.0, 0.5), ori_shape=(200, 30))
    out = model.predict(torch.zeros(1, 3, 64, 64), [meta.img_shape])[0]
    assert out["boxes"].tolist() == [[32.0, 16.0, 64.0, 48.0], [0.0, 0.0, 64.0, 60.0]]
    assert out["labels"].tolist() == [2, 0]
    assert torch.equal(out["scores"], torch.sigmoid(torch.tensor([3.0, 2.0])))
    # flip about the resized width 64: x [32, 64] -> [0, 32] -> /2 [0, 16]; y / 0.5; clip to
    # the original 30 wide x 200 high
    orig = boxes_to_original(out["boxes"], meta)
    assert orig.tolist() == [[0.0, 32.0, 16.0, 96.0], [0.0, 0.0, 30.0, 120.0]]
    assert math.isclose(float(out["scores"][0]), 1 / (1 + math.exp(-3.0)), rel_tol=1e-6)


# ------------------------------------------------------ QFL, initialisation, loss
def _bce(x: float, t: float) -> float:
    s = 1 / (1 + math.exp(-x))
    return -(t * math.log(s) + (1 - t) * math.log(1 - s))


def test_qfl_several_positives_each_their_own_term():
    """QFL of three positives (two classes, different IoU targets) and a negative: every
    positive gets its own BCE term (a reduction over the positives would share one)."""
    pred = torch.tensor([[0.3, -1.2, 2.0], [1.5, 0.1, -0.4], [-0.7, 0.9, 0.2], [0.5, -2.0, 1.0]])
    labels = torch.tensor([0, 2, 1, 3])  # 3 = background
    score = torch.tensor([0.8, 0.25, 0.6, 0.0])
    beta = 2.0
    want = []
    for i in range(4):
        total = 0.0
        for c in range(3):
            x = float(pred[i, c])
            sig = 1 / (1 + math.exp(-x))
            if c == int(labels[i]):
                t = float(score[i])
                total += _bce(x, t) * abs(t - sig) ** beta
            else:
                total += _bce(x, 0.0) * sig ** beta
        want.append(total)
    got = quality_focal_loss(pred, labels, score, beta)
    assert got.tolist() == pytest.approx(want, rel=1e-5)


def test_gfl_head_initialisation():
    """mmdetection's GFL head init: class bias -log((1 - 0.01) / 0.01), Scale 1, conv weights
    N(0, 0.01), trainable GroupNorm in the towers."""
    from ldpipe.models.gfl_head import GFLHead
    torch.manual_seed(0)
    head = GFLHead(3, in_channels=16, feat_channels=16, stacked_convs=2, reg_max=7, num_levels=4,
                   norm_groups=4)
    assert torch.allclose(head.gfl_cls.bias, torch.full((3,), -math.log(99.0)))
    assert torch.equal(head.gfl_reg.bias, torch.zeros(4 * 8))
    assert [float(s.scale.detach()) for s in head.scales] == [1.0] * 4
    for conv in (head.gfl_cls, head.gfl_reg, head.cls_convs[0].conv, head.reg_convs[1].conv):
        assert 0.005 < float(conv.weight.detach().std()) < 0.02
        assert conv.padding == (1, 1) and conv.kernel_size == (3, 3)
    norms = [m for m in head.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 4 and all(n.num_groups == 4 for n in norms)
    assert all(p.requires_grad for p in head.parameters())
    assert head.cls_convs[0].conv.in_channels == 16 and head.gfl_reg.out_channels == 32
    assert torch.equal(head.integral.project, torch.arange(8.0))


def test_gfl_head_loss_reads_qfl_beta_and_clamps_far_targets():
    """``LossConfig.qfl_beta`` reaches QFL; DFL targets beyond ``reg_max`` bins are clamped to
    ``reg_max - 0.1`` (a box edge 40 bins away trains the last two bins, no index error)."""
    from ldpipe.config import LossConfig
    from ldpipe.models.gfl_head import GFLHead
    from ldpipe.models.losses import distribution_focal_loss
    head = GFLHead(2, in_channels=8, feat_channels=8, stacked_convs=0, reg_max=4, num_levels=1,
                   norm_groups=4)
    g = torch.Generator().manual_seed(3)
    cls = torch.randn(2, 2, generator=g)
    reg = torch.randn(2, 20, generator=g)
    anchors = torch.tensor([[-16.0, -16.0, 48.0, 48.0], [0.0, 0.0, 64.0, 64.0]])
    strides = torch.tensor([8.0, 8.0])
    labels = torch.tensor([0, 2])
    lw = torch.ones(2)
    targets = torch.tensor([[10.0, 12.0, 16.0 + 8 * 40, 20.0], [0.0] * 4])  # right edge 40 bins out
    args = (cls, reg, anchors, strides, labels, lw, targets, 1.0)
    from test_losses import _loss
    l2, _ = _loss(head, *args, LossConfig(qfl_beta=2.0))
    l1, _ = _loss(head, *args, LossConfig(qfl_beta=1.0))
    assert l1["loss_cls"].item() != pytest.approx(l2["loss_cls"].item(), rel=1e-3)
    # DFL by hand with the clamped targets (centre (2, 2) in stride units)
    d = torch.tensor([2 - 10 / 8, 2 - 12 / 8, 3.9, 20 / 8 - 2])
    w = cls[0].sigmoid().max()
    want = 0.25 * (distribution_focal_loss(reg[0].reshape(4, 5), d) * w).sum() / 4 / (float(w) + 1e-6)
    assert l2["loss_dfl"].item() == pytest.approx(want.item(), rel=1e-5)
