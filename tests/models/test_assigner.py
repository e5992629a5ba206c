"""The assigner against hand-placed boxes and brute force: ATSS positives strictly inside the
GT on both axes, ignored anchors, empty GTs, the overlap mask and ``image_targets``' defaults,
and ``vlr_weights`` against an every-anchor DIoU reference.

The ATSS / overlap tests were written from mutation-testing survivors (``tools/mutation.py``):
each pins a behaviour whose change the rest of the suite did not notice.  The VLR test is a
hand-computed guard of issue 12 ("tests first"), written to fail on the bug its docstring names.
"""
from __future__ import annotations

import random

import pytest
import torch
from torchvision.ops import box_iou

from helpers import vlr_reference
from ldpipe.models.anchors import grid_tensors, make_grid
from ldpipe.models.assigner import atss_assign, vlr_weights


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


# ------------------------------------------------------------- VLR by brute force
@pytest.mark.parametrize("region", ["reference", "diou"])
@pytest.mark.parametrize("seed", range(3))
def test_vlr_weights_equal_brute_force_with_small_boxes(seed, region):
    """Kills: a pre-filter in ``vlr_weights`` that drops anchors barely overlapping a GT (the
    64 px anchors of stride 8 overlap a 4-12 px box with IoU < 0.03), and any filter on box
    size.  Reference: DIoU against every anchor, no pre-filter."""
    rng = random.Random(seed)
    grid = make_grid((320, 320), [8, 16, 32, 64, 128], 8.0)
    anchors, _ = grid_tensors(grid)
    boxes = []
    for side in (4, 5, 7, 9, 12, 30, 90, 200):
        w, h = side * rng.uniform(0.8, 1.2), side * rng.uniform(0.8, 1.2)
        x, y = rng.uniform(0, 318 - w), rng.uniform(0, 318 - h)
        boxes.append([x, y, x + w, y + h])
    gt = torch.tensor(boxes)
    res = atss_assign(anchors, grid.num_level_anchors, gt)
    want, inside = vlr_reference(anchors, gt, res.thr, region)
    small = (gt[:, 2:] - gt[:, :2]).max(dim=1).values < 16
    assert inside[:, small].any(dim=0).sum() >= 3, "set-up: most small boxes have a VLR"
    assert (box_iou(anchors, gt)[inside[:, :5].any(1)] < 0.01).any(), "set-up: tiny overlaps"
    got = vlr_weights(anchors, gt, res.thr, overlaps=res.overlaps, region=region)
    assert torch.allclose(got, want, rtol=0, atol=1e-6) and torch.equal(got > 0, want > 0)
    assert torch.equal(vlr_weights(anchors, gt, res.thr, region=region), got)  # overlaps inside
