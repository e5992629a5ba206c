"""Box helpers against known values: ``iof``, ``aligned_iou`` and ``distance2bbox``'s clipping.

Written from mutation-testing survivors (``tools/mutation.py``): each pins a behaviour whose
change the rest of the suite did not notice.
"""
from __future__ import annotations

import pytest
import torch


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
