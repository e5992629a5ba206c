"""Which anchors each cache region keeps (``ldpipe.cache.region.region_index``), against
references computed here.  Regions of a dumped cache are in ``test_cache.py``.

A hand-computed guard of issue 12 ("tests first"), written to fail on a plausible bug that the
rest of the suite let through.
"""
from __future__ import annotations

import random

import pytest
import torch
from torchvision.ops import box_iou

from helpers import DEMO_PIPELINE, vlr_reference
from ldpipe.config import AssignerConfig, load_pipeline
from ldpipe.models.anchors import grid_tensors, make_grid
from ldpipe.models.assigner import atss_assign


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
        vlr |= vlr_reference(anchors, gt, res.thr, spec.vlr_region)[0] > 0
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


# ---------------------------------------------------------------------- reader settings, directly
def _pipe(*o):
    return load_pipeline(DEMO_PIPELINE, list(o))


def test_reader_settings_group_models_by_assigner_and_round_trip_the_manifest():
    from ldpipe.cache import region as R
    pipe = _pipe("models.student.assigner.vlr_region=diou", "models.student.assigner.topk=7")
    settings = R.reader_settings(pipe, "teacher")
    assert settings == {AssignerConfig(7, -1.0, "diou"): ["student"]}
    entries = R.manifest_entries(settings)
    assert entries == [{"topk": 7, "ignore_iof_thr": -1.0, "vlr_region": "diou", "models": ["student"]}]
    assert [R.entry_setting(e) for e in entries] == [AssignerConfig(7, -1.0, "diou")]
    assert R.reader_assigners(pipe, "teacher") == entries
    # an entry written before vlr_region was a setting reads as the definition it computed
    assert R.entry_setting({"topk": 9, "ignore_iof_thr": -1.0}).vlr_region == R.LEGACY_VLR_REGION
    # Self-LD: the teacher reads its own cache
    solo = load_pipeline(DEMO_PIPELINE, ["models.student.depth=18"])
    assert R.reader_settings(solo, "teacher") == {AssignerConfig(): ["student"]}
    readers = _pipe("cache.readers=['teacher', 'student']")
    assert R.reader_settings(readers, "teacher") == {AssignerConfig(): ["teacher", "student"]}


def test_own_assigner_note_names_the_readers_setting_only_when_it_differs():
    from ldpipe.cache import region as R
    pipe = _pipe("models.teacher.assigner.vlr_region=diou")
    note = R.own_assigner_note(pipe, "teacher", R.reader_settings(pipe, "teacher"))
    assert note and "models.teacher.assigner (vlr_region=diou, topk=9, ignore_iof_thr=-1.0)" in note
    assert "student: vlr_region=reference, topk=9, ignore_iof_thr=-1.0" in note and "'ld' region" in note
    same = _pipe()
    assert R.own_assigner_note(same, "teacher", R.reader_settings(same, "teacher")) is None
    dense = _pipe("models.teacher.assigner.vlr_region=diou", "cache.region=dense")
    assert R.own_assigner_note(dense, "teacher", R.reader_settings(dense, "teacher")) is None
