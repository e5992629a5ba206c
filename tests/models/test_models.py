"""Model pieces: ATSS / VLR invariants, box coding, shapes, freezing, mmdetection interop."""
from __future__ import annotations

import random

import pytest
import torch
from torchvision.ops import box_iou, distance_box_iou

from helpers import TINY_MODEL as TINY
from helpers import reference_d
from mmdet_layout import mmdet_checkpoint, mmdet_gfl_state_dict  # hand-written mmdet GFL keys
from ldpipe.config import ModelConfig, resolve_model
from ldpipe.config import TestConfig as HeadTestConfig
from ldpipe.models import build_model
from ldpipe.models import image_targets
from ldpipe.models.anchors import grid_anchors, grid_tensors, grid_to_batch_index, level_sizes, make_grid
from ldpipe.models.assigner import atss_assign, vlr_weights
from ldpipe.models.backbone import ResNet
from ldpipe.models.boxes import anchor_centers, bbox2distance, distance2bbox
from ldpipe.models.checkpoint import CheckpointError, load_weights

STRIDES = [8, 16, 32, 64, 128]


def _pos(t) -> torch.Tensor:
    """Own-grid indices of an image's positive anchors."""
    return torch.nonzero(t.labels < t.num_classes).squeeze(1)


PAD = (320, 320)


def random_gts(rng: random.Random, n: int, lo: float = 12.0, hi: float = 200.0) -> torch.Tensor:
    boxes = []
    for _ in range(n):
        w, h = rng.uniform(lo, hi), rng.uniform(lo, hi)
        x, y = rng.uniform(0, 320 - w), rng.uniform(0, 320 - h)
        boxes.append([x, y, x + w, y + h])
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


def grid_320():
    grid = make_grid(PAD, STRIDES, 8.0)
    anchors, _ = grid_tensors(grid)
    return grid, anchors


def reference_positive_sets(anchors: torch.Tensor, num_level: list[int], gt: torch.Tensor,
                            topk: int = 9) -> tuple[list[set[int]], list[float]]:
    """Per GT, on its own (ATSS's per-GT decision): the positive anchors and the threshold.

    Written from the ATSS paper / mmdetection's ATSSAssigner: per level the ``topk``
    anchors of smallest centre distance (ties by index); thr = mean + std (unbiased)
    of their IoUs; positive = IoU >= thr and centre strictly inside (by 0.01).
    """
    centers = anchor_centers(anchors)
    sets, thrs = [], []
    for k in range(gt.shape[0]):
        box = gt[k]
        gc = (box[:2] + box[2:]) / 2
        dist = (centers - gc).pow(2).sum(1).sqrt()
        iou = box_iou(anchors, box[None])[:, 0]
        cand, start = [], 0
        for n in num_level:
            order = sorted(range(start, start + n), key=lambda i: (float(dist[i]), i))
            cand += order[:min(topk, n)]
            start += n
        ious = iou[cand]
        thr = float(ious.mean() + ious.std())
        pos = set()
        for i in cand:
            cx, cy = centers[i].tolist()
            inside = min(cx - box[0].item(), cy - box[1].item(),
                         box[2].item() - cx, box[3].item() - cy) > 0.01
            if iou[i].item() >= thr and inside:
                pos.add(i)
        sets.append(pos)
        thrs.append(thr)
    return sets, thrs


