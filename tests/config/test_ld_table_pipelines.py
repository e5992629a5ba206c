"""The pipelines for the LD README's table rows (pipelines/coco_*.toml, voc_*.toml): each loads,
builds on its base file with only its models (and chain) of its own, and its models resolve to
the backbone and head of the reference's config.  Config objects only: nothing is built."""
from __future__ import annotations

import os
import re
import tomllib

import pytest
from click.testing import CliRunner

from ldpipe.cli import main as cli
from ldpipe.config import load_pipeline, resolve_backbone
from ldpipe.config.resolve import resolved_dict

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PIPES = os.path.join(ROOT, "pipelines")

R101 = ("ResNet", 101, None, None, None, None)
R101_DCN = ("ResNet", 101, None, None, None, [False, True, True, True])  # dconv c3-c5
X101_DCN = ("ResNeXt", 101, 32, 4, None, [False, False, True, True])  # 32x4d, dconv c4-c5
R2_101_DCN = ("Res2Net", 101, None, 26, 4, [False, False, True, True])
V1, V2 = "GFLHead", "GFocalHead"

# the rows of the reference's configs/imv2/ files (IMv2Head students: no DFL)
IMV2 = {"coco_gflv2_ld_r101dcn_r101": "im_r101_gflv2_r101_dcn_2x.py",
        "coco_gflv2_ld_r2101dcn_x101dcn": "im_gflv2_x101-32x4dr2n101_dcn_2x.py",
        "coco_gflv2_selfld_r2101dcn": "im_gflv2_r2n101_dcn_self-2x.py"}

# file: (its direct base, {model: (backbone, head)}, teacher checkpoint, README numbers in its header)
ROWS = {
    "coco_ld_r101dcn_r101": ("coco_ms2x_base.toml", {"teacher": (R101_DCN, V1), "student": (R101, V1)},
                             "checkpoints/gfl_r101_fpn_dconv_c3-c5_mstrain_2x_coco.pth", ["44.6", "45.4"]),
    "coco_gflv2_ld_r101_r50": ("coco_base.toml", {"teacher": (R101, V2),
                                                  "student": (("ResNet", 50, None, None, None, None), V2)},
                               "checkpoints/gfocal_r101_fpn_ms2x.pth", ["42.7"]),
    "coco_gflv2_ld_r101dcn_r101": ("coco_gflv2_imv2_base.toml",
                                   {"teacher": (R101_DCN, V2), "student": (R101, V2)},
                                   "checkpoints/gfocal_r101_dcn_fpn_ms2x.pth", ["47.1", "test-dev"]),
    "coco_gflv2_ld_r2101dcn_x101dcn": ("coco_gflv2_r2101dcn_base.toml",
                                       {"teacher": (R2_101_DCN, V2), "student": (X101_DCN, V2)},
                                       "checkpoints/gfocal_r2n101_dcn_fpn_ms2x.pth", ["50.5", "test-dev"]),
    "coco_gflv2_selfld_r2101dcn": ("coco_gflv2_r2101dcn_base.toml",
                                   {"teacher": (R2_101_DCN, V2), "student": (R2_101_DCN, V2)},
                                   "checkpoints/gfocal_r2n101_dcn_fpn_ms2x.pth", ["no number"]),
    "coco_gflv2_selfld_x101dcn": ("coco_base.toml", {"teacher": (X101_DCN, V2), "student": (X101_DCN, V2)},
                                  "", ["46.9", "47.5"]),
    "voc_ld_r101_r18": ("voc_base.toml", {"teacher": (R101, V1),
                                          "student": (("ResNet", 18, None, None, None, None), V1)},
                        "", ["51.8", "53.0"]),
    "voc_ld_r101_r50": ("voc_base.toml", {"teacher": (R101, V1),
                                          "student": (("ResNet", 50, None, None, None, None), V1)},
                        "", ["55.8", "56.1"]),
    "voc_ld_r101dcn_r34": ("voc_base.toml", {"teacher": (R101_DCN, V1),
                                             "student": (("ResNet", 34, None, None, None, None), V1)},
                           "", ["55.7", "56.7"]),
    "voc_ld_r101dcn_r101": ("voc_base.toml", {"teacher": (R101_DCN, V1), "student": (R101, V1)},
                            "", ["57.6", "58.4"]),
}


def load(name: str):
    return load_pipeline(os.path.join(PIPES, f"{name}.toml"))


def header(name: str) -> str:
    with open(os.path.join(PIPES, f"{name}.toml")) as fh:
        return "".join(line for line in fh if line.startswith("#"))


@pytest.mark.parametrize("name", sorted(ROWS))
def test_row_pipeline_extends_its_base_and_keeps_its_settings(name):
    base, _, _, _ = ROWS[name]
    raw = tomllib.load(open(os.path.join(PIPES, f"{name}.toml"), "rb"))
    assert raw["extends"] == base
    # the file itself holds its name, models and at most a chain switch: the rest is the base's
    assert set(raw) <= {"name", "extends", "models", "chain"}, sorted(raw)
    pipe = load(name)
    assert pipe.name == name
    root = "voc_base.toml" if name.startswith("voc_") else "coco_base.toml"
    assert os.path.basename(pipe.bases[0]) == root and os.path.basename(pipe.bases[-1]) == base
    base_pipe = load_pipeline(os.path.join(PIPES, base))
    mine, theirs = resolved_dict(pipe), resolved_dict(base_pipe)
    for section in ("data", "train", "distill", "cache"):
        assert mine[section] == theirs[section], (name, section)
    for model in pipe.models:  # each model's schedule is the base's (VOC: its teacher's own)
        own = base_pipe.train_for(model) if model in base_pipe.models else base_pipe.train
        assert pipe.train_for(model) == own, (name, model)


