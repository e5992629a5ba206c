"""Fast direct tests of core functions that the suite otherwise reached only through slow
dumps and training steps (mutation testing found their mutants had no fast test): the
codecs' stored-row paths, the region's reader settings, and the batch target layout."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ldpipe.cache import codec as C
from ldpipe.config import AssignerConfig, load_pipeline
from ldpipe.models.anchors import make_grid
from ldpipe.models.targets import ImageTargets, batch_targets

from helpers import DEMO_PIPELINE


def _rows(k: int = 17, n: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(n, 4, k, generator=g) * 3, dim=-1)


@pytest.mark.parametrize("name", ["fp32", "fp16", "int8"])
def test_stored_rows_pack_unpack_and_decode_packed_agree(name):
    """pack -> unpack equals decode of the encoded values; decode_packed (torch, on the
    tensor's device) equals unpack bit for bit; the stored row has K values + the trailer."""
    codec = C.codec_for(name)
    lp = _rows()
    enc = codec.encode(lp, min_step=0.125 if name == "int8" else 0.0)
    raw = codec.pack(enc)
    assert raw.dtype == codec.dtype and raw.shape == (6, 4, 17 + codec.trailer)
    direct = codec.decode(enc.values, enc.scale)
    assert torch.equal(codec.unpack(raw), direct)
    assert torch.equal(codec.decode_packed(torch.from_numpy(raw)), direct)
    assert torch.equal(C.decode_packed(torch.from_numpy(raw), name), direct)
    assert (direct - lp).abs().max() <= {"fp32": 0.0, "fp16": 2e-2, "int8": 0.0626}[name]
    scale = codec.stored_scale(raw)
    if name == "int8":
        assert scale.dtype == np.float16 and np.array_equal(scale, enc.scale)
        assert float(scale.min()) >= 0.125  # the common 1/8-nat grid where the range allows
        assert float((torch.from_numpy(raw[..., :17].astype(np.float32)) * -torch.from_numpy(
            scale.astype(np.float32))[..., None] - direct).abs().max()) == 0.0
    else:
        assert scale is None


def test_int8_decode_packed_refuses_rows_that_are_not_stored_int8():
    codec = C.codec_for("int8")
    with pytest.raises(ValueError, match="uint8 with two trailing scale bytes"):
        codec.decode_packed(torch.zeros(3, 19, dtype=torch.float32))
    with pytest.raises(ValueError, match="uint8"):
        codec.decode_packed(torch.zeros(3, 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="need their scales"):
        codec.decode(np.zeros((2, 17), np.uint8), None)


def test_int8_scale_is_the_row_range_over_255_and_rows_clip():
    codec = C.codec_for("int8")
    lp = torch.tensor([[0.0, -1.0, -25.5], [0.0, -1000.0, -2.0]])
    enc = codec.encode(lp)
    assert enc.scale[0] == np.float16(25.5 / 255) and enc.values[0, 2] == 255 and enc.values[0, 0] == 0
    assert float(codec.decode(enc.values, enc.scale)[1].min()) == pytest.approx(-codec.clip, rel=2e-3)
    fp16 = C.codec_for("fp16")
    assert float(fp16.encode(torch.tensor([[0.0, -1e6]])).values.min()) == -fp16.clip  # not -inf
    assert float(fp16.encode(lp).values.min()) == -1000.0


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