# ------------------------------------------------------------------------ ATSS
@pytest.mark.parametrize("seed", range(6))
def test_atss_invariants_random(seed):
    rng = random.Random(seed)
    grid, anchors = grid_320()
    gt = random_gts(rng, rng.randint(1, 8))
    labels = torch.tensor([rng.randrange(3) for _ in range(gt.shape[0])])
    res = atss_assign(anchors, grid.num_level_anchors, gt, topk=9)
    tg = image_targets(gt, labels, None, PAD, STRIDES, 8.0, 3, topk=9)
    centers = anchor_centers(anchors)
    iou = box_iou(anchors, gt)

    pos = torch.nonzero(res.gt_index > 0).squeeze(1)
    assert torch.equal(_pos(tg), pos)
    assert (res.gt_index >= 0).all()  # no ignore boxes -> nothing ignored
    assert torch.equal(tg.label_weights, torch.ones(grid.num_anchors))
    for a in pos.tolist():
        k = res.gt_index[a].item() - 1
        cx, cy = centers[a].tolist()
        x1, y1, x2, y2 = gt[k].tolist()
        assert x1 < cx < x2 and y1 < cy < y2, "positive anchor centre outside its GT"
        assert tg.labels[a].item() == labels[k].item()
        assert torch.equal(tg.bbox_targets[a], gt[k])
        assert res.max_iou[a].item() == pytest.approx(iou[a, k].item(), abs=1e-6)
    neg = res.gt_index == 0
    assert (tg.labels[neg] == 3).all() and (tg.bbox_targets[neg] == 0).all()
    assert (res.max_iou[neg] == 0).all()

    counts = torch.bincount(res.gt_index[pos] - 1, minlength=gt.shape[0])
    assert (counts <= 9 * len(STRIDES)).all()

    # independent per-GT reference: same thresholds; the union of the per-GT positive
    # sets is positive, each anchor taking the GT of highest IoU among its claimants
    sets, thrs = reference_positive_sets(anchors, grid.num_level_anchors, gt)
    assert res.thr.tolist() == pytest.approx(thrs, rel=1e-5, abs=1e-6)
    sizes = (gt[:, 2:] - gt[:, :2]).min(1).values
    for k, s in enumerate(sets):
        if sizes[k] >= 24:
            assert len(s) >= 1, f"GT {k} ({gt[k].tolist()}) has no positive"
    union = set().union(*sets)
    assert set(pos.tolist()) == union
    for a in union:
        claim = [k for k, s in enumerate(sets) if a in s]
        best = max(iou[a, k].item() for k in claim)
        k = res.gt_index[a].item() - 1
        assert k in claim
        assert iou[a, k].item() == best


def test_atss_higher_iou_gt_wins():
    grid, anchors = grid_320()
    # two heavily overlapping GTs of different size share positives
    gt = torch.tensor([[100.0, 100.0, 164.0, 164.0], [96.0, 96.0, 176.0, 172.0]])
    both = [atss_assign(anchors, grid.num_level_anchors, gt[k:k + 1]) for k in range(2)]
    shared = ((both[0].gt_index > 0) & (both[1].gt_index > 0)).nonzero().squeeze(1)
    assert shared.numel() > 0, "test set-up: the GTs should share positive anchors"
    res = atss_assign(anchors, grid.num_level_anchors, gt)
    iou = box_iou(anchors, gt)
    for a in shared.tolist():
        assert res.gt_index[a].item() - 1 == int(iou[a].argmax())
    # swapping the GT order swaps the indices but not the decision
    swapped = atss_assign(anchors, grid.num_level_anchors, gt.flip(0))
    pos = res.gt_index > 0
    assert torch.equal(swapped.gt_index > 0, pos)
    assert torch.equal(3 - swapped.gt_index[pos], res.gt_index[pos])


