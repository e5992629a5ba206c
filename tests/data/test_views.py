"""Views (``ldpipe.data.views``): seeded draws of ``[[data.augment]]`` that replay bit for bit,
and the box rules of each step (``ldpipe.data.augment``) against hand-computed cases."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import DEMO_PIPELINE, REPO, error_line, invoke

from ldpipe.config import ConfigError, load_pipeline
from ldpipe.data import augment as A
from ldpipe.data import load_split
from ldpipe.data.views import (CropDraw, MixUpDraw, MosaicDraw, ResizeDraw, View, compose,
                               draw_view, padded_view_shape, view_rng)

STEPS = {
    "resize_range": '{type="Resize", img_scale=[[200,120],[260,180]], multiscale_mode="range"}',
    "flip": '{type="RandomFlip", flip_ratio=0.5}',
    "crop": '{type="RandomCrop", crop_size=[0.5,0.7], crop_type="relative_range"}',
    "mosaic": '{type="Mosaic", img_scale=[96,128]}',
    "mixup": '{type="MixUp", img_scale=[128,96]}',
}


def pipe_with(root, *steps: str, extra=()):
    return load_pipeline(DEMO_PIPELINE, [f"data.root={root}", f"data.augment=[{', '.join(steps)}]", *extra])


@pytest.fixture(scope="module")
def split(synth_root):
    return load_split(pipe_with(synth_root).data, "train")


def _same(a: dict, b: dict) -> None:
    for key in ("img", "gt_boxes", "gt_labels", "ignore_boxes"):
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert a["meta"] == b["meta"]


# ------------------------------------------------------------------ replay
@pytest.mark.parametrize("name", list(STEPS))
def test_a_view_replays_bit_for_bit_from_its_record(synth_root, split, name):
    """Each step type: drawn, serialised to JSON, read back, composed twice -> the same tensors."""
    steps = [STEPS["resize_range"], STEPS[name]] if name != "resize_range" else [STEPS[name]]
    pipe = pipe_with(synth_root, *steps)
    kinds = set()
    for i in range(len(split.records)):
        view = draw_view(pipe.data.augment, split.records, i, view_rng(3, i, 0))
        back = View.from_dict(json.loads(json.dumps(view.to_dict())))
        assert back == view
        a, b = compose(view, split.records, pipe.data), compose(back, split.records, pipe.data)
        _same(a, b)
        assert a["meta"].pad_shape == padded_view_shape(view, split.records, pipe.data)
        kinds.add(json.dumps(view.to_dict()["draws"][-1]))
    assert len(kinds) > 1  # the draws vary over the images


def test_a_view_replays_in_another_process(synth_root, split, tmp_path):
    """Mosaic + Resize(range) + flip + crop + MixUp composed here and in a fresh interpreter from
    the JSON record alone: identical bytes."""
    steps = [STEPS[k] for k in ("mosaic", "resize_range", "flip", "crop", "mixup")]
    pipe = pipe_with(synth_root, *steps)
    views = [draw_view(pipe.data.augment, split.records, i, view_rng(0, i, 1)) for i in range(4)]
    (tmp_path / "views.json").write_text(json.dumps([v.to_dict() for v in views]))
    script = f"""
