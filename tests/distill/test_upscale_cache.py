"""A teacher dumped at 2x its student's input (``cache.teacher_upscale=2``), end to end.

The dump stores, for each student anchor (level l, y, x) of its region, the teacher's output at
(level l+1, y, x) on the 2x input, in the student's addressing; the student's top level gets no
rows, and the distillation terms leave its anchors out (their normalisers unchanged).  Checked
against the teacher network run here on the 2x input, read through per-level maps; then a
student trains from the cache, and the criterion is shown never to ask for a top-level anchor.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from helpers import distill_pipe, scored_teacher, synth_set
from ldpipe.cache import CacheError, CacheReader
from ldpipe.cache.info import format_info, info
from ldpipe.cache.manifest import Manifest
from ldpipe.cache.verify import verify
from ldpipe.config import ConfigError
from ldpipe.data import DetectionDataset, load_split, train_variants
from ldpipe.data.decode import load_checked
from ldpipe.data.upscale import teacher_input
from ldpipe.distill import CachedTeacher, DistillCriterion
from ldpipe.distill.criterion import served
from ldpipe.distill.loader import CacheTargets
from ldpipe.distill.online import OnlineTeacher
from ldpipe.distill.sources import TargetSource, TeacherBatch, TeacherRows
from ldpipe.engine.dump import dump_teacher
from ldpipe.engine.student import train_student
from ldpipe.engine.train import TrainCollate
from ldpipe.models import PositiveSet, batch_targets, build_model, image_targets
from ldpipe.models.anchors import make_grid
from ldpipe.models.checkpoint import load_weights
from ldpipe.distill.losses import ld_loss, vlr_loss
from ldpipe.distill.bckd import bckd_cls_loss

UP = ("cache.teacher_upscale=2", "cache.codec=fp32", "cache.batch_size=2",
      "data.train_scales=[[160, 120]]")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("upscale")
    root = synth_set(base / "synth", n_train=6, n_val=2, seed=5)
    pipe = distill_pipe(root, *UP)
    ckpt = scored_teacher(pipe, str(base / "teacher.pth"))
    cache = str(base / "cache.zarr")
    dump_teacher(pipe, "teacher", ckpt, cache, device="cpu", progress=False)
    return pipe, ckpt, cache


def _teacher(pipe, split, ckpt):
    teacher = build_model(pipe.model("teacher"), len(split.classes))
    load_weights(teacher, ckpt)
    return teacher.eval()


def _teacher_level_above(teacher, pipe, split, meta, anchors: torch.Tensor):
    """The teacher's (box, cls) log-probabilities at (level l+1, y, x) of its output on the 2x
    input, for the student's own-grid anchors ``anchors`` (level l, y, x), found from the
    per-level maps; and each anchor's student level."""
    cfg = pipe.model("student")
    rec = split.records[meta.index]
    img = teacher_input(load_checked(rec.file_name, rec.width, rec.height), meta, 2, pipe.data)
    with torch.no_grad():
        out = teacher(img[None])
    student = make_grid(meta.pad_shape, cfg.strides, cfg.anchor_scale)
    bounds = torch.tensor(student.num_level_anchors).cumsum(0)
    level = torch.searchsorted(bounds, anchors, right=True)
    assert (level < len(cfg.strides) - 1).all(), "no rows on the student's top level"
    pos = anchors - (bounds - torch.tensor(student.num_level_anchors))[level]
    width = torch.tensor([w for _, w in student.sizes])[level]
    y, x = pos // width, pos % width
    starts = torch.tensor([sl.start for sl in out.level_slices()])
    t_width = torch.tensor([w for _, w in out.level_sizes])
    for lv in level.unique().tolist():
        assert tuple(out.level_sizes[lv + 1]) == student.sizes[lv]
    row = starts[level + 1] + y * t_width[level + 1] + x
    same = starts[level] + y * t_width[level] + x  # what a dump without the shift would read
    lp = lambda t: torch.log_softmax(t.float(), dim=-1)  # noqa: E731
    return lp(out.reg[0, row]), lp(out.cls[0, row]), level, lp(out.reg[0, same])


