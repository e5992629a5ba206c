"""A teacher at 2^k x its student's input (``cache.teacher_upscale``): the geometry, constructed.

The claim the cache rests on: for a teacher run on the student's input upscaled by ``f = 2^k``
(padded to ``f`` x the student's padded shape), the teacher's level of stride ``f s`` has the
student's stride-``s`` grid, its anchors are the student's times ``f``, and a GT box's edge
targets in bins (distances over the stride) are the student's.  Checked here on anchors made by
``models.anchors``, the ATSS targets of ``models.targets`` and the distance encoding GFL's loss
uses, and on the feature maps of a real network; then the settings' refusals.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import tiny_model_config
from ldpipe.cache.upscale import Upscale, entry_problem, level_map
from ldpipe.config import ConfigError, DataConfig, resolve_model
from ldpipe.data.transforms import Variant, make_sample
from ldpipe.data.upscale import teacher_input
from ldpipe.models import build_model
from ldpipe.models.anchors import grid_tensors, make_grid
from ldpipe.models.boxes import anchor_centers, bbox2distance
from ldpipe.models.targets import image_targets

STRIDES = (8, 16, 32, 64, 128)
SCALE = 8.0
REG_MAX = 16


def _plan(factor: int) -> Upscale:
    return Upscale(factor, STRIDES, SCALE, STRIDES, level_map(STRIDES, STRIDES, factor))


@pytest.mark.parametrize("factor", [2, 4])
@pytest.mark.parametrize("pad", [(96, 128), (160, 224)])
def test_student_anchors_are_the_teachers_over_the_factor(factor, pad):
    """Kills: a teacher pad that is not ``f`` x the student's, an off-by-one level map, a wrong
    flat offset in ``Upscale.teacher_index``.  Every served student anchor (level l, y, x) equals
    its counterpart's teacher anchor (level l+k, y, x) divided by ``f``, box and stride."""
    plan = _plan(factor)
    k = factor.bit_length() - 1
    assert plan.levels == tuple(list(range(k, len(STRIDES))) + [None] * k)
    s_anchors, s_strides = grid_tensors(make_grid(pad, STRIDES, SCALE))
    t_anchors, t_strides = grid_tensors(make_grid(plan.teacher_pad(pad), STRIDES, SCALE))
    n = plan.served_count(pad)
    idx = plan.teacher_index(pad)
    assert idx.shape == (n,) and n == sum(h * w for h, w in make_grid(pad, STRIDES, SCALE).sizes[:-k])
    assert torch.equal(s_anchors[:n], t_anchors[idx] / factor)
    assert torch.equal(s_strides[:n], t_strides[idx] / factor)
    # the stored rows are a prefix: the student's top k levels are exactly what is left out
    assert set(s_strides[n:].tolist()) == set(STRIDES[-k:])


def test_gt_edge_targets_in_bins_agree_across_resolutions():
    """Kills: edge targets that are not in stride units, or a teacher frame that is not exactly
    ``f`` x the student's.  A GT box in the student's frame and the same box times 2 in the
    teacher's: at every served anchor the GFL distance targets (bins) are equal, on the ATSS
    positives and on every anchor."""
    pad = (128, 160)
    plan = _plan(2)
    gt = torch.tensor([[13.0, 21.5, 61.25, 90.0], [70.0, 8.0, 150.5, 40.75]])
    labels = torch.tensor([0, 1])
    s = image_targets(gt, labels, None, pad, STRIDES, SCALE, 2)
    t = image_targets(gt * 2, labels, None, plan.teacher_pad(pad), STRIDES, SCALE, 2)
    n, idx = plan.served_count(pad), plan.teacher_index(pad)
    s_anchors, s_strides = grid_tensors(s.grid)
    t_anchors, t_strides = grid_tensors(t.grid)

    def bins(anchors, strides, box):
        st = strides[:, None]
        return bbox2distance(anchor_centers(anchors) / st, box / st, REG_MAX)

    for g in range(len(gt)):
        got_s = bins(s_anchors[:n], s_strides[:n], gt[g].expand(n, 4))
        got_t = bins(t_anchors[idx], t_strides[idx], (gt[g] * 2).expand(n, 4))
        assert torch.equal(got_s, got_t)
        assert (got_s > 0).any() and (got_s < REG_MAX - 0.1).any()  # not all clamped
    # the student's positives' targets, read at their teacher counterparts
    pos = torch.nonzero(s.labels[:n] < 2).squeeze(1)
    assert pos.numel() > 0
    own = bins(s_anchors[pos], s_strides[pos], s.bbox_targets[pos])
    mate = bins(t_anchors[idx[pos]], t_strides[idx[pos]], s.bbox_targets[pos] * 2)
    assert torch.equal(own, mate)


