"""Test-time suppression of a GFL head's candidate boxes: plain NMS or Score-voting Cluster-DIoU-NMS.

``models.NAME.test.nms`` picks one:

* ``"nms"`` - class-wise greedy IoU NMS (``torchvision.ops.batched_nms``), as mmdetection's
  ``multiclass_nms`` with ``nms=dict(type='nms', iou_threshold=nms_iou)``.
* ``"voting_cluster_diounms"`` - the LD reference's post-processing of the same name
  (HikariTJU/LD, ``mmdet/core/post_processing/bbox_nms.py``, ``multiclass_nms`` with
  ``nms=dict(type='voting_cluster_diounms', iou_threshold=nms_iou)``), written here from its
  definition:

  1. candidates sorted by score, highest first;
  2. pairwise DIoU ``d(i, j) = IoU - (rho^2 / (c^2 + 1e-7)) ** 0.8`` (``DIOU_BETA``; ``rho`` the
     centre distance, ``c`` the enclosing box's diagonal, IoU with ``union + 1e-7``), zero
     between different classes (the reference shifts each class's boxes by ``4000 * label``
     so that they never overlap; a same-class mask gives the same result at any image size);
  3. Cluster-NMS on the upper triangle ``X = triu(d, 1)``: ``keep = all``, then repeatedly
     ``keep_j = max_i X[i, j] * keep_i <= iou_threshold`` until ``keep`` stops changing (at
     most ``n`` rounds).  The fixed point is exactly greedy DIoU-NMS, computed as matrix ops;
  4. score voting: every kept box ``i`` becomes the weighted mean of the boxes ``j >= i`` (in
     score order, itself included, kept or suppressed) with ``d(i, j) > 0.7`` (``VOTE_DIOU``,
     fixed, independent of ``iou_threshold``), weight ``score_j * exp(-(1 - d(i, j))^2 / 0.025)``
     (``VOTE_SIGMA``).  As in the reference's formula every other box also enters, with
     ``d`` taken as 0, i.e. weight ``score_j * exp(-40)`` (~4e-18: invisible in float32);
  5. kept boxes keep their own scores and labels, in score order across classes, cut to
     ``max_per_img``.

  The reference builds the whole ``n x n`` matrix.  Here Cluster-NMS runs on a leading block of
  the score-sorted candidates that grows until it keeps ``max_per_img`` boxes (exact: a box's
  fate depends only on higher-scored boxes), and only the kept boxes' rows are built for the
  vote: O(block^2 + k n) instead of O(n^2) (``voting_cluster_diou_nms``'s ``block``).
"""
from __future__ import annotations

import torch
from torchvision.ops import batched_nms

from ..config import NMS_KINDS, TestConfig

DIOU_BETA = 0.8  # exponent of the DIoU centre-distance penalty (the reference's diou(box, box, 0.8))
VOTE_DIOU = 0.7  # a kept box's voting cluster: lower-scored boxes with DIoU above this
VOTE_SIGMA = 0.025  # vote weight score * exp(-(1 - DIoU)^2 / VOTE_SIGMA)


def pairwise_diou(boxes: torch.Tensor, other: torch.Tensor | None = None,
                  beta: float = DIOU_BETA) -> torch.Tensor:
    """``[n, m]`` DIoU of ``(x1, y1, x2, y2)`` boxes (``other``: default ``boxes``):
    ``IoU - (rho^2 / c^2) ** beta``."""
    other = boxes if other is None else other
    a, b = boxes[:, None, :], other[None, :, :]
    wh = (torch.minimum(a[..., 2:], b[..., 2:]) - torch.maximum(a[..., :2], b[..., :2])).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    area_b = (other[:, 2] - other[:, 0]) * (other[:, 3] - other[:, 1])
    iou = inter / (area_a[:, None] + area_b[None, :] - inter + 1e-7)
    rho2 = (((a[..., :2] + a[..., 2:]) - (b[..., :2] + b[..., 2:])) ** 2).sum(-1) / 4
    enclosing = torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])
    c2 = (enclosing ** 2).sum(-1)
    return iou - (rho2 / (c2 + 1e-7)) ** beta