def test_atss_independent_of_gt_order():
    """The targets of an image do not depend on the order its GTs are listed in (the dump
    and the student may read annotations in different orders)."""
    rng = random.Random(11)
    gt = random_gts(rng, 6)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    a = image_targets(gt, labels, None, PAD, STRIDES, 8.0, 3, with_vlr=True)
    perm = torch.tensor([4, 2, 5, 0, 3, 1])
    b = image_targets(gt[perm], labels[perm], None, PAD, STRIDES, 8.0, 3, with_vlr=True)
    assert _pos(a).numel() > 6 and (a.vlr > 0).sum() > 6
    for name in ("labels", "label_weights", "bbox_targets", "vlr"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_atss_ties_broken_by_index():
    # one level 4x4 (stride 8); the GT centre (12, 12) is equidistant from the anchors at
    # (8,8), (16,8), (8,16), (16,16) = flat indices 5, 6, 9, 10.  topk=2 takes 5 and 6;
    # their IoUs are equal, so thr = that IoU and both are positive.
    anchors, _ = grid_anchors([(4, 4)], [8], 8.0)
    gt = torch.tensor([[0.0, 0.0, 24.0, 24.0]])
    res = atss_assign(anchors, [16], gt, topk=2)
    assert (res.gt_index > 0).nonzero().squeeze(1).tolist() == [5, 6]
    res = atss_assign(anchors, [16], gt, topk=3)
    assert (res.gt_index > 0).nonzero().squeeze(1).tolist() == [5, 6, 9]


@pytest.mark.parametrize("seed", range(4))
def test_atss_candidates_equal_a_full_stable_sort(seed):
    from ldpipe.models.assigner import _candidates
    gen = torch.Generator().manual_seed(seed)
    levels = [60, 17, 5]
    d = torch.randint(0, 6, (sum(levels), 4), generator=gen).float()  # many ties
    d[torch.rand(d.shape, generator=gen) < 0.1] = float("inf")  # ignored anchors
    want, start = [], 0
    for n in levels:
        k = min(9, n)
        want.append(torch.sort(d[start:start + n], dim=0, stable=True).indices[:k] + start)
        start += n
    assert torch.equal(_candidates(d, levels, 9), torch.cat(want))


def test_atss_no_gt():
    grid, anchors = grid_320()
    res = atss_assign(anchors, grid.num_level_anchors, torch.zeros(0, 4))
    assert (res.gt_index == 0).all() and res.thr.numel() == 0
    tg = image_targets(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), None, PAD, STRIDES,
                       8.0, 3, with_vlr=True)
    assert _pos(tg).numel() == 0
    assert (tg.labels == 3).all() and (tg.label_weights == 1).all()
    assert (tg.vlr == 0).all()


