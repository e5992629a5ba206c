"""The cached teacher in a batch of images of different padded shapes.

Every other distillation test batches images of one padded shape, where an image's own
anchor grid and the batch grid coincide; here a 128 x 160 and a 160 x 128 image share a
160 x 160 batch, so the own-grid -> batch-grid row mapping is exercised for real.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from helpers import TINY_STUDENT as STUDENT
from ldpipe.engine.dump import dump_teacher
from ldpipe.data import DetectionDataset, load_split, train_variants
from ldpipe.distill import CachedTeacher
from ldpipe.distill.loader import CacheTargets
from ldpipe.engine.train import TrainCollate
from ldpipe.models import batch_targets, build_model
from ldpipe.models.checkpoint import load_weights



def test_cached_rows_land_on_the_right_batch_anchors(make_tiny_pipe, tiny_teacher_ckpt, tmp_path):
    """Kills: a wrong own-grid -> batch-grid mapping in ``CachedTeacher.prepare`` (or in
    ``grid_to_batch_index``).  The cache is dumped one image per batch (no padding), so each
    cached row equals the teacher network run on that image alone; the hook must serve, at
    every batch-flat anchor the losses read, the teacher's output at the same (level, y, x)
    of that image, found here from coordinates alone."""
    pipe = make_tiny_pipe("data.train_scales=[[160,128]]", "cache.codec=fp32", "cache.batch_size=1",
                          *STUDENT)
    cache = str(tmp_path / "c")
    dump_teacher(pipe, "teacher", tiny_teacher_ckpt, cache, device="cpu", progress=False)
    split = load_split(pipe.data, "train")
    cfg, n_cls = pipe.model("student"), len(split.classes)
    ds = DetectionDataset(split, pipe.data, train_variants(pipe.data), extra=CacheTargets(cache))
    by_shape: dict = {}
    for i in range(len(ds)):
        s = ds[(i, i % 2)]
        if len(s["gt_boxes"]):
            by_shape.setdefault(tuple(s["meta"].pad_shape), []).append(s)
    assert len(by_shape) >= 2, f"set-up: need two padded shapes, got {list(by_shape)}"
    first, second = (group for _, group in sorted(by_shape.items())[:2])
    # shapes X, Y, X: the middle image's rows start after a padded one
    samples = [first[0], second[0], first[1]]
    batch = TrainCollate(cfg, n_cls, with_vlr=True)(samples)
    bh, bw = batch["img"].shape[-2:]
    sizes = [(-(-bh // s), -(-bw // s)) for s in cfg.strides]
    bt = batch_targets(batch["targets"], sizes, cfg.strides, cfg.anchor_scale, n_cls,
                       torch.device("cpu"))
    hook = CachedTeacher(pipe, cache)
    hook.check(pipe, "student", split)
    src = hook.prepare(batch, bt, torch.device("cpu"))
    flat = torch.nonzero((bt.labels < n_cls) | (bt.vlr > 0)).squeeze(1)
    per_image = sum(h * w for h, w in sizes)
    assert bt.labels.shape[0] == 3 * per_image
    assert len({int(f) // per_image for f in flat}) == 3, "set-up: every image has anchors to read"
    got = src.at(flat)
    t_box, t_cls = got.box, got.cls

    teacher = build_model(pipe.model("teacher"), n_cls)
    load_weights(teacher, tiny_teacher_ckpt)
    teacher.eval()
    outs = []
    with torch.no_grad():
        for s in samples:  # each image alone, at its own padded size
            assert tuple(s["img"].shape[-2:]) == tuple(s["meta"].pad_shape)
            outs.append(teacher(s["img"][None]))
    rb = cfg.reg_max + 1
    for k, f in enumerate(flat.tolist()):
        img, r = divmod(f, per_image)
        lv = 0
        while r >= sizes[lv][0] * sizes[lv][1]:
            r -= sizes[lv][0] * sizes[lv][1]
            lv += 1
        y, x = divmod(r, sizes[lv][1])
        own = outs[img].level_sizes  # the image's own grid, level by level
        assert y < own[lv][0] and x < own[lv][1], "an anchor outside the image's grid"
        j = sum(h * w for h, w in own[:lv]) + y * own[lv][1] + x
        want_box = F.log_softmax(outs[img].reg[0, j].reshape(4, rb), dim=-1)
        want_cls = F.log_softmax(outs[img].cls[0, j], dim=-1)
        assert torch.allclose(t_box[k], want_box, atol=1e-5), (img, lv, y, x)
        assert torch.allclose(t_cls[k], want_cls, atol=1e-5), (img, lv, y, x)
