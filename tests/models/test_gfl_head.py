"""Hand-computed guards on the core's numbers (issue 12, "tests first").

Each test here was written to fail on a plausible bug that the rest of the suite let
through (the bug is named in the test's docstring); they use public functions only.
"""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou, distance_box_iou

from ldpipe.cache import codec as C
from ldpipe.config import TestConfig as HeadTestConfig
from ldpipe.config import load_pipeline
from ldpipe.data import SampleMeta, boxes_to_original
from ldpipe.metrics import voc_map
from ldpipe.engine.train import Schedule
from ldpipe.models import build_model
from ldpipe.models.anchors import grid_tensors, make_grid
from ldpipe.models.assigner import atss_assign, vlr_weights
from ldpipe.models.detector import DenseOutput, flatten_levels
from ldpipe.models.gfl_head import GFLHead


class _Rec:
    def __init__(self, image_id, boxes, labels, ignore=()):
        self.image_id, self.file_name, self.width, self.height = image_id, f"{image_id}.jpg", 640, 480
        self.boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        self.labels = np.asarray(labels, np.int64)
        self.ignore = np.asarray(ignore, np.float32).reshape(-1, 4)


def _det(image_id, boxes, scores, labels):
    return {"image_id": image_id, "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
            "scores": np.asarray(scores, np.float32), "labels": np.asarray(labels, np.int64)}


# ------------------------------------------------------------------------ VOC mAP
def test_voc_map_two_images_unsorted_detections():
    """Kills: dropping either score sort of ``voc_map`` (the per-image matching order, or
    the per-class ranking across images).  Detections are given in non-descending score
    order, and the ranking must interleave the two images."""
    a, b, c = (0, 0, 100, 100), (200, 200, 300, 300), (400, 0, 500, 100)
    records = [_Rec(1, [a, c], [0, 1]), _Rec(2, [b], [0])]
    dets = [
        # image 1: a duplicate pair on A, the lower score first; a TP on C (class 1)
        _det(1, [(2, 2, 100, 100), (0, 0, 100, 98), c], [0.3, 0.9, 0.5], [0, 0, 1]),
        # image 2: a FP (no overlap) first, then the TP on B
        _det(2, [(0, 300, 50, 350), b], [0.8, 0.6], [0, 0]),
    ]
    # class 0, ranked over both images: 0.9 TP (img 1) | 0.8 FP (img 2) | 0.6 TP (img 2) |
    # 0.3 FP (img 1, duplicate: the 0.9 one matched A first)
    #   recall .5 1/1 ; .5 1/2 ; 1 2/3 ; 1 2/4  -> envelope 1 on (0,.5], 2/3 on (.5,1]
    #   AP = .5 + .5 * 2/3 = 5/6.  (Matching in the given order makes the 0.3 one the TP
    #   and gives 1/2; ranking in image order gives 1/2 as well.)
    r = voc_map(records, ["x", "y"], dets)
    assert r["per_class"]["x"]["AP"] == pytest.approx(5 / 6, abs=1e-9)
    assert r["per_class"]["x"]["num_gts"] == 2 and r["per_class"]["x"]["num_dets"] == 4
    assert r["per_class"]["y"]["AP"] == pytest.approx(1.0)
    assert r["mAP"] == pytest.approx((5 / 6 + 1) / 2, abs=1e-9)
    # 11 points: t = 0..0.5 -> 1, t = 0.6..1 -> 2/3
    r = voc_map(records, ["x", "y"], dets, mode="11points")
    assert r["per_class"]["x"]["AP"] == pytest.approx((6 + 5 * 2 / 3) / 11, abs=1e-9)


# -------------------------------------------------------------------------- int8 codec
def _ld(t: torch.Tensor, s: torch.Tensor, T: float = 10.0) -> float:
    lt, ls = torch.log_softmax(t.double() / T, -1), torch.log_softmax(s.double() / T, -1)
    return float((lt.exp() * (lt - ls)).sum(-1).mean())


