"""Caches of views: ``dump-teacher`` with ``[[data.augment]]`` stores each view's record beside
its rows, and ``train-student`` rebuilds each view from it - the student's input is the
teacher's, bit for bit, its GT boxes are the ones the stored region was computed for, and a
student with other augmentation settings, or more epochs than the schedule holds, is refused."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from helpers import DEMO_PIPELINE, TINY_STUDENT, error_line, invoke

from ldpipe.cache import CacheError, CacheReader
from ldpipe.cache.manifest import Manifest
from ldpipe.cache.store import open_root
from ldpipe.cache.views import VIEWS, read_views
from ldpipe.data import load_split
from ldpipe.data.views import View, compose
from ldpipe.engine import dump as dump_mod
from ldpipe.engine import train as train_mod
from ldpipe.engine.dump import dump_teacher
from ldpipe.engine.student import train_student

AUG = ('data.augment=[{type="Mosaic", img_scale=[80,80]}, '
       '{type="Resize", img_scale=[[160,96],[160,160]], multiscale_mode="range"}, {type="RandomFlip"}, '
       '{type="RandomCrop", crop_size=[0.6,0.6], crop_type="relative_range"}, {type="MixUp", img_scale=[128,128]}]')
SHORT = ("train.batch_size=2", "train.warmup_iters=2", "train.log_interval=1", "models.student.train={}")


@pytest.fixture(scope="module")
def view_cache(make_tiny_pipe, tiny_teacher_ckpt, tmp_path_factory):
    """A pool of 2 views per image (24 samples); what the teacher was run on, per sample."""
    seen: dict[tuple[int, int], dict] = {}
    real = dump_mod.teacher_rows

    def spy(model, batch, *a, **k):
        for b, meta in enumerate(batch["metas"]):
            seen[meta.index, meta.variant_index] = {"img": batch["img"][b].clone(), "meta": meta,
                                                    "gt": batch["gt_boxes"][b].clone(),
                                                    "region": batch["region"][b].clone()}
        return real(model, batch, *a, **k)

    path = str(tmp_path_factory.mktemp("views") / "c.zarr")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dump_mod, "teacher_rows", spy)
        dump_teacher(make_tiny_pipe(*TINY_STUDENT, AUG, "cache.views.count=2"), "teacher",
                     tiny_teacher_ckpt, path, device="cpu", progress=False)
    return path, seen


def test_the_manifest_records_the_views_and_version_2_readers_refuse(view_cache):
    path, seen = view_cache
    m = CacheReader(path).manifest
    assert m.format_version == 3 and m.variants == ["v0", "v1"] and m.num_samples == 24
    assert {k: m.views[k] for k in ("schedule", "count", "seed")} == {"schedule": "pool", "count": 2, "seed": 0}
    assert [s["type"] for s in m.views["augment"]] == ["Mosaic", "Resize", "RandomFlip", "RandomCrop", "MixUp"]
    records = read_views(open_root(path), path, m)
    assert len(records) == 24 and len(seen) == 24
    raw = dict(open_root(path).attrs["ldpipe_cache"])
    for version, views in ((3, None), (2, raw["views"])):
        bad = {**raw, "format_version": version, "views": views}
        with pytest.raises(CacheError, match="format version"):
            Manifest.parse(bad, path)


def test_the_students_input_is_the_teachers_bit_for_bit(make_tiny_pipe, view_cache, tmp_path, monkeypatch):
    """Every sample the student trains on: its input tensor is the one the teacher was run on
    (the batch's padding aside, which is zero), its GT boxes are the teacher's, and the cached
    rows it got are the ones stored for the region of those boxes."""
    path, seen = view_cache
    got = []
    real = train_mod.TrainStep.__call__

    def spy(self, batch, *a, **k):
        got.append(batch)
        return real(self, batch, *a, **k)

    monkeypatch.setattr(train_mod.TrainStep, "__call__", spy)
    pipe = make_tiny_pipe(*TINY_STUDENT, AUG, *SHORT, "train.epochs=2")
    train_student(pipe, "student", str(tmp_path / "w"), cache=path, device="cpu", progress=False)
    n = 0
    for batch in got:
        for b, meta in enumerate(batch["metas"]):
            t = seen[meta.index, meta.variant_index]
            ph, pw = meta.pad_shape
            assert t["img"].shape == (3, ph, pw)
            assert torch.equal(batch["img"][b, :, :ph, :pw], t["img"])
            assert not batch["img"][b, :, ph:].any() and not batch["img"][b, :, :, pw:].any()
            assert torch.equal(batch["gt_boxes"][b], t["gt"])
            assert torch.equal(batch["teacher"][b]["anchor"], t["region"].long())
            n += 1
    assert n == 24  # 2 epochs x 12 images
    assert len({(m.index, m.variant_index) for bt in got for m in bt["metas"]}) > 12  # both slots used


def test_other_augmentation_or_none_is_refused_naming_both(make_tiny_pipe, view_cache, tmp_path):
    path, _ = view_cache
    other = AUG.replace("[[160,96],[160,160]]", "[[160,128],[160,160]]")
    for setting, needle in ((other, "[[160, 128], [160, 160]]"), ("data.augment=[]", "declares [none]")):
        pipe = make_tiny_pipe(*TINY_STUDENT, setting, *SHORT)
        with pytest.raises(CacheError) as err:
            train_student(pipe, "student", str(tmp_path / setting[-3:]), cache=path, device="cpu", progress=False)
        msg = str(err.value)
        assert "augmentation: the cache holds views of data.augment [Mosaic, Resize, RandomFlip, RandomCrop, MixUp]" in msg
        assert "[[160, 96], [160, 160]]" in msg and needle in msg


def test_an_epoch_schedule_refuses_more_epochs_naming_both(make_tiny_pipe, tiny_teacher_ckpt, tmp_path, tiny_overrides):
    aug = 'data.augment=[{type="Resize", img_scale=[[160,96],[160,160]]}]'
    path = str(tmp_path / "e.zarr")
    pipe = make_tiny_pipe(*TINY_STUDENT, aug, "cache.views.schedule=epochs", "cache.views.count=2")
    dump_teacher(pipe, "teacher", tiny_teacher_ckpt, path, device="cpu", progress=False)
    again = dump_teacher(pipe, "teacher", tiny_teacher_ckpt, path, device="cpu", progress=False)
    assert again["cache_id"] == CacheReader(path).manifest.cache_id  # the same views: resumed, a no-op
    res = invoke("train-student", DEMO_PIPELINE, "--model", "student", "--cache", path, "--work-dir",
                 tmp_path / "w", "--device", "cpu", *[a for kv in (*tiny_overrides, *TINY_STUDENT, aug,
                                                                     *SHORT, "train.epochs=3")
                                                       for a in ("-o", kv)])
    error_line(res, "holds 2 epochs", "train.epochs = 3")
    # two epochs: epoch e reads view e of every image
    got = []
    real = train_mod.TrainStep.__call__

    def spy(self, batch, *a, **k):
        got.append([(m.index, m.variant_index) for m in batch["metas"]])
        return real(self, batch, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod.TrainStep, "__call__", spy)
        train_student(make_tiny_pipe(*TINY_STUDENT, aug, *SHORT, "train.epochs=2"), "student",
                      str(tmp_path / "ok"), cache=path, device="cpu", progress=False)
    slots = [v for batch in got for _, v in batch]
    assert slots == [0] * 12 + [1] * 12


def test_cache_show_draws_a_stored_view(make_tiny_pipe, view_cache, tmp_path, tiny_overrides):
    from ldpipe.engine.show import show_sample
    path, seen = view_cache
    pipe = make_tiny_pipe(*TINY_STUDENT, AUG)
    split = load_split(pipe.data, "train")
    m = CacheReader(path).manifest
    image_id = int(m.data.image_ids[5])
    drawn = show_sample(pipe, path, image_id, str(tmp_path / "v.png"), variant="v1")
    view = View.from_dict(read_views(open_root(path), path, m)[5 * 2 + 1])
    want = compose(view, split.records, pipe.data)
    assert drawn["variant"] == "v1"
    np.testing.assert_array_equal(np.asarray(drawn["gt_boxes"]), want["gt_boxes"].numpy())
    assert torch.equal(want["gt_boxes"], seen[5, 1]["gt"])
    assert (tmp_path / "v.png").stat().st_size > 0
    res = invoke("cache", "show", DEMO_PIPELINE, path, "--image", image_id, "--variant", "v0", "--out",
                 tmp_path / "c.png", *[a for kv in (*tiny_overrides, *TINY_STUDENT, AUG) for a in ("-o", kv)])
    assert res.exit_code == 0, res.output


def test_verify_finds_edited_view_records(view_cache, tmp_path):
    path, _ = view_cache
    res = invoke("cache", "verify", path)
    assert res.exit_code == 0, res.output
    copy = tmp_path / "edited.zarr"
    shutil.copytree(path, copy)
    root = open_root(str(copy), "a")
    blob = bytearray(np.asarray(root[VIEWS][...]).tobytes())
    records = json.loads(blob)
    records[0]["image"] = 1 - records[0]["image"]  # another main image: other inputs than the rows'
    new = json.dumps(records, separators=(",", ":"), sort_keys=True).encode()
    del root[VIEWS]
    root.create_array(VIEWS, data=np.frombuffer(new, dtype=np.uint8))
    res = invoke("cache", "verify", str(copy))
    assert res.exit_code == 1 and "the view records do not match the manifest's views.sha256" in res.output
    m = CacheReader(str(copy)).manifest
    with pytest.raises(CacheError, match="view records do not match"):  # and a student is refused
        read_views(open_root(str(copy)), str(copy), m)