import json, sys, torch
from ldpipe.config import load_pipeline
from ldpipe.data import load_split
from ldpipe.data.views import View, compose
pipe = load_pipeline({DEMO_PIPELINE!r}, [{f"data.root={synth_root}"!r}])
records = load_split(pipe.data, "train").records
out = [compose(View.from_dict(d), records, pipe.data) for d in json.load(open(sys.argv[1]))]
torch.save([{{k: s[k] for k in ("img", "gt_boxes", "gt_labels", "ignore_boxes")}} for s in out], sys.argv[2])
"""
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "views.json"), str(tmp_path / "out.pt")],
                   check=True, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    theirs = torch.load(tmp_path / "out.pt")
    for view, t in zip(views, theirs):
        ours = compose(view, split.records, pipe.data)
        for key, value in t.items():
            assert torch.equal(ours[key], value), key
    assert any(isinstance(d, MosaicDraw) and d.partners for v in views for d in v.draws)


def test_draws_follow_the_seed(synth_root, split):
    pipe = pipe_with(synth_root, *STEPS.values())
    steps, recs = pipe.data.augment, split.records
    a = [draw_view(steps, recs, i, view_rng(0, i, 0)) for i in range(len(recs))]
    assert a == [draw_view(steps, recs, i, view_rng(0, i, 0)) for i in range(len(recs))]
    assert a != [draw_view(steps, recs, i, view_rng(1, i, 0)) for i in range(len(recs))]
    assert a != [draw_view(steps, recs, i, view_rng(0, i, 1)) for i in range(len(recs))]  # another slot


def test_resize_range_draws_both_edges_over_the_range(synth_root, split):
    """mmdetection 2.x range mode: long edge uniform in [200, 260], short in [120, 180], inclusive."""
    pipe = pipe_with(synth_root, STEPS["resize_range"])
    scales = [draw_view(pipe.data.augment, split.records, 0, view_rng(0, 0, k)).draws[0].scale
              for k in range(400)]
    longs, shorts = {s[0] for s in scales}, {s[1] for s in scales}
    assert min(longs) >= 200 and max(longs) <= 260 and min(shorts) >= 120 and max(shorts) <= 180
    assert {200, 260} <= longs and {120, 180} <= shorts and len(longs) > 30
    value = pipe_with(synth_root, '{type="Resize", img_scale=[[200,120],[260,180]], multiscale_mode="value"}')
    picked = {draw_view(value.data.augment, split.records, 0, view_rng(0, 0, k)).draws[0].scale
              for k in range(50)}
    assert picked == {(200, 120), (260, 180)}


# ------------------------------------------------------------------ box rules, by hand
def _canvas(h, w, boxes, labels=None, img=True):
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    pixels = (np.arange(h * w * 3) % 251).astype(np.uint8).reshape(h, w, 3) if img else None
    return A.Canvas(pixels, h, w, boxes, np.asarray(labels if labels is not None else range(len(boxes)),
                                                    dtype=np.int64), np.zeros((0, 4), np.float32))


def test_crop_shifts_clips_and_drops_boxes():
    c = _canvas(100, 200, [[10, 10, 50, 50],     # partly inside: clipped to the window
                           [150, 60, 190, 90],   # wholly inside: shifted
                           [0, 0, 15, 15],       # left of the window: dropped
                           [40, 5, 60, 20]], labels=[0, 1, 2, 3])  # touches only its top edge
    out = A.crop(c, top=20, left=30, height=60, width=150)
    assert (out.h, out.w) == (60, 150)
    np.testing.assert_array_equal(out.img, c.img[20:80, 30:180])
    np.testing.assert_array_equal(out.boxes, [[0, 0, 20, 30], [120, 40, 150, 60]])
    np.testing.assert_array_equal(out.labels, [0, 1])


def test_crop_keeping_no_box_is_drawn_again_or_left_out(synth_root, split):
    """allow_negative_crop = false: every drawn crop keeps a GT box; an impossible one (a 1 px
    crop far from the only box) leaves the image uncropped, as mmdetection's refetch does."""
    pipe = pipe_with(synth_root, '{type="RandomCrop", crop_size=[24,24]}')
    for i, r in enumerate(split.records):
        for k in range(3):
            v = draw_view(pipe.data.augment, split.records, i, view_rng(0, i, k))
            if len(r.boxes):
                assert len(compose(v, split.records, pipe.data)["gt_boxes"]) > 0
    from ldpipe.config import CropStep
    from ldpipe.data.records import Record
    rec = Record(1, "x.jpg", 400, 400, np.array([[0, 0, 2, 2]], np.float32), np.array([0]),
                 np.zeros((0, 4), np.float32))
    d = draw_view([CropStep(crop_size=[1.0, 1.0])], [rec], 0, view_rng(0, 0, 0)).draws[0]
    assert d == CropDraw(0, 0, 400, 400, applied=False)
    allowed = draw_view([CropStep(crop_size=[1.0, 1.0], allow_negative_crop=True)], [rec], 0,
                        view_rng(0, 0, 0)).draws[0]
    assert allowed.applied and (allowed.height, allowed.width) == (1, 1)


