"""GFL and LD losses against values worked out by hand (plain ``math``) on tiny inputs."""
from __future__ import annotations

import math

import pytest
import torch

from ldpipe.config import LossConfig
from ldpipe.distill.losses import cls_kd_loss, kd_kl, ld_loss, vlr_loss
from ldpipe.models.gfl_head import GFLHead
from ldpipe.models.losses import distribution_focal_loss, giou_loss, quality_focal_loss


# ------------------------------------------------------------ plain-math helpers
def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def bce_logit(x: float, y: float) -> float:
    """Binary cross entropy of logit ``x`` against the soft target ``y``."""
    p = sigmoid(x)
    return -(y * math.log(p) + (1.0 - y) * math.log(1.0 - p))


def softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    z = sum(e)
    return [v / z for v in e]


def cross_entropy(logits: list[float], k: int) -> float:
    return -math.log(softmax(logits)[k])


def kd_row(student: list[float], teacher: list[float], T: float) -> float:
    """KL(softmax(t/T) || softmax(s/T)) averaged over the bins, times T^2."""
    p = softmax([t / T for t in teacher])
    q = softmax([s / T for s in student])
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q)) / len(p) * T * T


def box_area(b):
    return max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)


def iou_giou(a, b) -> tuple[float, float]:
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = iw * ih
    union = box_area(a) + box_area(b) - inter
    enclose = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    iou = inter / union
    return iou, iou - (enclose - union) / enclose


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


# ------------------------------------------------------------------------- QFL
def test_qfl_two_anchors_two_classes():
    logits = [[0.5, -1.0], [2.0, 0.3]]
    labels = torch.tensor([0, 2])  # anchor 0: class 0 (IoU 0.6); anchor 1: background (C=2)
    score = t([0.6, 0.9])  # the background anchor's score must be ignored
    got = quality_focal_loss(t(logits), labels, score, beta=2.0)

    a0 = (bce_logit(0.5, 0.6) * abs(0.6 - sigmoid(0.5)) ** 2
          + bce_logit(-1.0, 0.0) * sigmoid(-1.0) ** 2)
    a1 = bce_logit(2.0, 0.0) * sigmoid(2.0) ** 2 + bce_logit(0.3, 0.0) * sigmoid(0.3) ** 2
    assert got.shape == (2,)
    assert got[0].item() == pytest.approx(a0, rel=1e-5)
    assert got[1].item() == pytest.approx(a1, rel=1e-5)


def test_qfl_beta_and_ignored_label():
    logits = [[-0.7, 1.2, 0.1]]
    # beta = 1; label -1 (ignored in mmdetection's convention) is not a positive
    got = quality_focal_loss(t(logits), torch.tensor([-1]), t([0.5]), beta=1.0)
    want = sum(bce_logit(x, 0.0) * sigmoid(x) for x in logits[0])
    assert got.item() == pytest.approx(want, rel=1e-5)
    got = quality_focal_loss(t(logits), torch.tensor([1]), t([0.25]), beta=1.0)
    want = (bce_logit(-0.7, 0.0) * sigmoid(-0.7) + bce_logit(0.1, 0.0) * sigmoid(0.1)
            + bce_logit(1.2, 0.25) * abs(0.25 - sigmoid(1.2)))
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_qfl_perfect_positive_is_zero_at_its_class():
    # sigmoid(x) == score -> the positive term vanishes; a very negative other logit ~ 0
    x = math.log(0.3 / 0.7)
    got = quality_focal_loss(t([[x, -30.0]]), torch.tensor([0]), t([0.3]))
    assert got.item() == pytest.approx(0.0, abs=1e-9)


# ------------------------------------------------------------------------- DFL
def test_dfl_fractional_target():
    logits = [0.2, 1.0, -0.5, 0.3]
    got = distribution_focal_loss(t([logits]), t([2.3]))
    want = 0.7 * cross_entropy(logits, 2) + 0.3 * cross_entropy(logits, 3)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_dfl_rows_and_integer_target():
    rows = [[0.2, 1.0, -0.5, 0.3], [1.5, -1.0, 0.0, 0.7]]
    got = distribution_focal_loss(t(rows), t([1.0, 0.25]))
    want0 = cross_entropy(rows[0], 1)  # integer target: all weight on the left bin
    want1 = 0.75 * cross_entropy(rows[1], 0) + 0.25 * cross_entropy(rows[1], 1)
    assert got.tolist() == pytest.approx([want0, want1], rel=1e-5)


