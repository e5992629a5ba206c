"""The typed contracts between data, cache and loader: the sample meta and its geometry, the
sample numbering, and the assigner setting a cache's region records (the codec objects:
``test_codec.py``)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ldpipe.cache.manifest import Geometry
from ldpipe.cache.region import LEGACY_VLR_REGION, entry_setting, manifest_entries
from ldpipe.config import AssignerConfig
from ldpipe.data import SampleGeometry, SampleMeta, sample_number, sample_pair


def _meta(**kw) -> SampleMeta:
    base = dict(image_id=7, file_name="a/7.jpg", variant="s0f", ori_shape=(48, 64), img_shape=(96, 128),
                pad_shape=(96, 128), scale_factor=(2.0, 2.0), flip=True)
    return SampleMeta(**{**base, **kw})


def test_sample_meta_is_frozen_and_positioned_by_at():
    m = _meta()
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.index = 3
    placed = m.at(3, 1)
    assert (placed.index, placed.variant_index, m.index) == (3, 1, -1)
    assert placed.label() == "image_id=7 (a/7.jpg) variant s0f"
    assert placed.geometry == SampleGeometry((96, 128), (96, 128), (48, 64), True, (2.0, 2.0))


def test_geometry_differences_name_the_field_and_both_values():
    g = _meta().geometry
    assert g.differences(g) == []
    assert g.differences(dataclasses.replace(g, scale_factor=(2.0 * (1 + 1e-8), 2.0))) == []  # within 1e-6
    other = dataclasses.replace(g, pad_shape=(128, 128), flip=False)
    assert g.differences(other) == [("pad_shape", (96, 128), (128, 128)), ("flip", True, False)]
    assert g.differences(other, ("flip",)) == [("flip", True, False)]
    near = dataclasses.replace(g, scale_factor=(2.0 * (1 + 1e-8), 2.0))
    assert [d[0] for d in g.differences(near, rel_tol=0.0)] == ["scale_factor"]


def test_sample_numbers_and_their_inverse():
    assert sample_number(3, 1, 4) == 13 and sample_pair(13, 4) == (3, 1)
    s = np.arange(12)
    ii, vi = sample_pair(s, 3)
    assert np.array_equal(sample_number(ii, vi, 3), s)


def test_assigner_setting_is_a_key_and_its_manifest_entry_round_trips():
    a, b = AssignerConfig(), AssignerConfig(12, -1.0, "diou")
    readers = {a: ["student"], b: ["ta"]}
    assert AssignerConfig() in readers  # frozen: hashable by value
    entries = manifest_entries(readers)
    assert entries == [{"topk": 9, "ignore_iof_thr": -1.0, "vlr_region": "reference", "models": ["student"]},
                       {"topk": 12, "ignore_iof_thr": -1.0, "vlr_region": "diou", "models": ["ta"]}]
    assert [entry_setting(e) for e in entries] == [a, b]
    legacy = {"topk": 9, "ignore_iof_thr": -1.0, "models": ["student"]}  # before vlr_region existed
    assert entry_setting(legacy) == AssignerConfig(vlr_region=LEGACY_VLR_REGION)


def test_manifest_geometry_differences_by_field():
    g = Geometry([8, 16], 8.0, 16, 2, ["a", "b"], [[128, 96]], 32, [{"key": "s0n", "scale_idx": 0, "flip": False}])
    same = dataclasses.replace(g, strides=(8, 16), input_scales=[(128, 96)])  # tuples equal lists
    assert g.differences(same) == []
    other = dataclasses.replace(g, reg_max=8, pad_divisor=64)
    assert g.differences(other) == [("reg_max", 16, 8), ("pad_divisor", 32, 64)]
    assert g.differences(other, ["pad_divisor"]) == [("pad_divisor", 32, 64)]


