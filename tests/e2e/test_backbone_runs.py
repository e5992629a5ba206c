"""mmdetection teachers through the commands: GFL R-101-DCN (DCN on c3-c5) and
X-101-32x4d-DCN (c4-c5) checkpoints, laid out as mmdetection's, load strictly and evaluate
through ``ldpipe eval`` on BCCD (full width, 2 images at 128x96 - random weights); and
``dump-teacher`` / ``train-student`` with DCN teachers at tiny widths (cached LD equals
online LD with the same teacher)."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from helpers import TINY_STUDENT as STUDENT
from helpers import invoke
from ldpipe.cache import CacheReader
from ldpipe.engine.student import train_student
from ldpipe.engine.dump import dump_teacher
from ldpipe.models import build_model
from ldpipe.models.checkpoint import save_checkpoint
from ldpipe.models.dcn import DeformConv2dPack, ModulatedDeformConv2dPack

from mmdet_layout import MMDET_TEACHERS, fill_state_dict, mmdet_backbone_keys, mmdet_gfl_keys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BCCD = os.path.join(REPO, "..", "shared", "datasets", "bccd")
DEMO = os.path.join(REPO, "pipelines", "demo.toml")

# the model sections, transcribed from mmdetection's configs
# gfl_r101_fpn_dconv_c3-c5_mstrain_2x_coco.py / gfl_x101_32x4d_fpn_dconv_c4-c5_mstrain_2x_coco.py
SECTIONS = {
    "R-101-DCN": '''
[models.teacher.backbone]   # backbone=dict(type='ResNet', depth=101, frozen_stages=1, norm_eval=True,
type = "ResNet"             #   dcn=dict(type='DCN', deform_groups=1, fallback_on_stride=False),
depth = 101                 #   stage_with_dcn=(False, True, True, True))
frozen_stages = 1
norm_eval = true
dcn = { type = "DCN", deform_groups = 1, fallback_on_stride = false }
stage_with_dcn = [false, true, true, true]
''',
    "X-101-32x4d-DCN": '''
[models.teacher.backbone]
type = "ResNeXt"
depth = 101
groups = 32
base_width = 4
frozen_stages = 1
norm_eval = true
dcn = { type = "DCN", deform_groups = 1, fallback_on_stride = false }
stage_with_dcn = [false, false, true, true]
''',
}


@pytest.fixture(scope="module")
def bccd_few(tmp_path_factory) -> str:
    """BCCD with a 2-image split ``few`` (links to the real images and annotations)."""
    if not os.path.isdir(os.path.join(BCCD, "JPEGImages")):
        pytest.skip(f"BCCD not found at {BCCD}")
    root = tmp_path_factory.mktemp("bccd-few")
    for sub in ("Annotations", "JPEGImages"):
        os.symlink(os.path.abspath(os.path.join(BCCD, sub)), root / sub)
    with open(os.path.join(BCCD, "ImageSets", "Main", "test.txt")) as fh:
        ids = [x.strip() for x in fh if x.strip()][:2]
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "few.txt").write_text("\n".join(ids) + "\n")
    return str(root)


@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_mmdet_dcn_checkpoint_loads_strictly_and_evaluates(name, bccd_few, tmp_path):
    with open(os.path.join(REPO, "pipelines", "bccd.toml")) as fh:
        text = fh.read()
    assert "[models.teacher]\ndepth = 50\n" in text
    pipe_path = tmp_path / "bccd_mmdet.toml"
    pipe_path.write_text(text.replace("[models.teacher]\ndepth = 50\n", SECTIONS[name]))
    # an mmdetection checkpoint: every key and shape from the hand-written layout
    state = fill_state_dict(mmdet_gfl_keys(mmdet_backbone_keys(**MMDET_TEACHERS[name][1])))
    ckpt = str(tmp_path / "gfl.pth")
    torch.save({"meta": {"CLASSES": ("RBC", "WBC", "Platelets"), "mmdet_version": "2.28.2"},
                "state_dict": state}, ckpt)
    out, dets = tmp_path / "metrics.json", tmp_path / "dets.json"
    res = invoke(
        "eval", str(pipe_path), "--model", "teacher", "--checkpoint", ckpt, "--device", "cpu",
        "--out", str(out), "--results", str(dets), "-o", f"data.root={bccd_few}", "-o", "data.val=few",
        "-o", "data.test_scale=[128,96]", "-o", "models.teacher.test.max_per_img=20")
    assert res.exit_code == 0, res.output
    metrics = json.loads(out.read_text())
    assert metrics["split"] == "val" and 0.0 <= metrics["bbox_mAP"] <= 1.0
    assert all(math.isfinite(metrics[k]) for k in ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75"))
    found = json.loads(dets.read_text())
    assert 0 < len(found) <= 2 * 20 and {d["category_id"] for d in found} <= {1, 2, 3}


# ------------------------------------------------------------------ tiny DCN teachers
SHORT = ("train.batch_size=2", "train.max_iters_per_epoch=1", "train.warmup_iters=2", "train.epochs=1",
         "train.log_interval=1", "cache.codec=fp32")
TINY_DCN = {  # teacher overrides on top of the tiny R-18 w8 (flat keys: the shorthand)
    "X-50-2x4d-DCN": ("models.teacher.depth=50",
                      'models.teacher.backbone={type="ResNeXt", groups=2, base_width=4, dcn="DCN", '
                      'stage_with_dcn=[false, true, true, true]}'),
    "R2-50-DCNv2": ("models.teacher.depth=50",
                    'models.teacher.backbone={type="Res2Net", base_width=4, scales=4, '
                    'dcn={type="DCNv2", deform_groups=2}, stage_with_dcn=[false, false, true, true]}'),
}
LOSSES = ("loss_cls", "loss_bbox", "loss_dfl", "loss_ld", "loss_ld_vlr", "loss_kd")


def _records(work_dir) -> list[dict]:
    with open(os.path.join(work_dir, "metrics.jsonl")) as fh:
        return [r for r in map(json.loads, fh) if r["type"] == "train"]


@pytest.mark.parametrize("name", sorted(TINY_DCN))
def test_dump_and_train_student_from_a_dcn_teacher(name, make_tiny_pipe, tiny_overrides, tmp_path):
    pipe = make_tiny_pipe(*TINY_DCN[name], *STUDENT, *SHORT)
    torch.manual_seed(0)
    teacher = build_model(pipe.model("teacher"), 4)
    dcns = [m for m in teacher.modules() if isinstance(m, (DeformConv2dPack, ModulatedDeformConv2dPack))]
    assert dcns and all(m.deform_groups == (2 if "v2" in name else 1) for m in dcns)
    with torch.no_grad():  # a teacher whose offsets (and masks) are not the zero init
        for m in dcns:
            m.conv_offset.weight.normal_(0, 0.05)
            m.conv_offset.bias.uniform_(-1, 1)
    ckpt = str(tmp_path / "teacher.pth")
    save_checkpoint(ckpt, teacher, {})
    cache = str(tmp_path / "teacher.zarr")
    dump_teacher(pipe, "teacher", ckpt, cache, device="cpu", progress=False)
    reader = CacheReader(cache)
    label = {"X-50-2x4d-DCN": "ResNeXt-50-2x4d-DCN(c3-c5)", "R2-50-DCNv2": "Res2Net-50-4w4s-DCNv2(c4-c5)"}
    assert reader.manifest.teacher.architecture["backbone"] == label[name]
    cached, online = str(tmp_path / "cached"), str(tmp_path / "online")
    train_student(pipe, "student", cached, cache=cache, device="cpu", progress=False)
    train_student(pipe, "student", online, online_teacher=ckpt, device="cpu", progress=False)
    (a,), (b,) = _records(cached), _records(online)
    assert a["loss_ld"] > 0 and a["loss_ld_vlr"] > 0 and a["loss_kd"] > 0
    for k in LOSSES:  # the cache holds what the DCN teacher computes online
        assert a[k] == pytest.approx(b[k], rel=1e-5), k
    # the offsets matter: the same teacher with zero offsets gives other LD targets
    with torch.no_grad():
        for m in dcns:
            m.conv_offset.weight.zero_()
            m.conv_offset.bias.zero_()
    flat = str(tmp_path / "zero_offsets.pth")
    save_checkpoint(flat, teacher, {})
    zero = str(tmp_path / "zero")
    train_student(pipe, "student", zero, online_teacher=flat, device="cpu", progress=False)
    (c,) = _records(zero)
    assert c["loss_ld"] != pytest.approx(a["loss_ld"], rel=1e-4)
    # a checkpoint without the DCN offsets (a plain ResNet's) is refused by name, exit code 1
    plain = str(tmp_path / "plain.pth")
    state = {k: v for k, v in teacher.state_dict().items() if "conv_offset" not in k}
    torch.save({"state_dict": state}, plain)
    over = [a for kv in (*tiny_overrides, *TINY_DCN[name]) for a in ("-o", kv)]
    res = invoke("eval", DEMO, "--model", "teacher", "--checkpoint", plain,
                 "--device", "cpu", *over)
    assert res.exit_code == 1 and "Error:" in res.output and "conv_offset" in res.output, res.output