# ------------------------------------------------------------------------ GIoU
def test_giou_loss_hand_values():
    pred = t([[0, 0, 2, 2], [0, 0, 1, 1], [1, 2, 5, 4]])
    target = t([[1, 1, 3, 3], [2, 2, 3, 3], [1, 2, 5, 4]])
    got = giou_loss(pred, target)
    # overlapping: IoU 1/7, enclosing 9, union 7
    assert got[0].item() == pytest.approx(1 - (1 / 7 - 2 / 9), rel=1e-5)
    # disjoint: IoU 0, enclosing 9, union 2 -> GIoU = -7/9
    assert got[1].item() == pytest.approx(1 + 7 / 9, rel=1e-5)
    assert got[2].item() == pytest.approx(0.0, abs=1e-6)
    assert iou_giou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx((1 / 7, 1 / 7 - 2 / 9))


# ----------------------------------------------------------------------- KD/LD
def test_kd_kl_three_bins_T2():
    s, tt = [1.0, 2.0, 3.0], [3.0, 0.0, 1.0]
    got = kd_kl(t([s]), t([tt]), T=2.0)
    p = softmax([3 / 2, 0, 1 / 2])
    q = softmax([1 / 2, 1, 3 / 2])
    want = 4.0 * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)) / 3
    assert got.shape == (1,)
    assert got.item() == pytest.approx(want, rel=1e-5)
    assert want == pytest.approx(kd_row(s, tt, 2.0))


def test_kd_kl_zero_for_equal_and_invariances():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 5, generator=g) * 3
    tch = torch.randn(6, 5, generator=g) * 3
    assert torch.allclose(kd_kl(s, s.clone(), 4.0), torch.zeros(6), atol=1e-6)
    base = kd_kl(s, tch, 4.0)
    assert (base > 0).all()
    # a per-row constant on the teacher changes nothing
    shifted = tch + torch.tensor([[5.0], [-3.0], [100.0], [0.0], [0.5], [-40.0]])
    assert torch.allclose(kd_kl(s, shifted, 4.0), base, rtol=1e-5, atol=1e-6)
    # teacher stored as log-probabilities (log_softmax of its logits) == raw logits
    assert torch.allclose(kd_kl(s, torch.log_softmax(tch, dim=1), 4.0), base, rtol=1e-5, atol=1e-6)
    # teacher is detached, student gets the gradient
    s.requires_grad_(True)
    tch.requires_grad_(True)
    kd_kl(s, tch, 4.0).sum().backward()
    assert s.grad is not None and tch.grad is None


# two positives, reg_max = 2 -> 3 bins, 4 edges each
STU = [[0.1, 0.5, -0.2], [1.0, 0.0, 0.3], [0.0, 0.0, 0.0], [2.0, -1.0, 0.5],
       [-0.3, 0.8, 0.1], [0.4, 0.4, 1.2], [1.1, -0.6, 0.0], [0.2, 0.9, 0.7]]
TEA = [[0.3, 0.2, 0.1], [0.0, 1.5, 0.3], [2.0, 0.0, -1.0], [0.5, 0.5, 0.5],
       [1.0, 0.1, -0.4], [0.0, 0.3, 0.9], [0.6, 0.6, -2.0], [-0.5, 1.4, 0.2]]


