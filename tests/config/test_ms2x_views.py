"""The 2x multi-scale pipelines train with the reference's range-mode scale sampling, replayed
from a cache of views (one per image per epoch for all their epochs), and keep the three
fixed cached scales as the documented cheap option (`-o 'data.augment=[]'`)."""
from __future__ import annotations

from pathlib import Path

import pytest

from ldpipe.config import load_pipeline

PIPES = Path(__file__).resolve().parents[2] / "pipelines"
RANGES = {"coco_ld_r101dcn_r101": [[1333, 480], [1333, 800]],      # LD's ms-2x (mstrain 480-800)
          "coco_gflv2_ld_r101dcn_r101": [[1333, 480], [1333, 960]],  # the imv2 2x recipe (480-960)
          "coco_gflv2_ld_r2101dcn_x101dcn": [[1333, 480], [1333, 960]]}


@pytest.mark.parametrize("name", sorted(RANGES))
def test_2x_pipelines_replay_range_mode_views_for_every_epoch(name):
    pipe = load_pipeline(PIPES / f"{name}.toml")
    resize, flip = pipe.data.augment
    assert (resize.type, resize.multiscale_mode, resize.img_scale) == ("Resize", "range", RANGES[name])
    assert (flip.type, flip.flip_ratio) == ("RandomFlip", 0.5)
    views = pipe.cache.views
    assert views.schedule == "epochs" and views.count == pipe.train_for("student").epochs == 24
    cheap = load_pipeline(PIPES / f"{name}.toml", ["data.augment=[]"])
    assert cheap.data.augment == [] and len(cheap.data.train_scales) == 3
    assert [s[1] for s in cheap.data.train_scales][::2] == [RANGES[name][0][1], RANGES[name][1][1]]