def test_network_feature_grids_line_up_only_with_the_factor_pad():
    """Kills: padding the teacher's input to ``data.pad_divisor`` alone.  On a 100 x 75 image
    (student pad 128 x 96), the teacher's feature maps at levels 1.. on the 256 x 192 input equal
    the student's grid at levels 0..; padded to 32 only (224 x 160) they do not."""
    cfg = resolve_model(tiny_model_config())
    net = build_model(cfg, 2).eval()
    plan = _plan(2)
    student = make_grid((128, 96), cfg.strides, cfg.anchor_scale).sizes
    with torch.no_grad():
        good = net(torch.zeros(1, 3, *plan.teacher_pad((128, 96)))).level_sizes
        bad = net(torch.zeros(1, 3, 224, 160)).level_sizes
    assert [tuple(x) for x in good[1:]] == list(student[:-1])
    assert [tuple(x) for x in bad[1:]] != list(student[:-1])


def test_teacher_input_is_the_students_frame_times_the_factor():
    """Kills: a keep-ratio resize at 2x the scale (off by a pixel), a lost flip, other padding.
    At factor 1 the teacher's input is the student's tensor bit for bit; at 2 it is the original
    resized to exactly 2 x the student's image shape, flipped alike, padded to 2 x its pad."""
    from ldpipe.data.records import Record
    rng = np.random.default_rng(0)
    image = (rng.random((75, 101, 3)) * 255).astype(np.uint8)
    rec = Record(image_id=1, file_name="x.jpg", width=101, height=75,
                 boxes=np.array([[10, 10, 50, 40]], np.float32), labels=np.array([0]),
                 ignore=np.zeros((0, 4), np.float32))
    d = DataConfig(train_scales=[[133, 67]], pad_divisor=32)
    for flip in (False, True):
        sample = make_sample(rec, image, Variant(0, flip), d)
        meta = sample["meta"]
        assert torch.equal(teacher_input(image, meta, 1, d), sample["img"])
        big = teacher_input(image, meta, 2, d)
        (h, w), (ph, pw) = meta.img_shape, meta.pad_shape
        assert big.shape == (3, 2 * ph, 2 * pw)
        assert (big[:, 2 * h:, :] == 0).all() and (big[:, :, 2 * w:] == 0).all()
        assert (big[:, :2 * h, :2 * w] != 0).any(dim=0).float().mean() > 0.99
        # flipped: the left column of the flipped input is the right column of the unflipped one
        if flip:
            plain = teacher_input(image, make_sample(rec, image, Variant(0, False), d)["meta"], 2, d)
            assert torch.equal(big[:, :2 * h, 0], plain[:, :2 * h, 2 * w - 1])


def test_level_map_refusals():
    """Kills: silently storing rows for levels without a counterpart, or a middle level skipped."""
    assert level_map(STRIDES, STRIDES, 8) == (3, 4, None, None, None)
    assert level_map(STRIDES, STRIDES, 16) == (4, None, None, None, None)
    with pytest.raises(ConfigError, match="has no level of stride 32 x any"):
        level_map(STRIDES, STRIDES, 32)
    with pytest.raises(ConfigError, match="only the student's top levels"):
        level_map(STRIDES, (16, 64, 128), 2)


@pytest.mark.parametrize("entry, field", [
    ({"factor": 3, "teacher_strides": list(STRIDES), "levels": [1, 2, 3, 4, None]}, "factor"),
    ({"factor": 2, "teacher_strides": [], "levels": [1, 2, 3, 4, None]}, "teacher_strides"),
    ({"factor": 2, "teacher_strides": list(STRIDES), "levels": [0, 1, 2, 3, None]}, "levels"),
    ({"factor": 2, "teacher_strides": list(STRIDES), "levels": [1, 2, 3, None, None]}, "levels"),
    ({"factor": 2, "teacher_strides": list(STRIDES), "levels": [1, 2, 3, 4]}, "levels"),
])
def test_malformed_manifest_entries_are_named(entry, field):
    """Kills: a damaged ``teacher_upscale`` entry read as a valid level map."""
    assert entry_problem(entry, list(STRIDES))[0] == f"teacher_upscale.{field}"
    good = {"factor": 2, "teacher_strides": list(STRIDES), "levels": [1, 2, 3, 4, None]}
    assert entry_problem(good, list(STRIDES)) is None