def test_atss_ignore_boxes():
    grid, anchors = grid_320()
    gt = torch.tensor([[20.0, 20.0, 100.0, 90.0]])
    ignore = torch.tensor([[180.0, 170.0, 300.0, 310.0]])
    labels = torch.tensor([1])
    tg = image_targets(gt, labels, ignore, PAD, STRIDES, 8.0, 3, ignore_iof_thr=0.5)
    a = anchors
    lt = torch.max(a[:, :2], ignore[:, :2])
    rb = torch.min(a[:, 2:], ignore[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    iof = inter / (a[:, 2:] - a[:, :2]).prod(1)
    covered = iof > 0.5
    assert covered.sum() > 10
    assert (tg.label_weights[covered] == 0).all()
    assert (tg.label_weights[~covered] == 1).all()
    assert (tg.labels[covered] == 3).all()
    # positives are the same as without the ignore box (it is far from the GT)
    plain = image_targets(gt, labels, None, PAD, STRIDES, 8.0, 3)
    assert torch.equal(_pos(plain), _pos(tg))
    # ignore boxes have no effect unless ignore_iof_thr > 0
    off = image_targets(gt, labels, ignore, PAD, STRIDES, 8.0, 3, ignore_iof_thr=-1.0)
    assert (off.label_weights == 1).all()


# ------------------------------------------------------------------------- VLR


@pytest.mark.parametrize("region", ["reference", "diou"])
@pytest.mark.parametrize("seed", range(3))
def test_vlr_region(seed, region):
    rng = random.Random(100 + seed)
    grid, anchors = grid_320()
    gt = random_gts(rng, rng.randint(1, 6), lo=16)
    res = atss_assign(anchors, grid.num_level_anchors, gt)
    w = vlr_weights(anchors, gt, res.thr, region=region)
    tg = image_targets(gt, torch.zeros(gt.shape[0], dtype=torch.long), None, PAD, STRIDES, 8.0, 1,
                       with_vlr=True, vlr_region=region)
    assert torch.equal(tg.vlr, w)
    iou = box_iou(anchors, gt)
    diou = reference_d(anchors, gt) if region == "reference" else distance_box_iou(anchors, gt)
    thr = res.thr[None]
    region = (diou >= 0.25 * thr) & (diou < thr)
    assert (w > 0).any()
    for a in range(anchors.shape[0]):
        ks = region[a].nonzero().squeeze(1).tolist()
        if not ks:
            assert w[a].item() == 0.0
            continue
        # weight = the IoU with a GT whose region holds the anchor (the highest such IoU)
        assert w[a].item() == max(iou[a, k].item() for k in ks)
        k = max(ks, key=lambda j: iou[a, j].item())
        assert 0.25 * res.thr[k] <= diou[a, k] < res.thr[k]
        assert 0 < w[a] <= 1


def test_vlr_definitions_differ():
    """The reference's definition (intersection over the anchor's area) admits more anchors
    than true DIoU: the anchor-area ratio is >= the IoU."""
    rng = random.Random(7)
    grid, anchors = grid_320()
    gt = random_gts(rng, 5, lo=16)
    res = atss_assign(anchors, grid.num_level_anchors, gt)
    ref = vlr_weights(anchors, gt, res.thr, region="reference") > 0
    true = vlr_weights(anchors, gt, res.thr, region="diou") > 0
    assert ref.sum() > true.sum() > 0 and not torch.equal(ref, true)
    with pytest.raises(ValueError, match="unknown VLR region"):
        vlr_weights(anchors, gt, res.thr, region="giou")


# ------------------------------------------------------------------- box coding
def test_bbox_distance_round_trip():
    g = torch.Generator().manual_seed(0)
    pts = torch.rand(50, 2, generator=g) * 20
    d = torch.rand(50, 4, generator=g) * 15.8
    boxes = torch.cat([pts - d[:, :2], pts + d[:, 2:]], 1)
    enc = bbox2distance(pts, boxes, max_dis=16)
    assert torch.allclose(enc, d, atol=1e-5)
    assert torch.allclose(distance2bbox(pts, enc), boxes, atol=1e-5)
    assert torch.allclose(bbox2distance(pts, boxes), d, atol=1e-5)
    # outside the clamp range: distances saturate at [0, max_dis - 0.1]
    far = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    p = torch.tensor([[50.0, 5.0]])
    assert bbox2distance(p, far, max_dis=16)[0].tolist() == pytest.approx([15.9, 5.0, 15.9, 15.9])
    behind = torch.tensor([[60.0, 0.0, 70.0, 10.0]])  # point left of the box: l < 0 -> 0
    assert bbox2distance(p, behind, max_dis=16)[0, 0].item() == 0.0
    # decoding with max_shape clips to the image
    out = distance2bbox(torch.tensor([[5.0, 5.0]]), torch.tensor([[10.0, 1.0, 100.0, 2.0]]), (20, 30))
    assert out.tolist() == [[0.0, 4.0, 30.0, 7.0]]


def test_grid_anchors_and_level_sizes():
    anchors, strides = grid_anchors([(2, 3), (1, 2)], [8, 16], 8.0)
    assert anchors.shape == (8, 4)
    assert strides.tolist() == [8.0] * 6 + [16.0] * 2
    c = anchor_centers(anchors)
    want = [(x * 8, y * 8) for y in range(2) for x in range(3)] + [(0, 0), (16, 0)]
    assert c.tolist() == [[float(x), float(y)] for x, y in want]
    side = anchors[:, 2:] - anchors[:, :2]
    assert side[:6].eq(64).all() and side[6:].eq(128).all()
    assert level_sizes((100, 130), STRIDES) == [(13, 17), (7, 9), (4, 5), (2, 3), (1, 2)]
    assert level_sizes((320, 320), STRIDES) == [(40, 40), (20, 20), (10, 10), (5, 5), (3, 3)]
    grid, a320 = grid_320()
    assert grid.num_anchors == a320.shape[0] == 1600 + 400 + 100 + 25 + 9


def test_grid_to_batch_index():
    own = [(2, 3), (1, 2)]
    batch = [(3, 4), (2, 2)]
    idx = grid_to_batch_index(own, batch)
    assert idx.tolist() == [0, 1, 2, 4, 5, 6, 12, 13]
    # positions keep their meaning: the same anchor on both grids
    a_own, _ = grid_anchors(own, [8, 16], 8.0)
    a_batch, _ = grid_anchors(batch, [8, 16], 8.0)
    assert torch.equal(a_batch[idx], a_own)
    with pytest.raises(ValueError):
        grid_to_batch_index([(4, 3)], [(3, 4)])


# --------------------------------------------------------------- model forward
@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    cfg = resolve_model(ModelConfig(**TINY, test=HeadTestConfig(score_thr=0.0, max_per_img=7)))
    model = build_model(cfg, 3).eval()
    with torch.no_grad():  # spread the scores so that NMS has work to do
        model.bbox_head.gfl_cls.weight.normal_(0, 0.5)
        model.bbox_head.gfl_reg.weight.normal_(0, 0.5)
    return model


def test_forward_shapes_and_predict(tiny_model):
    img = torch.randn(2, 3, 96, 128)
    out = tiny_model(img)
    sizes = [(12, 16), (6, 8), (3, 4), (2, 2), (1, 1)]
    assert out.level_sizes == sizes == level_sizes((96, 128), STRIDES)
    n = sum(h * w for h, w in sizes)
    assert out.cls.shape == (2, n, 3) and out.cls.dtype == torch.float32
    assert out.reg.shape == (2, n, 4, 17) and out.reg.dtype == torch.float32
    # batch-flat rows are the per-level maps flattened level by level, row-major
    cls_maps, reg_maps = tiny_model.bbox_head(tiny_model.neck(tiny_model.backbone(img)[1:]))
    level = out.level_slices()[1]
    assert torch.equal(out.cls[1, level], cls_maps[1][1].permute(1, 2, 0).reshape(-1, 3))
    assert torch.equal(out.reg[1, level], reg_maps[1][1].permute(1, 2, 0).reshape(-1, 4, 17))
    shapes = [(96, 128), (70, 90)]
    out = tiny_model.predict(img, shapes)
    assert len(out) == 2
    for res, (h, w) in zip(out, shapes):
        boxes = res["boxes"]
        assert 0 < boxes.shape[0] <= 7
        assert res["scores"].shape == res["labels"].shape == (boxes.shape[0],)
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        assert (boxes[:, 2:] >= boxes[:, :2]).all()
        assert ((res["labels"] >= 0) & (res["labels"] < 3)).all()
        assert (res["scores"][:-1] >= res["scores"][1:]).all()


def test_one_channel_groups_on_a_1x1_level():
    """A 16-channel head has 16 GroupNorm groups of one channel; one 64-px image makes P7
    1x1, a group of one value: the head runs (torch's GroupNorm refuses) and gives what the
    formula gives there, the bias; elsewhere it equals torch's GroupNorm."""
    from ldpipe.models.gfl_head import GroupNorm
    cfg = resolve_model(ModelConfig(depth=18, base_channels=8, channels=16, stacked_convs=2))
    model = build_model(cfg, 3).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 64))
    assert out.level_sizes[-1] == (1, 1) and torch.isfinite(out.cls).all() and torch.isfinite(out.reg).all()
    gn = GroupNorm(16, 16)
    torch.nn.init.normal_(gn.weight)
    torch.nn.init.normal_(gn.bias)
    x = torch.randn(1, 16, 1, 1, requires_grad=True)
    y = gn(x)
    assert torch.equal(y, gn.bias.view(1, 16, 1, 1).expand_as(y))
    y.sum().backward()  # the graph stays connected
    z = torch.randn(2, 16, 3, 3)
    ref = torch.nn.GroupNorm(16, 16)
    ref.load_state_dict(gn.state_dict())
    assert torch.equal(gn(z), ref(z))


