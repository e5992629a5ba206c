"""CrossKD from a cache: the dump stores the teacher's head part and per-sample feature moments;
a cached student's terms, statistics and gradients equal an online teacher's (the reference's
way: the teacher run on the batch); caches and students that cannot pair are refused; the CLI
trains a CrossKD student with the teacher checkpoint moved away."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from click.testing import CliRunner

from helpers import scored_teacher
from ldpipe.cache import CacheError
from ldpipe.cli import main as cli
from ldpipe.config import ConfigError, enabled_terms
from ldpipe.data import DetectionDataset, load_split, train_variants
from ldpipe.distill import CachedTeacher, DistillCriterion, OnlineTeacher
from ldpipe.distill.loader import CacheTargets
from ldpipe.engine.dump import dump_teacher
from ldpipe.engine.runtime import seed_everything
from ldpipe.engine.step import TrainCollate, step_losses
from ldpipe.models import HeadPart, build_model, load_detector

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(ROOT, "pipelines", "demo.toml")
# a teacher of 2 head convs, 24 channels; a student of 2 head convs, 16 channels + 1x1 maps
SHAPES = ("models.teacher.stacked_convs=2", "models.teacher.channels=24",
          "models.student.stacked_convs=2", "models.student.head.align_channels=24")
DENSE = ("cache.region=dense", "cache.codec=fp32", "cache.cls_values=logits", "cache.reused_head_idx=1")
CROSSKD = ("distill.ld=false", "distill.vlr=false", "distill.kd=false", "distill.crosskd_cls=true",
           "distill.crosskd_reg=true")
TERMS = ("loss_crosskd_cls", "loss_crosskd_reg")


@pytest.fixture(scope="module")
def teacher(make_tiny_pipe, tmp_path_factory) -> str:
    return scored_teacher(make_tiny_pipe(*SHAPES), str(tmp_path_factory.mktemp("crosskd-teacher") / "teacher.pth"))


@pytest.fixture(scope="module")
def cache(make_tiny_pipe, teacher, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("crosskd-cache") / "dense.zarr")
    dump_teacher(make_tiny_pipe(*SHAPES, *DENSE), "teacher", teacher, path, progress=False)
    return path


def _samples(pipe, split, extra, n=3):
    """``n`` training samples of one padded shape (a batch without padding)."""
    ds = DetectionDataset(split, pipe.data, train_variants(pipe.data), extra=extra)
    by_shape: dict = {}
    for i in range(len(ds)):
        for v in range(len(ds.variants)):
            s = ds[(i, v)]
            if len(s["gt_boxes"]):
                by_shape.setdefault(tuple(s["meta"].pad_shape), []).append(s)
    return max(by_shape.values(), key=len)[:n]


def _step(pipe, source, samples, split):
    cfg = pipe.model("student")
    seed_everything(0)
    model = build_model(cfg, len(split.classes))
    batch = TrainCollate(cfg, len(split.classes), with_vlr=False)(samples)
    source.check(pipe, "student", split)
    criterion = DistillCriterion(pipe.distill, enabled_terms(pipe), source)
    assert criterion.hold == 1
    losses = step_losses(model, model, batch, torch.device("cpu"), False, criterion)
    model.zero_grad()
    sum(losses[k] for k in TERMS).backward()
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    stats = source.prepare(batch, _bt(model, batch), torch.device("cpu")).head_stats
    return {k: float(v.detach()) for k, v in losses.items()}, grads, stats, model


def _bt(model, batch):
    from ldpipe.models import batch_targets
    out = model(batch["img"])
    cfg = model.cfg
    return batch_targets(batch["targets"], out.level_sizes, cfg.strides, cfg.anchor_scale,
                         model.num_classes, torch.device("cpu"))


def test_cached_crosskd_equals_online(make_tiny_pipe, teacher, cache):
    pipe = make_tiny_pipe(*SHAPES, *DENSE, *CROSSKD)
    split = load_split(pipe.data, "train")
    samples = _samples(pipe, split, CacheTargets(cache))
    assert len(samples) == 3
    online, g_on, s_on, _ = _step(pipe, OnlineTeacher(pipe, "teacher", teacher), samples, split)
    cached, g_ca, s_ca, model = _step(pipe, CachedTeacher(pipe, cache), samples, split)
    # the batch's statistics combined from the stored per-image moments are the teacher's own
    assert s_on.shape == s_ca.shape == (5, 2, 2, 24)
    assert torch.allclose(s_ca, s_on, rtol=1e-5, atol=1e-6)
    for name in (*TERMS, "loss_cls", "loss_bbox", "loss_dfl"):
        assert online[name] > 0, name
        assert cached[name] == pytest.approx(online[name], rel=1e-5), name
    assert float((g_ca - g_on).norm() / g_on.norm()) <= 1e-5
    assert model.bbox_head.align_cls.weight.grad is not None  # the 1x1 maps train
    assert "loss_ld" not in cached and "loss_bckd_cls" not in cached


def test_the_cache_holds_the_teachers_head_part(make_tiny_pipe, teacher, cache):
    pipe = make_tiny_pipe(*SHAPES, *DENSE, *CROSSKD)
    part = CachedTeacher(pipe, cache).head_part(torch.device("cpu"))
    model, _ = load_detector(pipe.model("teacher"), 4, teacher, torch.device("cpu"))
    want = HeadPart.of_head(model.bbox_head, 1).state_dict()
    got = part.state_dict()
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert not any(p.requires_grad for p in part.parameters())
    n_part, n_all = sum(p.numel() for p in part.parameters()), sum(p.numel() for p in model.parameters())
    assert n_part < n_all / 5


def test_caches_and_students_that_cannot_pair_are_refused(make_tiny_pipe, teacher, cache, tmp_path):
    split = load_split(make_tiny_pipe().data, "train")
    # a dense cache without the head part
    plain = str(tmp_path / "plain.zarr")
    dump_teacher(make_tiny_pipe(*SHAPES, *DENSE[:3]), "teacher", teacher, plain, progress=False)
    pipe = make_tiny_pipe(*SHAPES, *CROSSKD)
    with pytest.raises(CacheError, match="cache.reused_head_idx"):
        CachedTeacher(pipe, plain).check(pipe, "student", split)
    # a student holding 16 channels for a 24-channel head part, no align maps
    narrow = make_tiny_pipe(*SHAPES[:3], *CROSSKD)
    with pytest.raises(CacheError, match="head.align_channels=24"):
        CachedTeacher(narrow, cache).check(narrow, "student", split)
    # the same pairing online, and an online run without the reused conv named
    with pytest.raises(CacheError, match="head.align_channels=24"):
        OnlineTeacher(make_tiny_pipe(*SHAPES[:3], *CROSSKD, "cache.reused_head_idx=1"), "teacher",
                      teacher).check(make_tiny_pipe(*SHAPES[:3], *CROSSKD), "student", split)
    with pytest.raises(CacheError, match="set cache.reused_head_idx"):
        OnlineTeacher(pipe, "teacher", teacher).check(pipe, "student", split)
    # a conv the teacher does not have
    with pytest.raises(ConfigError, match=r"reused_head_idx must be in 0\.\.1"):
        dump_teacher(make_tiny_pipe(*SHAPES, *DENSE[:3], "cache.reused_head_idx=2"), "teacher",
                     teacher, str(tmp_path / "bad.zarr"), progress=False)
    assert not os.path.exists(tmp_path / "bad.zarr")  # refused before anything is written
    with pytest.raises(ConfigError, match="reused_head_idx must be -1"):
        make_tiny_pipe("cache.reused_head_idx=-2")


def test_train_student_crosskd_from_a_cache_without_the_teacher(tiny_overrides, teacher, tmp_path):
    runner = CliRunner()
    ckpt = tmp_path / "t" / "teacher.pth"
    ckpt.parent.mkdir()
    shutil.copy(teacher, ckpt)
    out = str(tmp_path / "c.zarr")
    o = [a for kv in (*tiny_overrides, *SHAPES, *DENSE, *CROSSKD, "train.epochs=1",
                      "train.batch_size=2", "train.max_iters_per_epoch=2", "train.log_interval=1")
         for a in ("-o", kv)]
    res = runner.invoke(cli, ["dump-teacher", DEMO, "--model", "teacher", "--checkpoint", str(ckpt),
                              "--out", out, "--device", "cpu", *o])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["cache", "verify", out])
    assert res.exit_code == 0, res.output
    info = json.loads(runner.invoke(cli, ["cache", "info", out, "--json"]).output)
    assert info["serves"]["CrossKD"] == ["crosskd_cls", "crosskd_reg"]
    shutil.move(str(ckpt.parent), str(tmp_path / "elsewhere"))
    sw = tmp_path / "s"
    res = runner.invoke(cli, ["train-student", DEMO, "--cache", out, "--work-dir", str(sw),
                              "--device", "cpu", *o])
    assert res.exit_code == 0, res.output
    with open(sw / "metrics.jsonl") as fh:
        rows = [json.loads(line) for line in fh]
    logged = [r for r in rows if "loss_crosskd_reg" in r]
    assert logged and all(r["loss_crosskd_reg"] > 0 and r["loss_crosskd_cls"] > 0 for r in logged)
    # the 1x1 align maps are training-only: eval builds the plain student and loads the rest
    plain = [a for kv in (*tiny_overrides, *SHAPES[:3]) for a in ("-o", kv)]
    res = runner.invoke(cli, ["eval", DEMO, "--model", "student", "--checkpoint", str(sw / "latest.pth"),
                              "--out", str(tmp_path / "m.json"), "--device", "cpu", *plain])
    assert res.exit_code == 0, res.output
    assert "bbox_mAP" in json.load(open(tmp_path / "m.json"))


def test_mixed_shape_batch_statistics_are_each_images_own(make_tiny_pipe, teacher, tmp_path):
    """In a batch of two padded sizes the online teacher's statistics also cover the smaller
    image's batch padding; the cached ones are the images' own (each run alone at its padded
    size), combined exactly.  The difference is measured (docs: README, CrossKD)."""
    from ldpipe.distill.crosskd import combine_moments, image_moments
    scales = "data.train_scales=[[160,160],[128,128]]"
    path = str(tmp_path / "mixed.zarr")
    dump_teacher(make_tiny_pipe(*SHAPES, *DENSE, scales), "teacher", teacher, path, progress=False)
    pipe = make_tiny_pipe(*SHAPES, *DENSE, *CROSSKD, scales)
    split = load_split(pipe.data, "train")
    ds = DetectionDataset(split, pipe.data, train_variants(pipe.data), extra=CacheTargets(path))
    items = [ds[(i, v)] for i in range(len(ds)) for v in range(len(ds.variants))]
    first = items[0]
    other = next(s for s in items if tuple(s["meta"].pad_shape) != tuple(first["meta"].pad_shape))
    cfg = pipe.model("student")
    batch = TrainCollate(cfg, len(split.classes), with_vlr=False)([first, other])
    cached = CachedTeacher(pipe, path)
    online = OnlineTeacher(pipe, "teacher", teacher)
    online.check(pipe, "student", split)
    model = build_model(cfg, len(split.classes))
    bt = _bt(model, batch)
    s_ca = cached.prepare(batch, bt, torch.device("cpu")).head_stats
    s_on = online.prepare(batch, bt, torch.device("cpu")).head_stats
    # each image alone through the teacher at its own padded size: the cached statistics
    moments, counts = [], []
    for s in (first, other):
        with torch.no_grad():
            out = online.net(s["img"][None], hold=1)
        moments.append(torch.stack([torch.stack([image_moments(c)[0], image_moments(r)[0]])
                                    for c, r in zip(*out.held)]))
        counts.append([h * w for h, w in out.level_sizes])
    mom, cnt = torch.stack(moments), torch.tensor(counts, dtype=torch.float64)
    want = torch.stack([torch.stack([combine_moments(mom[:, lv, br], cnt[:, lv]) for br in (0, 1)])
                        for lv in range(mom.shape[1])])
    assert torch.allclose(s_ca, want, rtol=1e-5, atol=1e-6)
    rel = [float((s_on[:, :, k] - s_ca[:, :, k]).norm() / s_ca[:, :, k].norm()) for k in (0, 1)]
    print(f"mixed-shape batch: online vs cached statistics, relative L2 difference: mean "
          f"{rel[0]:.1%}, std {rel[1]:.1%}")
    assert min(rel) > 1e-3  # the padding does move the online statistics