def test_mosaic_places_tiles_and_filters_boxes():
    """img_scale (h, w) = (40, 60) -> an 80x120 canvas, centre (x, y) = (50, 30); every tile
    resized by min(40 / h, 60 / w), its boxes scaled, shifted, clipped, and dropped outside."""
    import mmcv
    tiles = [_canvas(20, 30, [[0, 0, 30, 20]]),                    # ratio 2: a 60x40 tile
             _canvas(40, 60, [[50, 0, 60, 10]]),                   # ratio 1, top right
             _canvas(80, 60, [[0, 0, 10, 10], [50, 70, 60, 80]]),  # ratio 0.5: 30x40
             _canvas(40, 60, [[0, 0, 60, 40]])]                    # ratio 1, bottom right
    out = A.mosaic(tiles, center=(50, 30), img_scale=(40, 60), pad_val=114)
    assert (out.h, out.w) == (80, 120) and out.img.shape == (80, 120, 3)
    expect = np.array([[0, 0, 50, 30],       # tile 0: (0,0,60,40) shifted by (-10,-10), clipped
                       # tile 1: (50,0,60,10) shifted by (50,-10) -> (100,-10,110,0): clipped to
                       # zero height at the top edge, not inside: dropped
                       [20, 30, 25, 35],     # tile 2: (0,0,5,5) shifted by (20, 30)
                       [45, 65, 50, 70],     # tile 2: (25,35,30,40) shifted by (20, 30)
                       [50, 30, 110, 70]], dtype=np.float32)  # tile 3 pasted at (50, 30)
    np.testing.assert_array_equal(out.boxes, expect)
    np.testing.assert_array_equal(out.labels, [0, 0, 1, 0])
    # pixels: the top-left tile's bottom-right 50x30 part, and the pad value where no tile lands
    np.testing.assert_array_equal(out.img[0:30, 0:50], mmcv.imresize(tiles[0].img, (60, 40))[10:40, 10:60])
    assert (out.img[30:80, 0:20] == 114).all() and (out.img[70:80] == 114).all()
    assert out.scale == (2.0, 2.0)  # the main tile's resize
    # a main-tile box that the shift moves off the canvas: clipped to a point, dropped
    far = [_canvas(40, 60, [[0, 0, 5, 5]]), *tiles[1:]]
    assert len(A.mosaic(far, center=(50, 30), img_scale=(40, 60), pad_val=114).boxes) == 3


def test_mixup_blends_and_adds_clipped_partner_boxes():
    """img_scale (40, 50): a 20x25 partner resized by 2 into a 40x50 canvas, jitter 1, then the
    main image's 30x40 window at the offset; partner boxes scaled, (mirrored,) shifted, clipped to
    the main image, and dropped when nothing of them is inside."""
    import mmcv
    main = _canvas(30, 40, [[0, 0, 10, 10]], labels=[2])
    partner = _canvas(20, 25, [[0, 0, 25, 10], [20, 15, 25, 20]], labels=[0, 1])
    out = A.mixup(main, partner, (40, 50), jit=1.0, flipped=False, offset=(0, 0), pad_val=114)
    # (0,0,50,20) clipped to (0,0,40,20); (40,30,50,40) clipped to a point at x=40: dropped
    np.testing.assert_array_equal(out.boxes, [[0, 0, 10, 10], [0, 0, 40, 20]])
    np.testing.assert_array_equal(out.labels, [2, 0])
    small = mmcv.imresize(partner.img, (50, 40))[:30, :40].astype(np.float32)
    np.testing.assert_array_equal(out.img, (0.5 * main.img.astype(np.float32) + 0.5 * small).astype(np.uint8))
    # mirrored in the 50-wide canvas -> (0,0,50,20), (0,30,10,40); shifted by (-5,-8), clipped
    out = A.mixup(main, partner, (40, 50), jit=1.0, flipped=True, offset=(5, 8), pad_val=114)
    np.testing.assert_array_equal(out.boxes, [[0, 0, 10, 10], [0, 0, 40, 12], [0, 22, 5, 30]])
    np.testing.assert_array_equal(out.labels, [2, 0, 1])