def cluster_keep(upper: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Cluster-NMS: the keep mask of score-sorted boxes given ``upper = triu(overlap, 1)``."""
    n = upper.shape[0]
    keep = torch.ones(n, dtype=torch.bool, device=upper.device)
    for _ in range(n + 1):  # the first t boxes are final after round t
        suppressor = (upper * keep[:, None].to(upper.dtype)).max(dim=0).values
        new = suppressor <= iou_threshold
        if torch.equal(new, keep):
            break
        keep = new
    return keep


def voting_cluster_diou_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                            iou_threshold: float, max_num: int = -1, block: int = 1024
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score-voting Cluster-DIoU-NMS (see the module docstring).

    Args:
        boxes: ``[n, 4]`` candidate boxes; scores: ``[n]``; labels: ``[n]`` class indices.
        iou_threshold: a box is suppressed by a kept, higher-scored box of its class whose DIoU
            with it is above this.
        max_num: keep at most this many (highest scores across classes); ``<= 0``: all.
        block: with ``max_num > 0``, Cluster-NMS first runs on the ``block`` highest-scored
            candidates and doubles the block until it keeps ``max_num`` (or holds all): whether a
            box is kept depends only on higher-scored ones, so the first ``max_num`` kept boxes
            of a block are those of the whole set (exact; O(block^2) instead of O(n^2)).  The
            votes read all ``n`` candidates.

    Returns:
        ``(voted_boxes [k, 4], scores [k], labels [k], index [k])``, highest score first;
        ``index`` points into the inputs.
    """
    n = boxes.shape[0]
    if n == 0:
        empty = labels.new_zeros(0)
        return boxes.new_zeros((0, 4)), scores.new_zeros(0), empty, empty
    scores, order = scores.sort(descending=True, stable=True)
    boxes, labels = boxes[order].float(), labels[order]
    m = n if max_num <= 0 else min(n, max(block, max_num))
    while True:
        d = pairwise_diou(boxes[:m]) * (labels[:m, None] == labels[None, :m])
        keep = cluster_keep(d.triu(1), iou_threshold)
        if m == n or int(keep.sum()) >= max_num:
            break
        m = min(n, 2 * m)
    idx = torch.nonzero(keep).squeeze(1)
    if max_num > 0:
        idx = idx[:max_num]
    # each kept box's row of the DIoU matrix over all candidates, zero left of the diagonal
    # (higher-scored boxes) and across classes; votes of DIoU > VOTE_DIOU
    rows = pairwise_diou(boxes[idx], boxes) * (labels[idx, None] == labels[None, :])
    rows = rows * (torch.arange(n, device=boxes.device)[None, :] >= idx[:, None])
    rows = rows * (rows > VOTE_DIOU)
    weight = torch.exp(-(1 - rows) ** 2 / VOTE_SIGMA) * scores[None, :].float()
    voted = (weight @ boxes) / weight.sum(1, keepdim=True)
    return voted, scores[idx], labels[idx], order[idx]


def _greedy(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, cfg: TestConfig) -> dict:
    keep = batched_nms(boxes, scores, labels, cfg.nms_iou)[: cfg.max_per_img]
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}


def _voting(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, cfg: TestConfig) -> dict:
    voted, sc, lab, _ = voting_cluster_diou_nms(boxes, scores, labels, cfg.nms_iou, cfg.max_per_img)
    return {"boxes": voted.to(boxes.dtype), "scores": sc, "labels": lab}


SUPPRESS = {"nms": _greedy, "voting_cluster_diounms": _voting}  # test.nms -> its suppression


def suppress(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
             cfg: TestConfig) -> dict:
    """The detections ``{'boxes', 'scores', 'labels'}`` that ``cfg.nms`` keeps of the candidates."""
    if cfg.nms not in SUPPRESS:
        raise ValueError(f"unknown test.nms {cfg.nms!r} (choose from {', '.join(NMS_KINDS)})")
    return SUPPRESS[cfg.nms](boxes, scores, labels, cfg)