def test_backbone_freezing():
    net = ResNet(18, 8, frozen_stages=1)
    net.train()
    frozen = [net.conv1, net.bn1, net.layer1]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for m in (net.layer2, net.layer3, net.layer4) for p in m.parameters())
    assert not net.bn1.training
    bns = lambda m: [x for x in m.modules() if isinstance(x, torch.nn.BatchNorm2d)]  # noqa: E731
    assert all(not b.training for b in bns(net.layer1))
    assert all(b.training for b in bns(net.layer2))
    net.eval().train()  # toggling back keeps them frozen
    assert not net.bn1.training and all(not b.training for b in bns(net.layer1))
    # frozen BN statistics do not move in training mode
    before = net.bn1.running_mean.clone()
    net(torch.randn(2, 3, 64, 64) * 5 + 3)
    assert torch.equal(net.bn1.running_mean, before)
    # norm_eval: every BN in eval mode
    ne = ResNet(18, 8, frozen_stages=-1, norm_eval=True).train()
    assert all(not b.training for b in bns(ne))
    assert all(p.requires_grad for p in ne.parameters())
    free = ResNet(18, 8).train()
    assert all(b.training for b in bns(free))


def test_pretrained_backbone_freezes_stem_and_layer1(tmp_path):
    src = ResNet(18, 8)
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    sd["fc.weight"] = torch.zeros(10, 64)
    sd["fc.bias"] = torch.zeros(10)
    path = str(tmp_path / "r18.pth")
    torch.save(sd, path)
    model = build_model(resolve_model(ModelConfig(**TINY, pretrained=path)), 3).train()
    for k, v in src.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[k], v)
    assert not model.backbone.conv1.weight.requires_grad
    assert not any(p.requires_grad for p in model.backbone.layer1.parameters())
    assert all(p.requires_grad for p in model.backbone.layer2.parameters())
    assert not model.backbone.layer3[0].bn1.training  # norm_eval with pretrained weights