def test_a_tile_too_thin_to_resize_is_an_error_naming_it():
    from ldpipe.data import DataError
    thin = _canvas(1, 200, [[0, 0, 10, 1]]).with_(name="thin.jpg")
    with pytest.raises(DataError, match="thin.jpg: a 200x1 image .* in Mosaic"):
        A.mosaic([thin] * 4, center=(50, 30), img_scale=(40, 60), pad_val=114)
    with pytest.raises(DataError, match="thin.jpg.* in MixUp"):
        A.mixup(_canvas(30, 40, []), thin, (40, 60), jit=1.0, flipped=False, offset=(0, 0), pad_val=114)


def test_resize_clips_boxes_to_the_image():
    c = _canvas(100, 200, [[150, 50, 210, 120]])
    out = A.resize(c, (100, 50))  # keep ratio: 200x100 -> 100x50
    assert (out.h, out.w) == (50, 100) and out.scale == (0.5, 0.5)
    np.testing.assert_array_equal(out.boxes, [[75, 25, 100, 50]])


# ------------------------------------------------------------------ configuration
@pytest.mark.parametrize("entry, needle", [
    ('{type="Resize", img_scale=[[200,120],[260,180],[300,200]]}', "data.augment[0] (Resize): multiscale_mode 'range'"),
    ('{type="RandomFlip", flip_ratio=1.5}', "data.augment[0] (RandomFlip): flip_ratio must be in [0, 1]"),
    ('{type="RandomCrop", crop_size=[0.5, 1.5], crop_type="relative"}', "data.augment[0] (RandomCrop): crop_size"),
    ('{type="RandomCrop", crop_size=[10.5, 20]}', "whole pixels"),
    ('{type="Mosaic", center_ratio_range=[1.5, 0.5]}', "data.augment[0] (Mosaic): center_ratio_range"),
    ('{type="MixUp", max_iters=0}', "data.augment[0] (MixUp): max_iters"),
    ('{type="Rotate"}', "data.augment[0].type must be Resize|RandomFlip|RandomCrop|Mosaic|MixUp, got 'Rotate'"),
    ('{type="Resize", ratio_range=[0.5, 2.0]}', "unknown key 'data.augment[0].ratio_range'"),
    ('{type="RandomCrop", crop_type="centre"}', "data.augment[0].crop_type must be"),
])
def test_a_bad_augment_entry_is_one_error_naming_it(synth_root, entry, needle):
    with pytest.raises(ConfigError) as err:
        pipe_with(synth_root, entry)
    assert needle in str(err.value)
    res = invoke("config", "show", DEMO_PIPELINE, "-o", f"data.augment=[{entry}]")
    error_line(res, needle)


def test_augment_round_trips_through_config_show(synth_root, tmp_path):
    from ldpipe.config.resolve import show
    pipe = pipe_with(synth_root, *STEPS.values())
    path = tmp_path / "p.toml"
    path.write_text(show(pipe))
    assert load_pipeline(path).data.augment == pipe.data.augment
    assert [type(s).__name__ for s in pipe.data.augment] == ["ResizeStep", "FlipStep", "CropStep",
                                                             "MosaicStep", "MixUpStep"]


def test_views_of_the_draws_name_their_sources(synth_root, split):
    pipe = pipe_with(synth_root, STEPS["mosaic"], STEPS["mixup"])
    v = draw_view(pipe.data.augment, split.records, 2, view_rng(0, 2, 0))
    mos, mix = v.draws
    assert isinstance(mos, MosaicDraw) and isinstance(mix, MixUpDraw)
    assert v.sources() == (2, *mos.partners, *([mix.partner] if mix.partner >= 0 else []))
    assert isinstance(View.from_dict({"image": 1, "draws": [{"type": "Resize", "scale": [9, 9],
                                                            "keep_ratio": True}]}).draws[0], ResizeDraw)