@pytest.mark.parametrize("name", sorted(ROWS))
def test_row_models_resolve_to_the_reference_backbone_and_head(name):
    _, models, checkpoint, _ = ROWS[name]
    pipe = load(name)
    assert sorted(pipe.models) == sorted(models)
    for model, ((kind, depth, groups, width, scales, dcn_stages), head) in models.items():
        m = pipe.model(model)
        b = resolve_backbone(m, f"models.{model}")  # idempotent on the loaded config
        assert b == m.backbone
        assert (b.type, b.depth, b.groups, b.base_width, b.scales) == (kind, depth, groups, width, scales)
        if dcn_stages is None:
            assert b.dcn is None and b.stage_with_dcn == [False] * 4
        else:
            assert b.dcn == {"type": "DCN", "deform_groups": 1, "fallback_on_stride": False}
            assert b.stage_with_dcn == dcn_stages
        assert (b.frozen_stages, b.norm_eval, b.base_channels) == (1, True, 64)  # pretrained
        assert m.pretrained.startswith("checkpoints/") and m.pretrained.endswith(".pth")
        assert m.head.type == head
        if head == V2:
            assert (m.head.reg_topk, m.head.reg_channels, m.head.add_mean) == (4, 64, True)
        assert m.loss.box_loss == ("ciou" if name.startswith("voc_") and model == "student" else "giou")
        assert m.loss.dfl_weight == (0.0 if name in IMV2 and model == "student" else 0.25)
    assert pipe.model("teacher").checkpoint == checkpoint


@pytest.mark.parametrize("name", sorted(ROWS))
def test_row_header_cites_the_readme_numbers(name):
    text = header(name)
    assert "README" in text
    for number in ROWS[name][3]:
        assert number in text, (name, number)


def test_schedules_and_cached_scales_follow_the_reference():
    v1 = resolved_dict(load("coco_gflv2_ld_r101_r50"))
    assert (v1["train"]["epochs"], v1["train"]["steps"], v1["data"]["train_scales"]) == (12, [8, 11], [[1333, 800]])
    ms = load("coco_ld_r101dcn_r101")  # range [480, 800]: both ends and the middle
    assert ms.data.train_scales == [[1333, 480], [1333, 640], [1333, 800]]
    assert (ms.train.epochs, ms.train.steps, ms.train.batch_size, ms.train.lr) == (24, [16, 22], 3, 0.00375)
    r2 = load("coco_gflv2_ld_r2101dcn_x101dcn")  # range [480, 960], 16 images at lr 0.01, KD w=5
    assert r2.data.train_scales == [[1333, 480], [1333, 720], [1333, 960]]
    assert (r2.train.epochs, r2.train.steps, r2.train.batch_size, r2.train.lr) == (24, [16, 22], 2, 0.01)
    assert r2.distill.kd_weight == 5.0 and r2.data.test_scale == [1333, 800]
    for name in IMV2:  # the imv2 recipe: range [480, 960], 16 images at lr 0.01, KD w=5, 2x
        im = load(name)
        assert resolved_dict(im)["data"] == resolved_dict(r2)["data"]
        assert (im.train, im.distill) == (r2.train, r2.distill)
        assert f"configs/imv2/{IMV2[name]}" in header(name) and "loss_im" in header(name)
    assert "no config" not in header("coco_gflv2_ld_r101dcn_r101")
    for pipe in (ms, r2):  # lr by the linear rule: 0.01 x total images / 16 (2 and 8 processes)
        procs = {0.00375: 2, 0.01: 8}[pipe.train.lr]
        assert pipe.train.lr == pytest.approx(0.01 * pipe.train.batch_size * procs / 16)
    voc = load("voc_ld_r101dcn_r101")  # RepeatDataset(times=3): 4 x 3 passes, step [3] x 3
    assert (voc.train.epochs, voc.train.steps, voc.data.train_scales) == (12, [9], [[1333, 800]])
    assert (voc.train_for("teacher").epochs, voc.train_for("teacher").steps) == (48, [36])
    assert voc.data.format == "voc" and len(voc.classes) == 20


def test_table_rows_reproduce_with_main_region_ld_only():
    pipe = load_pipeline(os.path.join(PIPES, "coco_ld_r101dcn_r101.toml"),
                         ["cache.region=main", "distill.vlr=false", "distill.kd=false"])
    assert (pipe.cache.region, pipe.distill.ld, pipe.distill.vlr, pipe.distill.kd) == ("main", True, False, False)


def test_config_show_prints_a_row_pipeline():
    name = "coco_gflv2_ld_r2101dcn_x101dcn"
    res = CliRunner().invoke(cli, ["config", "show", os.path.join(PIPES, f"{name}.toml")])
    assert res.exit_code == 0, res.output
    assert re.search(r"# extends: .*coco_base\.toml, .*coco_ms2x_base\.toml, .*coco_gflv2_r2101dcn_base\.toml",
                     res.output)
    assert tomllib.loads(res.output) == resolved_dict(load(name))


def test_readme_lists_every_row_pipeline():
    with open(os.path.join(ROOT, "README.md")) as fh:
        readme = fh.read()
    for name in ROWS:
        assert f"`{name}.toml`" in readme, name
