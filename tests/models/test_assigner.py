"""Tests written from mutation-testing survivors (``tools/mutation.py``): each pins a
behaviour whose change the rest of the suite did not notice."""
from __future__ import annotations

import math

import pytest
import torch

from ldpipe.models.losses import quality_focal_loss


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


# ------------------------------------------------------------------------------- boxes
def test_iof_and_aligned_iou_known_values():
    from ldpipe.models.boxes import aligned_iou, iof
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 20.5, 20.5]])  # the second: area 0.25
    b = torch.tensor([[5.0, 5.0, 15.0, 15.0], [20.0, 20.0, 30.0, 30.0]])
    # inter [[25, 0], [0, 0.25]] over the area of a's row
    assert iof(a, b).tolist() == [[0.25, 0.0], [0.0, 1.0]]
    assert iof(torch.tensor([[1.0, 1.0, 1.0, 3.0]]), b).tolist() == [[0.0, 0.0]]  # zero area
    x = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 4.0, 4.0]])
    y = torch.tensor([[1.0, 1.0, 3.0, 3.0], [5.0, 5.0, 6.0, 6.0], [1.0, 1.0, 3.0, 3.0]])
    assert aligned_iou(x, y).tolist() == pytest.approx([1 / 7, 0.0, 4 / 16], abs=1e-7)
    zero = torch.zeros(1, 4)
    assert aligned_iou(zero, zero).tolist() == [0.0]


def test_distance2bbox_clips_every_side():
    """Decoding clips each coordinate into the image: a point in the padding beyond the image
    (x1 > w), and right / bottom edges within [0, 1)."""
    from ldpipe.models.boxes import distance2bbox
    pts = torch.tensor([[50.0, 40.0], [0.0, 0.0]])
    dist = torch.tensor([[10.0, 5.0, 1.0, 1.0], [0.0, 0.0, 0.5, 0.25]])
    assert distance2bbox(pts, dist, (20, 30)).tolist() == [[30.0, 20.0, 30.0, 20.0], [0.0, 0.0, 0.5, 0.25]]
    assert distance2bbox(pts, dist).tolist() == [[40.0, 35.0, 51.0, 41.0], [0.0, 0.0, 0.5, 0.25]]


# ---------------------------------------------------------------------------- assigner
def _grid(pad=(192, 192), strides=(8, 16, 32, 64, 128)):
    from ldpipe.models.anchors import grid_tensors, make_grid
    grid = make_grid(pad, list(strides), 8.0)
    return grid, grid_tensors(grid)[0]


def test_atss_positive_centres_strictly_inside_both_axes():
    """A flat GT between two anchor rows (centres 1 px above its top and below its bottom)
    and a thin one between two columns get no positive; a 9 px GT whose four nearest
    centres are 0.5 px inside its edges gets exactly those four."""
    from ldpipe.models.assigner import atss_assign
    from ldpipe.models.boxes import anchor_centers
    grid, anchors = _grid()
    centers = anchor_centers(anchors)
    for gt in ([[64.0, 97.0, 160.0, 103.0]], [[97.0, 64.0, 103.0, 160.0]]):
        gt = torch.tensor(gt)
        res = atss_assign(anchors, grid.num_level_anchors, gt)
        pos = torch.nonzero(res.gt_index > 0).squeeze(1)
        c = centers[pos]
        inside = (c[:, 0] > gt[0, 0]) & (c[:, 0] < gt[0, 2]) & (c[:, 1] > gt[0, 1]) & (c[:, 1] < gt[0, 3])
        assert inside.all(), c[~inside].tolist()
        assert pos.numel() == 0
    gt = torch.tensor([[7.5, 7.5, 16.5, 16.5]])
    res = atss_assign(anchors, grid.num_level_anchors, gt)
    pos = torch.nonzero(res.gt_index > 0).squeeze(1)
    assert centers[pos].tolist() == [[8.0, 8.0], [16.0, 8.0], [8.0, 16.0], [16.0, 16.0]]


def test_atss_ignored_anchors_are_minus_one_and_empty_gt_shapes():
    from ldpipe.models.assigner import atss_assign
    grid, anchors = _grid()
    gt = torch.tensor([[20.0, 20.0, 80.0, 70.0]])
    ignore = torch.tensor([[100.0, 100.0, 190.0, 190.0]])
    res = atss_assign(anchors, grid.num_level_anchors, gt, ignore, ignore_iof_thr=0.5)
    assert set(res.gt_index.unique().tolist()) == {-1, 0, 1}
    empty = atss_assign(anchors, grid.num_level_anchors, torch.zeros(0, 4))
    assert torch.equal(empty.max_iou, torch.zeros(anchors.shape[0]))
    assert empty.thr.shape == (0,) and (empty.gt_index == 0).all()


def test_overlap_mask_single_gt_and_image_targets_defaults():
    from ldpipe.models import image_targets
    from ldpipe.models.anchors import make_grid
    from ldpipe.models.assigner import overlap_mask
    from torchvision.ops import box_iou
    grid, anchors = _grid()
    one = torch.tensor([[30.0, 40.0, 50.0, 44.0]])
    assert torch.equal(overlap_mask(anchors, one), (box_iou(anchors, one) > 0).any(dim=1))
    none = overlap_mask(anchors, torch.zeros(0, 4))
    assert none.dtype == torch.bool and none.shape == (anchors.shape[0],) and not none.any()
    t = image_targets(one, torch.tensor([2]), None, (192, 192), [8, 16, 32, 64, 128], 8.0, 3)
    assert t.vlr is None  # VLR only when asked for
    assert t.grid == make_grid((192, 192), [8, 16, 32, 64, 128], 8.0)
    assert t.labels.dtype == torch.int64


# ---------------------------------------------------------------------------- GFL head
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
