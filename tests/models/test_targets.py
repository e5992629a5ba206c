"""The batch target layout (``ldpipe.models.targets.batch_targets``), directly: each image's
own-grid targets scattered onto the batch grid (the suite otherwise reached it only through
training steps; mutation testing found its mutants had no fast test)."""
from __future__ import annotations

import torch

from ldpipe.models.anchors import make_grid
from ldpipe.models.targets import ImageTargets, batch_targets


def _image_targets(pad, n_classes=3, pos=(), seed=0, vlr=True) -> ImageTargets:
    grid = make_grid(pad, [8, 16], 8.0)
    n = grid.num_anchors
    g = torch.Generator().manual_seed(seed)
    labels = torch.full((n,), n_classes, dtype=torch.long)
    for j, c in pos:
        labels[j] = c
    weights = torch.ones(n)
    weights[-1] = 0.0  # an ignored anchor
    boxes = torch.rand(n, 4, generator=g) * 40
    return ImageTargets(grid, labels, weights, boxes, torch.rand(n, generator=g) if vlr else None,
                        n_classes)


def test_batch_targets_scatter_each_image_onto_the_batch_grid():
    """Image b's own-grid anchor j lands at flat row b * N + (its batch-grid index); rows
    outside an image's own extent keep background label, weight 0, zero box and zero VLR;
    ``num_pos_images`` sums max(n_pos, 1) per image."""
    small = _image_targets((32, 32), pos=[(0, 1), (5, 2)], seed=1)
    big = _image_targets((32, 48), pos=[], seed=2)
    sizes = [(4, 6), (2, 3)]  # the batch grid of a 32 x 48 padded batch at strides 8, 16
    bt = batch_targets([small, big], sizes, [8, 16], 8.0, 3, torch.device("cpu"))
    n = 4 * 6 + 2 * 3
    assert bt.labels.shape == (2 * n,) and bt.anchors.shape == (2 * n, 4) and bt.strides.shape == (2 * n,)
    assert bt.num_pos_images == 2 + 1
    # the small image's own grid (4x4 + 2x2) inside the batch grid (4x6 + 2x3), row by row
    want = [r * 6 + c for r in range(4) for c in range(4)] + [24 + r * 3 + c for r in range(2) for c in range(2)]
    assert bt.own_to_batch[0].tolist() == want
    assert bt.own_to_batch[1].tolist() == [n + j for j in range(n)]
    idx = torch.tensor(want)
    assert torch.equal(bt.labels[idx], small.labels) and torch.equal(bt.label_weights[idx], small.label_weights)
    assert torch.equal(bt.bbox_targets[idx], small.bbox_targets) and torch.equal(bt.vlr[idx], small.vlr)
    outside = torch.tensor(sorted(set(range(n)) - set(want)))
    assert (bt.labels[outside] == 3).all() and (bt.label_weights[outside] == 0).all()
    assert (bt.bbox_targets[outside] == 0).all() and (bt.vlr[outside] == 0).all()
    assert torch.equal(bt.labels[n:], big.labels) and torch.equal(bt.bbox_targets[n:], big.bbox_targets)
    assert torch.equal(bt.anchors[:n], bt.anchors[n:]) and bt.strides[:24].eq(8).all() and bt.strides[24:n].eq(16).all()
    novlr = batch_targets([_image_targets((32, 32), vlr=False)], [(4, 4), (2, 2)], [8, 16], 8.0, 3,
                          torch.device("cpu"))
    assert novlr.vlr is None and novlr.num_pos_images == 1