def test_int8_error_is_at_most_half_a_step():
    """Kills: rounding replaced by floor (or truncation) in the int8 encoder.  Rounding to
    the nearest of 256 levels of the stored fp16 step ``s`` errs by at most ``s / 2``; the
    row minimum, clamped at 255 when the fp16 step rounded down, errs by at most
    ``255 * s * 2**-11 < s / 8``."""
    gen = torch.Generator().manual_seed(1)
    lp = C.log_probs(torch.randn(2000, 4, 17, generator=gen) * 8.0)
    enc = C.encode(lp, "int8")
    assert enc.values.dtype == np.uint8 and enc.scale.dtype == np.float16
    dec = C.decode(enc.values, enc.scale, "int8")
    step = torch.from_numpy(enc.scale).float()[..., None]
    x = lp.clamp(min=-C.CLIP)
    err = (dec - x).abs()
    assert (err <= step / 2 * (1 + 1e-5) + 1e-7).all(), float((err / step).max())
    # the step is the row's range over 255 (to fp16 precision); every row uses level 255
    want = (-x.min(dim=-1).values / 255.0)[..., None]
    assert ((step - want).abs() <= want * 2 ** -10).all()
    assert (torch.from_numpy(enc.values).amax(dim=-1) == 255).all()
    # the LD loss against a student far from the teacher moves by ~5e-4 relative (floor: 3e-3)
    student = torch.randn(lp.shape, generator=gen) * 3.0
    ref = _ld(lp.reshape(-1, 17), student.reshape(-1, 17))
    got = _ld(dec.reshape(-1, 17), student.reshape(-1, 17))
    assert abs(got - ref) / ref <= 1e-3, (ref, got)


def test_int8_known_values():
    """A row with minimum -2.55 has step 0.01 (fp16-rounded); values round to the nearest level."""
    lp = torch.tensor([[0.0, -0.004, -0.006, -1.0049, -2.55]])
    enc = C.encode(lp, "int8")
    s = float(np.float16(2.55 / 255))
    assert float(enc.scale[0]) == s
    assert enc.values[0].tolist() == [0, round(0.004 / s), round(0.006 / s), round(1.0049 / s), 255]
    assert enc.values[0].tolist()[:3] == [0, 0, 1]


# ------------------------------------------------------------------------------- VLR
def _vlr_reference(anchors, gt, thr, region, low=0.25):
    """Brute force over every anchor: the highest IoU among GTs whose VLR holds the anchor."""
    from test_models import _reference_d
    iou = box_iou(anchors, gt)
    diou = _reference_d(anchors, gt) if region == "reference" else distance_box_iou(anchors, gt)
    inside = (diou >= low * thr[None]) & (diou < thr[None])
    return torch.where(inside, iou, torch.zeros_like(iou)).max(dim=1).values, inside


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
    want, inside = _vlr_reference(anchors, gt, res.thr, region)
    small = (gt[:, 2:] - gt[:, :2]).max(dim=1).values < 16
    assert inside[:, small].any(dim=0).sum() >= 3, "set-up: most small boxes have a VLR"
    assert (box_iou(anchors, gt)[inside[:, :5].any(1)] < 0.01).any(), "set-up: tiny overlaps"
    got = vlr_weights(anchors, gt, res.thr, overlaps=res.overlaps, region=region)
    assert torch.allclose(got, want, rtol=0, atol=1e-6) and torch.equal(got > 0, want > 0)
    assert torch.equal(vlr_weights(anchors, gt, res.thr, region=region), got)  # overlaps inside