# ------------------------------------------------------------ mmdetection interop


def test_mmdet_r50_gfl_checkpoint_loads_strictly(tmp_path):
    sd = mmdet_gfl_state_dict()
    # spot-check the hand-built names against mmdetection's well-known shapes
    assert sd["backbone.layer1.0.conv3.weight"].shape == (256, 64, 1, 1)
    assert sd["backbone.layer4.2.conv2.weight"].shape == (512, 512, 3, 3)
    assert sd["backbone.layer3.0.downsample.0.weight"].shape == (1024, 512, 1, 1)
    assert sd["neck.lateral_convs.2.conv.weight"].shape == (256, 2048, 1, 1)
    assert sd["bbox_head.gfl_reg.weight"].shape == (68, 256, 3, 3)
    assert sd["bbox_head.scales.0.scale"].shape == ()
    path = str(tmp_path / "gfl_r50_bccd.pth")
    torch.save(mmdet_checkpoint(sd), path)

    model = build_model(resolve_model(ModelConfig()), 3)
    assert set(model.state_dict()) == set(sd)
    meta = load_weights(model, path)
    assert meta["CLASSES"] == ("RBC", "WBC", "Platelets") and meta["epoch"] == 12
    own = model.state_dict()
    for k, v in sd.items():
        assert own[k].dtype == v.dtype, k
        assert torch.equal(own[k], v), k


def test_mmdet_r18_checkpoint_loads_and_wrong_classes_refused(tmp_path):
    sd = mmdet_gfl_state_dict(depth=18, width=8, channels=16, stacked=1, num_classes=3)
    ok = str(tmp_path / "ok.pth")
    torch.save(mmdet_checkpoint(sd), ok)
    model = build_model(resolve_model(ModelConfig(**TINY)), 3)
    assert set(model.state_dict()) == set(sd)
    load_weights(model, ok)
    assert torch.equal(model.bbox_head.gfl_cls.weight, sd["bbox_head.gfl_cls.weight"])

    bad = str(tmp_path / "four_classes.pth")
    torch.save(mmdet_checkpoint(mmdet_gfl_state_dict(18, 8, 16, 1, num_classes=4)), bad)
    with pytest.raises(CheckpointError) as err:
        load_weights(build_model(resolve_model(ModelConfig(**TINY)), 3), bad)
    msg = str(err.value)
    assert "shape mismatch" in msg and "gfl_cls" in msg and bad in msg

    # a missing key is named too (e.g. an mmdet head without the integral buffer)
    partial = {k: v for k, v in sd.items() if k != "bbox_head.integral.project"}
    miss = str(tmp_path / "missing.pth")
    torch.save({"state_dict": partial}, miss)
    with pytest.raises(CheckpointError, match="integral.project"):
        load_weights(build_model(resolve_model(ModelConfig(**TINY)), 3), miss)


class NotATensor:
    """A class the checkpoint loader must not instantiate."""

    def __init__(self) -> None:
        self.x = 1


def test_checkpoint_with_pickled_objects_refused(tmp_path):
    sd = mmdet_gfl_state_dict(depth=18, width=8, channels=16, stacked=1)
    path = str(tmp_path / "objects.pth")
    torch.save({"state_dict": sd, "message_hub": NotATensor()}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_weights(build_model(resolve_model(ModelConfig(**TINY)), 3), path)


def test_checkpoint_missing_file(tmp_path):
    path = str(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="nope.pth"):
        load_weights(build_model(resolve_model(ModelConfig(**TINY)), 3), path)