@pytest.mark.parametrize("T", [10.0, 1.0])
def test_ld_loss_reduction(T):
    w = [0.8, 0.3]
    got = ld_loss(t(STU), t(TEA), t(w), T=T)
    want = sum(kd_row(STU[i], TEA[i], T) * w[i // 4] for i in range(8)) / 4
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_vlr_loss_reduction():
    iou = [0.45, 0.2]
    got = vlr_loss(t(STU), t(TEA), t(iou), T=10.0)
    want = sum(kd_row(STU[i], TEA[i], 10.0) * iou[i // 4] for i in range(8)) / 16
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_cls_kd_loss_per_level_average():
    s = [[0.2, -1.0, 0.5], [1.5, 0.3, -0.2], [0.0, 2.0, 1.0]]
    tt = [[1.0, 0.0, -0.5], [0.1, 0.1, 0.9], [-1.0, 0.5, 2.5]]
    w = [1.0, 0.5, 1.0]
    got = cls_kd_loss(t(s), t(tt), t(w), torch.tensor([0, 0, 3]), T=2.0)
    k = [kd_row(s[i], tt[i], 2.0) for i in range(3)]
    want = (k[0] * w[0] + k[1] * w[1]) / 2 + k[2] * w[2] / 1
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_distill_losses_empty_are_zero_with_grad():
    for fn, extra in ((ld_loss, (torch.zeros(0),)), (vlr_loss, (torch.zeros(0),)),
                      (cls_kd_loss, (torch.zeros(0), torch.zeros(0, dtype=torch.long)))):
        s = torch.zeros(0, 3, requires_grad=True)
        out = fn(s, torch.zeros(0, 3), *extra)
        assert out.item() == 0.0
        out.backward()


# -------------------------------------------------------------------- GFLHead.loss
REG_MAX = 4


def _loss(head: GFLHead, cls, reg, anchors, strides, labels, label_weights, bbox_targets,
          num_pos_images: float, cfg: LossConfig, reduce=None):
    """``head.loss`` on one image of ``N`` anchors given as flat tensors."""
    from ldpipe.models import BatchTargets, DenseOutput
    n = cls.shape[0]
    out = DenseOutput(cls.reshape(1, n, -1), reg.reshape(1, n, 4, -1), [(1, n)])
    bt = BatchTargets(anchors, strides, labels, label_weights, bbox_targets, None, [],
                      num_pos_images)
    return head.loss(out, bt, cfg, reduce=reduce)


def _head(num_classes: int = 2) -> GFLHead:
    return GFLHead(num_classes, in_channels=8, feat_channels=8, stacked_convs=0, reg_max=REG_MAX,
                   num_levels=1, norm_groups=4)


def test_gfl_head_loss_one_positive_by_hand():
    head = _head()
    cls = [[0.4, -0.3], [-1.0, 0.2], [2.0, 1.0]]
    g = torch.Generator().manual_seed(1)
    reg = (torch.randn(3, 4 * (REG_MAX + 1), generator=g)).tolist()
    # anchor 0 (stride 8, centre (16, 16) -> (2, 2) in stride units) is positive for class 1
    anchors = t([[-16, -16, 48, 48], [0, 0, 64, 64], [8, 8, 72, 72]])
    strides = t([8, 8, 8])
    labels = torch.tensor([1, 2, 2])
    label_weights = t([1, 1, 0])  # anchor 2 ignored
    gt = [4.0, 6.0, 36.0, 30.0]
    bbox_targets = t([gt, [0] * 4, [0] * 4])
    cfg = LossConfig()
    losses, extras = _loss(head, t(cls), t(reg), anchors, strides, labels, label_weights,
                               bbox_targets, 1.0, cfg)

    # ---- by hand
    w = max(sigmoid(x) for x in cls[0])
    bins = list(range(REG_MAX + 1))
    edges = [reg[0][e * (REG_MAX + 1):(e + 1) * (REG_MAX + 1)] for e in range(4)]
    dist = [sum(p * b for p, b in zip(softmax(row), bins)) for row in edges]
    cx = cy = 2.0
    pred = [cx - dist[0], cy - dist[1], cx + dist[2], cy + dist[3]]
    target = [v / 8 for v in gt]  # [0.5, 0.75, 4.5, 3.75]
    iou, giou = iou_giou(pred, target)
    tdist = [cx - target[0], cy - target[1], target[2] - cx, target[3] - cy]  # 1.5 1.25 2.5 1.75
    dfl = 0.0
    for row, d in zip(edges, tdist):
        lo = math.floor(d)
        dfl += (lo + 1 - d) * cross_entropy(row, lo) + (d - lo) * cross_entropy(row, lo + 1)
    want_bbox = cfg.box_weight * (1 - giou) * w / (w + 1e-6)  # LD reference: sum of weights + 1e-6
    want_dfl = cfg.dfl_weight * dfl * w / 4 / (w + 1e-6)
    q0 = bce_logit(0.4, 0.0) * sigmoid(0.4) ** 2 + bce_logit(-0.3, iou) * abs(iou - sigmoid(-0.3)) ** 2
    q1 = bce_logit(-1.0, 0.0) * sigmoid(-1.0) ** 2 + bce_logit(0.2, 0.0) * sigmoid(0.2) ** 2
    want_cls = cfg.qfl_weight * (q0 + q1) / 1.0

    assert losses["loss_bbox"].item() == pytest.approx(want_bbox, rel=1e-4)
    assert losses["loss_dfl"].item() == pytest.approx(want_dfl, rel=1e-4)
    assert losses["loss_cls"].item() == pytest.approx(want_cls, rel=1e-4)
    assert extras.index.tolist() == [0]
    assert extras.weight.tolist() == pytest.approx([w], rel=1e-6)


def _random_case(n: int, pos: list[int], seed: int):
    g = torch.Generator().manual_seed(seed)
    cls = torch.randn(n, 2, generator=g) * 2
    reg = torch.randn(n, 4 * (REG_MAX + 1), generator=g)
    xy = torch.rand(n, 2, generator=g) * 64
    anchors = torch.cat([xy - 32, xy + 32], 1)
    strides = torch.full((n,), 8.0)
    labels = torch.full((n,), 2, dtype=torch.long)
    labels[pos] = torch.tensor([i % 2 for i in range(len(pos))], dtype=torch.long)
    centers = xy
    d = torch.rand(n, 4, generator=g) * 24 + 2
    boxes = torch.cat([centers - d[:, :2], centers + d[:, 2:]], 1)
    label_weights = torch.ones(n)
    return cls, reg, anchors, strides, labels, label_weights, boxes


@pytest.mark.parametrize("num_pos_images", [3.5, 0.5])
def test_gfl_head_loss_avg_factors(num_pos_images):
    head = _head()
    pos = [0, 2, 3, 5, 6]
    cls, reg, anchors, strides, labels, lw, boxes = _random_case(8, pos, seed=2)
    cfg = LossConfig(qfl_weight=1.5, dfl_weight=0.25, box_weight=2.0)
    losses, extras = _loss(head, cls, reg, anchors, strides, labels, lw, boxes, num_pos_images, cfg)

    w = cls.sigmoid().max(1).values[pos]
    assert w.sum() > 1  # the divisor is the sum of weights, not 1
    s = strides[pos][:, None]
    centers = (anchors[pos, :2] + anchors[pos, 2:]) / 2 / s
    prob = torch.softmax(reg[pos].reshape(-1, REG_MAX + 1), 1)
    dist = (prob * torch.arange(REG_MAX + 1.0)).sum(1).reshape(-1, 4)
    pred = torch.cat([centers - dist[:, :2], centers + dist[:, 2:]], 1)
    target = boxes[pos] / s
    tdist = torch.cat([centers - target[:, :2], target[:, 2:] - centers], 1).clamp(0, REG_MAX - 0.1)
    bbox_sum = (giou_loss(pred, target) * w).sum()
    dfl_sum = (distribution_focal_loss(reg[pos].reshape(-1, REG_MAX + 1), tdist.reshape(-1))
               * w.repeat_interleave(4)).sum() / 4
    assert losses["loss_bbox"].item() == pytest.approx(2.0 * bbox_sum.item() / w.sum().item(), rel=1e-4)
    assert losses["loss_dfl"].item() == pytest.approx(0.25 * dfl_sum.item() / w.sum().item(), rel=1e-4)

    score = torch.zeros(8)
    lt = torch.max(pred[:, :2], target[:, :2])
    rb = torch.min(pred[:, 2:], target[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    area = lambda b: (b[:, 2:] - b[:, :2]).prod(1)  # noqa: E731
    score[pos] = inter / (area(pred) + area(target) - inter)
    qfl_sum = quality_focal_loss(cls, labels, score).sum()
    assert losses["loss_cls"].item() == pytest.approx(
        1.5 * qfl_sum.item() / max(num_pos_images, 1.0), rel=1e-4)

    # a "mean over ranks" reduce is applied to both normalisers
    doubled, _ = _loss(head, cls, reg, anchors, strides, labels, lw, boxes, num_pos_images, cfg,
                           reduce=lambda x: x * 2)
    assert doubled["loss_bbox"].item() == pytest.approx(losses["loss_bbox"].item() / 2, rel=1e-5)
    assert doubled["loss_dfl"].item() == pytest.approx(losses["loss_dfl"].item() / 2, rel=1e-5)
    assert doubled["loss_cls"].item() == pytest.approx(
        1.5 * qfl_sum.item() / max(2 * num_pos_images, 1.0), rel=1e-4)


@pytest.mark.parametrize("norm", ["sum", "clamp"])
def test_gfl_head_loss_small_weight_sum(norm):
    """The LD reference divides the box/DFL sums by (sum of weights + 1e-6): a lone positive's
    loss does not scale with its weight.  ``box_norm="clamp"`` divides by max(sum, 1): below 1
    the loss scales with the weight."""
    head = _head()
    pos = [1]
    cls, reg, anchors, strides, labels, lw, boxes = _random_case(4, pos, seed=5)
    cls[1] = torch.tensor([-3.0, -4.0])  # max sigmoid ~ 0.047: sum of weights < 1
    cfg = LossConfig(box_norm=norm)
    base, _ = _loss(head, cls, reg, anchors, strides, labels, lw, boxes, 1.0, cfg)
    w = torch.sigmoid(torch.tensor(-3.0)).item()
    cls2 = cls.clone()
    cls2[1] = torch.tensor([math.log(2 * w / (1 - 2 * w)), -4.0])  # the weight doubled
    other, _ = _loss(head, cls2, reg, anchors, strides, labels, lw, boxes, 1.0, cfg)
    factor = 1.0 if norm == "sum" else 2.0
    assert other["loss_bbox"].item() == pytest.approx(factor * base["loss_bbox"].item(), rel=1e-4)
    assert other["loss_dfl"].item() == pytest.approx(factor * base["loss_dfl"].item(), rel=1e-4)


def test_ciou_loss_by_hand():
    """1 - CIoU with the reference's terms (alpha = v / (1 - IoU + v), not detached)."""
    from ldpipe.models.losses import ciou_loss
    p, q = [1.0, 2.0, 5.0, 4.0], [2.0, 1.0, 6.0, 7.0]
    inter = (5 - 2) * (4 - 2)
    iou = inter / (4 * 2 + 4 * 6 - inter)
    c2 = (6 - 1) ** 2 + (7 - 1) ** 2
    rho2 = ((2 + 6) / 2 - (1 + 5) / 2) ** 2 + ((1 + 7) / 2 - (2 + 4) / 2) ** 2
    v = 4 / math.pi ** 2 * (math.atan(4 / 6) - math.atan(4 / 2)) ** 2
    want = 1 - (iou - rho2 / c2 - v * v / (1 - iou + v))
    pred = torch.tensor([p], requires_grad=True)
    got = ciou_loss(pred, torch.tensor([q]))
    assert got.item() == pytest.approx(want, rel=1e-5)
    got.sum().backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    # the head uses it when asked; identical boxes give 0
    assert ciou_loss(torch.tensor([q]), torch.tensor([q])).item() == pytest.approx(0.0, abs=1e-5)
    head = _head()
    cls, reg, anchors, strides, labels, lw, boxes = _random_case(6, [0, 3], seed=9)
    g, _ = _loss(head, cls, reg, anchors, strides, labels, lw, boxes, 1.0, LossConfig())
    c, _ = _loss(head, cls, reg, anchors, strides, labels, lw, boxes, 1.0, LossConfig(box_loss="ciou"))
    assert g["loss_dfl"].item() == c["loss_dfl"].item() and g["loss_bbox"].item() != c["loss_bbox"].item()


def _ciou_reference_formula(p, q, eps):
    """1 - CIoU in plain Python floats, eps where the reference's ``ciou_loss`` puts it
    (union, c^2, both heights)."""
    inter = max(min(p[2], q[2]) - max(p[0], q[0]), 0.0) * max(min(p[3], q[3]) - max(p[1], q[1]), 0.0)
    union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter + eps
    iou = inter / union
    c2 = (max(p[2], q[2]) - min(p[0], q[0])) ** 2 + (max(p[3], q[3]) - min(p[1], q[1])) ** 2 + eps
    rho2 = ((q[0] + q[2]) - (p[0] + p[2])) ** 2 / 4 + ((q[1] + q[3]) - (p[1] + p[3])) ** 2 / 4
    v = 4 / math.pi ** 2 * (math.atan((q[2] - q[0]) / (q[3] - q[1] + eps))
                            - math.atan((p[2] - p[0]) / (p[3] - p[1] + eps))) ** 2
    return 1 - (iou - (rho2 / c2 + v * v / (1 - iou + v)))


def test_ciou_eps_is_the_reference_class_default():
    """The VOC recipe's CIoU uses the reference's ``CIoULoss`` class eps (1e-6), not its
    ``ciou_loss`` function default (1e-7); on tiny boxes the two differ visibly."""
    from ldpipe.models.losses import BOX_LOSS, CIOU_EPS, ciou_loss
    assert CIOU_EPS == 1e-6
    boxes = [([0.0, 0.0, 1e-3, 2e-3], [5e-4, 0.0, 1.5e-3, 1e-3]),   # areas ~1e-6: eps ~ the union
             ([1.0, 2.0, 5.0, 4.0], [2.0, 1.0, 6.0, 7.0])]           # ordinary boxes: eps invisible
    pred = torch.tensor([b[0] for b in boxes], dtype=torch.float64)
    target = torch.tensor([b[1] for b in boxes], dtype=torch.float64)
    class_eps = [_ciou_reference_formula(p, q, 1e-6) for p, q in boxes]
    func_eps = [_ciou_reference_formula(p, q, 1e-7) for p, q in boxes]
    assert abs(class_eps[0] - func_eps[0]) > 0.03          # the tiny pair: ~0.04 apart
    assert abs(class_eps[1] - func_eps[1]) < 1e-6
    for got in (BOX_LOSS["ciou"](pred, target), ciou_loss(pred, target)):
        assert got.tolist() == pytest.approx(class_eps, rel=1e-12, abs=1e-12)
    assert ciou_loss(pred, target, eps=1e-7).tolist() == pytest.approx(func_eps, rel=1e-12, abs=1e-12)


def test_gfl_head_loss_no_positives():
    head = _head()
    cls, reg, anchors, strides, _, lw, boxes = _random_case(5, [], seed=3)
    labels = torch.full((5,), 2, dtype=torch.long)
    lw[4] = 0
    cls.requires_grad_(True)
    reg.requires_grad_(True)
    losses, extras = _loss(head, cls, reg, anchors, strides, labels, lw, boxes, 0.0, LossConfig())
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_dfl"].item() == 0.0
    want = (quality_focal_loss(cls.detach(), labels, torch.zeros(5)) * lw).sum() / 1.0
    assert losses["loss_cls"].item() == pytest.approx(want.item(), rel=1e-5)
    assert extras.index.numel() == 0
    sum(losses.values()).backward()
    assert reg.grad is not None and torch.count_nonzero(reg.grad) == 0


def test_bce_on_probabilities_equals_torch_with_its_log_clamp():
    """``_bce_prob`` (GFocalV2's QFL on probabilities, written out to run under autocast)
    equals ``F.binary_cross_entropy`` elementwise, including its clamp of each log at -100
    where a probability is exactly 0 or 1."""
    import torch.nn.functional as F
    from ldpipe.models.losses import _bce_prob
    p = torch.tensor([[0.0, 1e-50, 0.2, 0.5], [0.9, 1.0 - 1e-7, 1.0, 0.3]], dtype=torch.float64)
    t = torch.tensor([[0.0, 1.0, 0.7, 0.5], [1.0, 0.0, 0.4, 0.0]], dtype=torch.float64)
    want = F.binary_cross_entropy(p, t, reduction="none")
    got = _bce_prob(p, t)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    assert got[0, 1] == pytest.approx(100.0) and got[1, 2] == pytest.approx(0.4 * 0 + 0.6 * 100.0)
    with pytest.raises(AssertionError):
        _bce_prob(p, t, reduction="sum")