def test_stored_rows_are_the_teachers_level_above(setup):
    """Kills: rows read at the student's own level (no shift), a wrong (y, x) offset, a teacher
    run on the student-sized input, rows stored for the student's top level."""
    pipe, ckpt, cache = setup
    split = load_split(pipe.data, "train")
    teacher = _teacher(pipe, split, ckpt)
    reader = CacheReader(cache)
    ds = DetectionDataset(split, pipe.data, train_variants(pipe.data))
    shifted = distinct = 0
    for i in range(len(split.records)):
        for v in range(len(ds.variants)):
            got = reader.read(i, v)
            box, cls, level, unshifted = _teacher_level_above(teacher, pipe, split, ds[(i, v)]["meta"],
                                                              got["anchor"].long())
            assert torch.allclose(got["box"], box, atol=1e-5)
            assert torch.allclose(got["cls"], cls, atol=1e-5)
            shifted += int((level > 0).sum())
            distinct += int(not torch.allclose(got["box"], unshifted, atol=1e-3))
    assert shifted > 0 and distinct > 0, "set-up: rows above level 0, levels distinguishable"


def test_student_step_reads_the_teachers_level_above(setup):
    """Kills: a training step that reads a cached row other than the teacher's P(l+1) output
    for its anchor at P(l) (in a batch of two images, with their own-grid -> batch mapping)."""
    pipe, ckpt, cache = setup
    split = load_split(pipe.data, "train")
    teacher = _teacher(pipe, split, ckpt)
    cfg, n_cls = pipe.model("student"), len(split.classes)
    ds = DetectionDataset(split, pipe.data, train_variants(pipe.data), extra=CacheTargets(cache))
    samples = [ds[(0, 0)], ds[(1, 1)]]
    batch = TrainCollate(cfg, n_cls, with_vlr=True)(samples)
    bh, bw = batch["img"].shape[-2:]
    sizes = [(-(-bh // s), -(-bw // s)) for s in cfg.strides]
    bt = batch_targets(batch["targets"], sizes, cfg.strides, cfg.anchor_scale, n_cls, torch.device("cpu"))
    hook = CachedTeacher(pipe, cache)
    hook.check(pipe, "student", split)
    src = hook.prepare(batch, bt, torch.device("cpu"))
    assert src.strides == (8, 16, 32, 64)
    flat = torch.nonzero((bt.labels < n_cls) | (bt.vlr > 0)).squeeze(1)
    flat = flat[served(src, bt, flat)]
    per_image = bt.labels.shape[0] // 2
    for b, sample in enumerate(samples):
        mine = flat[flat // per_image == b]
        assert mine.numel() > 0
        inverse = torch.full((bt.labels.shape[0],), -1, dtype=torch.long)
        inverse[bt.own_to_batch[b]] = torch.arange(bt.own_to_batch[b].numel())
        box, cls, _, _ = _teacher_level_above(teacher, pipe, split, sample["meta"], inverse[mine])
        got = src.at(mine)
        assert torch.allclose(got.box, box, atol=1e-5) and torch.allclose(got.cls, cls, atol=1e-5)


def test_manifest_info_and_verify(setup):
    """Kills: a factor the manifest does not record (or records in the teacher's addressing),
    ``cache info`` not showing it, ``verify`` failing such a cache."""
    pipe, _, cache = setup
    m = CacheReader(cache).manifest
    assert m.teacher_upscale == {"factor": 2, "teacher_strides": [8, 16, 32, 64, 128],
                                 "levels": [1, 2, 3, 4, None]}
    assert m.geometry.strides == list(pipe.model("student").strides)
    text = format_info(info(cache))
    assert "teacher run at 2x the student's input" in text and "no teacher rows at stride 128" in text
    assert verify(cache)["ok"]
    # a damaged entry is refused when the manifest is read, naming the field
    raw = m.to_dict()
    raw["teacher_upscale"] = {**raw["teacher_upscale"], "levels": [0, 1, 2, 3, None]}
    with pytest.raises(CacheError, match="teacher_upscale.levels"):
        Manifest.parse(raw, cache)
    assert Manifest.parse(m.to_dict(), cache).teacher_upscale == m.teacher_upscale


def test_student_trains_from_the_cache(setup, tmp_path):
    """Kills: a cache a student cannot read, LD terms that are not finite or absent."""
    pipe, _, cache = setup
    pipe = distill_pipe(pipe.data.root, *UP, "train.batch_size=2", "train.max_iters_per_epoch=2",
                        "train.warmup_iters=2", "train.log_interval=1", "train.epochs=1",
                        "models.student.train={}")
    wd = str(tmp_path / "student")
    train_student(pipe, "student", wd, cache=cache, device="cpu", progress=False)
    with open(os.path.join(wd, "metrics.jsonl")) as fh:
        records = [r for r in map(json.loads, fh) if r["type"] == "train"]
    assert len(records) == 2
    for r in records:
        for k in ("loss_ld", "loss_ld_vlr", "loss_kd"):
            assert math.isfinite(r[k]), (k, r)
        assert r["loss_ld"] > 0 and r["loss_ld_vlr"] > 0


def test_online_teacher_refuses_the_setting(setup):
    pipe, ckpt, _ = setup
    split = load_split(pipe.data, "train")
    with pytest.raises(CacheError, match="cache.teacher_upscale=2: the online teacher"):
        OnlineTeacher(pipe, "teacher", ckpt).check(pipe, "student", split)


@pytest.mark.parametrize("extra, needle", [
    (("cache.teacher_upscale=3",), "cache.teacher_upscale must be a power of two"),
    (("cache.teacher_upscale=0",), "cache.teacher_upscale must be a power of two"),
    (("cache.teacher_upscale=2", "models.teacher.reg_max=8"), "reg_max of teacher 'teacher' (8)"),
    (("cache.teacher_upscale=2", "cache.reused_head_idx=0"), "cannot be combined with cache.reused_head_idx"),
    (("cache.teacher_upscale=32",), "has no level of stride 32 x any"),
    (("cache.teacher_upscale=2", "models.teacher.strides=[16, 64, 128]"), "only the student's top levels"),
])
def test_bad_settings_refused_before_anything_is_written(setup, tmp_path, extra, needle):
    """Kills: a factor that is not a power of two, a teacher without the levels, another
    reg_max, CrossKD's head part, each accepted (or refused after writing)."""
    pipe, ckpt, _ = setup
    out = tmp_path / "c"
    with pytest.raises((ConfigError, CacheError), match=needle.replace("(", r"\(").replace(")", r"\)")):
        bad = distill_pipe(pipe.data.root, *extra)
        dump_teacher(bad, "teacher", ckpt, str(out), device="cpu", progress=False)
    assert not out.exists()


class _TopLevelGuard(TargetSource):
    """A teacher with rows everywhere but the top level, recording what the criterion asks."""

    def __init__(self, strides, bins, classes):
        self.served, self.bins, self.classes, self.asked = strides, bins, classes, []

    def prepare(self, batch, bt, device):
        src, top = self, max(bt.strides.tolist())

        class Batch(TeacherBatch):
            strides = src.served

            def at(self, flat, need_cls=True):
                assert not (bt.strides[flat] == top).any(), "asked for a top-level anchor"
                src.asked.append(flat)
                g = torch.Generator().manual_seed(int(flat.numel()))
                return TeacherRows(torch.randn(flat.numel(), 4, src.bins, generator=g),
                                   torch.randn(flat.numel(), src.classes, generator=g))
        return Batch()


def test_criterion_leaves_the_top_levels_out():
    """Kills: a criterion that reads the student's top level from a teacher without it, or that
    changes the normalisers.  Positives on every level (the top one included) are handed to the
    criterion; each term equals its formula over the served anchors alone, BCKD divided by the
    same GFL normaliser as without upscale."""
    from helpers import tiny_model_config
    from ldpipe.config import DistillConfig, resolve_model
    cfg = resolve_model(tiny_model_config())
    torch.manual_seed(0)
    model = build_model(cfg, 3)
    pad = (160, 160)
    out = model(torch.randn(1, 3, *pad))
    gt = torch.tensor([[4.0, 4.0, 156.0, 150.0], [30.0, 40.0, 70.0, 90.0]])
    t = image_targets(gt, torch.tensor([0, 1]), None, pad, cfg.strides, cfg.anchor_scale, 3, with_vlr=True)
    bt = batch_targets([t], [tuple(s) for s in t.grid.sizes], cfg.strides, cfg.anchor_scale, 3,
                       torch.device("cpu"))
    top = max(cfg.strides)
    bt.vlr[bt.strides == top] = 0.5  # VLR weights on the top level too
    index = torch.cat([torch.nonzero(bt.strides == s).squeeze(1)[:3] for s in cfg.strides])
    pos = PositiveSet(index, torch.rand(index.numel()))
    served = tuple(s for s in cfg.strides if s != top)
    guard = _TopLevelGuard(served, cfg.reg_max + 1, 3)
    terms = {"ld", "kd", "vlr", "bckd_cls", "bckd_box"}
    dcfg = DistillConfig()
    got = DistillCriterion(dcfg, terms, guard).distill_terms({}, out, bt, pos, model)
    assert set(got) >= {"loss_ld", "loss_kd", "loss_ld_vlr", "loss_bckd_cls", "loss_bckd_box"}
    assert all(torch.isfinite(v) for v in got.values())
    # each term over the served anchors alone (the guard's rows are seeded by the count)
    keep = bt.strides[index] != top
    rb = cfg.reg_max + 1
    reg = out.flat_reg()
    ld_idx = index[keep]
    rows = guard.prepare({}, bt, None).at(ld_idx)
    want = dcfg.ld_weight * ld_loss(reg[ld_idx].reshape(-1, rb), rows.box.reshape(-1, rb),
                                    pos.weight[keep], dcfg.ld_T)
    assert torch.allclose(got["loss_ld"], want)
    vidx = torch.nonzero((bt.vlr > 0) & (bt.strides != top)).squeeze(1)
    assert vidx.numel() > 0
    rows = guard.prepare({}, bt, None).at(vidx, need_cls=False)
    want = dcfg.vlr_weight * vlr_loss(reg[vidx].reshape(-1, rb), rows.box.reshape(-1, rb), bt.vlr[vidx], dcfg.vlr_T)
    assert torch.allclose(got["loss_ld_vlr"], want)
    bidx = torch.nonzero((bt.label_weights > 0) & (bt.strides != top)).squeeze(1)
    rows = guard.prepare({}, bt, None).at(bidx)
    want = dcfg.bckd_cls_weight * bckd_cls_loss(out.flat_cls()[bidx], rows.cls, bt.label_weights[bidx],
                                                float(bt.num_pos_images), dcfg.bckd_beta)
    assert torch.allclose(got["loss_bckd_cls"], want)


def test_cli_names_a_teacher_without_the_levels(setup, tmp_path):
    """Kills: a traceback (or a half-written cache) instead of one ``Error:`` line."""
    from helpers import DEMO_PIPELINE, TINY_KVS, cli_args, error_line, invoke
    pipe, ckpt, _ = setup
    over = [f"data.root={pipe.data.root}", *UP, *(f"models.teacher.{kv}" for kv in TINY_KVS),
            "models.teacher.channels=24", "cache.teacher_upscale=256"]
    out = tmp_path / "c"
    res = invoke("dump-teacher", DEMO_PIPELINE, "--checkpoint", ckpt, "--out", out, "--device", "cpu",
                 *cli_args(*over))
    error_line(res, "cache.teacher_upscale must be a power of two", "256")
    over[-1] = "cache.teacher_upscale=32"
    res = invoke("dump-teacher", DEMO_PIPELINE, "--checkpoint", ckpt, "--out", out, "--device", "cpu",
                 *cli_args(*over))
    error_line(res, "cache.teacher_upscale=32", "has no level of stride 32 x any")
    assert not out.exists()