# ------------------------------------------------------------------------ lr schedule
def test_schedule_warmup_and_steps_by_hand():
    """mmdetection's linear warm-up from ``warmup_ratio`` and step decay, values by hand."""
    s = Schedule(base_lr=0.1, warmup_iters=10, warmup_ratio=0.001, steps=[3, 5], gamma=0.1)
    assert s.lr(0, 0) == pytest.approx(0.1 * 0.001, rel=1e-12)
    # k = (1 - 5/10) * (1 - 0.001) = 0.4995 -> 0.1 * 0.5005
    assert s.lr(0, 5) == pytest.approx(0.05005, rel=1e-12)
    assert s.lr(0, 9) == pytest.approx(0.1 * (1 - 0.1 * 0.999), rel=1e-12)
    assert s.lr(0, 10) == 0.1 and s.lr(2, 500) == 0.1
    assert s.lr(3, 500) == pytest.approx(0.01, rel=1e-12)  # first step at epoch 3
    assert s.lr(4, 500) == pytest.approx(0.01, rel=1e-12)
    assert s.lr(5, 500) == pytest.approx(0.001, rel=1e-12)  # second step
    assert s.lr(11, 500) == pytest.approx(0.001, rel=1e-12)
    # warm-up scales the decayed lr when a step falls inside it
    assert s.lr(3, 5) == pytest.approx(0.01 * 0.5005, rel=1e-12)
    no_warmup = Schedule(0.02, 0, 0.001, [1], 0.5)
    assert no_warmup.lr(0, 0) == 0.02 and no_warmup.lr(1, 0) == 0.01


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
    pipe = load_pipeline(__file__.rsplit("/tests/", 1)[0] + "/pipelines/demo.toml",
                         ["models.student.depth=18", "models.student.base_channels=8",
                          "models.student.channels=16", "models.student.stacked_convs=1"])
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


# ---------------------------------------------------------------------- region policies
def test_region_index_policies_by_brute_force():
    """Which anchors each cache region keeps, against references computed here: ``main`` the
    union of the ATSS positives of every reader's assigner, ``ld`` adds the VLR (brute force),
    ``overlap`` every anchor with IoU > 0, ``dense`` all."""
    from ldpipe.cache.region import region_index
    from ldpipe.config import AssignerConfig
    rng = random.Random(5)
    pad, strides = (192, 256), [8, 16, 32, 64, 128]
    grid = make_grid(pad, strides, 8.0)
    anchors, _ = grid_tensors(grid)
    boxes = []
    for side in (6, 20, 50, 120):
        x, y = rng.uniform(0, 250 - side), rng.uniform(0, 190 - side)
        boxes.append([x, y, x + side, y + side * 0.8])
    gt = torch.tensor(boxes)
    specs = [AssignerConfig(9, -1.0), AssignerConfig(12, -1.0)]
    pos = torch.zeros(anchors.shape[0], dtype=torch.bool)
    vlr = torch.zeros_like(pos)
    for spec in specs:
        res = atss_assign(anchors, grid.num_level_anchors, gt, topk=spec.topk)
        pos |= res.gt_index > 0
        vlr |= _vlr_reference(anchors, gt, res.thr, spec.vlr_region)[0] > 0
    only9 = atss_assign(anchors, grid.num_level_anchors, gt, topk=9).gt_index > 0
    assert not torch.equal(pos, only9), "set-up: the second assigner adds positives"

    def idx(mask):
        return torch.nonzero(mask).squeeze(1)

    got = {p: region_index(p, gt, None, pad, strides, 8.0, specs) for p in ("main", "ld", "overlap", "dense")}
    assert torch.equal(got["main"], idx(pos))
    assert torch.equal(got["ld"], idx(pos | vlr)) and got["ld"].numel() > got["main"].numel()
    assert torch.equal(got["overlap"], idx((box_iou(anchors, gt) > 0).any(dim=1)))
    assert torch.equal(got["dense"], torch.arange(grid.num_anchors))
    assert all(v.dtype == torch.int64 for v in got.values())
    # no assigners given: the default ATSS (topk 9)
    assert torch.equal(region_index("main", gt, None, pad, strides, 8.0, []), idx(only9))
    assert region_index("main", torch.zeros(0, 4), None, pad, strides, 8.0, specs).numel() == 0
    with pytest.raises(ValueError, match="policy"):
        region_index("everything", gt, None, pad, strides, 8.0, specs)
