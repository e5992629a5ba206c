"""GFocalV2 (``[models.NAME.head] type = "GFocalHead"``): the DGQP against hand computations,
QFL on probabilities, mmdetection's checkpoint layout, and the head as teacher, TA and student
(what the cache stores for it, which students may read it)."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from helpers import TINY_STUDENT as STUDENT
from helpers import invoke, tiny_model_config
from ldpipe.cache import CacheError, CacheReader
from ldpipe.cache.manifest import architecture
from ldpipe.config import ConfigError, HeadConfig, ModelConfig, load_pipeline, resolve_model
from ldpipe.data import DetectionDataset, load_split, train_variants
from ldpipe.distill import OnlineTeacher
from ldpipe.engine.student import train_student
from ldpipe.engine.dump import dump_teacher
from ldpipe.engine.runtime import seed_everything
from ldpipe.engine.train import TrainCollate, step_losses
from ldpipe.models import build_model
from ldpipe.models.checkpoint import load_weights, save_checkpoint
from ldpipe.models.gfocal_head import GFocalHead, dgqp_statistics
from ldpipe.models.losses import quality_focal_loss

from mmdet_layout import mmdet_checkpoint, mmdet_gfl_state_dict  # hand-written mmdet GFL keys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BCCD = os.path.join(os.path.dirname(ROOT), "shared", "datasets", "bccd")
GFOCAL = ("models.teacher.head.type=GFocalHead",)
BASE = (*GFOCAL, *STUDENT, "cache.codec=fp32")  # the tiny pipeline with a GFocalV2 teacher
SHORT = ("train.epochs=1", "train.max_iters_per_epoch=2", "train.batch_size=2",
         "train.warmup_iters=1", "train.log_interval=1000")


# ------------------------------------------------------------------ DGQP by hand
EDGES = [[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25], [0.05, 0.5, 0.05, 0.4]]


def _logits(probs, shift=(0.0, 3.0, -2.0, 7.5)):
    """Regression logits ``[1, 16, 1, 1]`` whose per-edge softmax is ``probs`` (shifted per edge)."""
    return torch.tensor([math.log(p) + s for edge, s in zip(probs, shift) for p in edge]).reshape(1, 16, 1, 1)


def test_dgqp_statistics_by_hand():
    got = dgqp_statistics(_logits(EDGES), reg_topk=2, add_mean=True).reshape(-1)
    want = [0.4, 0.3, 0.35, 0.7, 0.1, 0.4, 0.25, 0.25, 0.25, 0.5, 0.4, 0.45]  # top-2 desc, mean
    assert torch.allclose(got, torch.tensor(want), atol=1e-6)
    got = dgqp_statistics(_logits(EDGES), reg_topk=3, add_mean=False).reshape(-1)
    want = [0.4, 0.3, 0.2, 0.7, 0.1, 0.1, 0.25, 0.25, 0.25, 0.5, 0.4, 0.05]
    assert torch.allclose(got, torch.tensor(want), atol=1e-6)


def test_dgqp_quality_and_joint_score_by_hand():
    """quality = sigmoid(w2 . relu(W1 s + b1) + b2) on the head's own distribution; joint score =
    sigmoid(cls) x quality; the statistics carry QFL's gradient back to gfl_reg."""
    torch.manual_seed(0)
    head = GFocalHead(2, 8, 8, stacked_convs=1, reg_max=3, num_levels=1, norm_groups=4,
                      reg_topk=2, reg_channels=3, add_mean=True)
    assert [k for k in head.state_dict() if "reg_conf" in k] == [
        "reg_conf.0.weight", "reg_conf.0.bias", "reg_conf.2.weight", "reg_conf.2.bias"]
    w1 = torch.linspace(-2, 2, 36).reshape(3, 12)
    b1 = torch.tensor([0.1, -0.3, 0.2])
    w2 = torch.tensor([1.5, -0.7, 2.0])
    b2 = -0.25
    with torch.no_grad():
        head.reg_conf[0].weight.copy_(w1.reshape(3, 12, 1, 1))
        head.reg_conf[0].bias.copy_(b1)
        head.reg_conf[2].weight.copy_(w2.reshape(1, 3, 1, 1))
        head.reg_conf[2].bias.fill_(b2)
        head.gfl_reg.weight.normal_(0, 0.5)
    cls, reg, quality = head([torch.randn(1, 8, 3, 4)])
    r = reg[0].detach()
    for y, x in ((0, 0), (2, 3), (1, 2)):
        s = []
        for e in range(4):
            logits = [float(v) for v in r[0, e * 4:(e + 1) * 4, y, x]]
            z = sum(math.exp(v) for v in logits)
            top = sorted((math.exp(v) / z for v in logits), reverse=True)[:2]
            s += top + [sum(top) / 2]
        h = [max(0.0, sum(float(w1[j, i]) * s[i] for i in range(12)) + float(b1[j])) for j in range(3)]
        q = 1 / (1 + math.exp(-(sum(float(w2[j]) * h[j] for j in range(3)) + b2)))
        assert abs(float(quality[0][0, 0, y, x].detach()) - q) < 1e-5
    # the detector's joint score and the gradient path through the statistics
    from ldpipe.models.detector import DenseOutput, flatten_levels
    out = DenseOutput(flatten_levels(cls), flatten_levels(reg).reshape(1, -1, 4, 4), [(3, 4)],
                      flatten_levels(quality))
    assert torch.allclose(out.scores(), torch.sigmoid(out.cls) * out.quality)
    assert torch.allclose(out.flat_scores(), out.scores().reshape(-1, 2))
    out.quality.sum().backward()
    assert head.gfl_reg.weight.grad.abs().sum() > 0


def test_reg_conf_initialised_as_the_reference():
    torch.manual_seed(0)
    head = GFocalHead(3, 256, 256, stacked_convs=1)
    w = head.reg_conf[0].weight
    assert w.shape == (64, 20, 1, 1) and head.reg_conf[2].weight.shape == (1, 64, 1, 1)
    assert 0.008 < float(w.detach().std()) < 0.012 and abs(float(w.detach().mean())) < 0.002
    assert not head.reg_conf[0].bias.any() and not head.reg_conf[2].bias.any()
    assert isinstance(head.reg_conf[1], torch.nn.ReLU) and isinstance(head.reg_conf[3], torch.nn.Sigmoid)


# ------------------------------------------------------------------ QFL on probabilities
def test_qfl_on_probabilities_by_hand_and_equal_to_the_logit_form():
    p = torch.tensor([[0.2, 0.6], [0.9, 0.05]])
    labels = torch.tensor([1, 2])  # anchor 0: class 1 with IoU 0.8; anchor 1: background
    score = torch.tensor([0.8, 0.0])
    got = quality_focal_loss(p, labels, score, beta=2.0, activated=True)
    a0 = -math.log(0.8) * 0.2 ** 2 + -(0.8 * math.log(0.6) + 0.2 * math.log(0.4)) * 0.2 ** 2
    a1 = -math.log(0.1) * 0.9 ** 2 + -math.log(0.95) * 0.05 ** 2
    assert torch.allclose(got, torch.tensor([a0, a1]), atol=1e-6)
    x = torch.randn(50, 4) * 3
    lab = torch.randint(0, 5, (50,))
    sc = torch.rand(50)
    assert torch.allclose(quality_focal_loss(x.sigmoid(), lab, sc, activated=True),
                          quality_focal_loss(x, lab, sc), rtol=1e-4, atol=1e-6)
    # saturated probabilities stay finite (each log clamped at -100, as torch's BCE): a sure
    # false positive (1.0 on a negative class) and a sure miss (0.0 on the IoU-1 class), 100 each
    sat = quality_focal_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([1]), torch.tensor([1.0]),
                             activated=True)
    assert torch.isfinite(sat).all() and float(sat) == pytest.approx(200.0)


# ------------------------------------------------------------------ config
def test_head_table_and_its_errors(tmp_path):
    demo = os.path.join(ROOT, "pipelines", "demo.toml")
    pipe = load_pipeline(demo, ["models.teacher.head.type=GFocalHead", "models.teacher.head.reg_topk=3"])
    h = pipe.model("teacher").head
    assert (h.type, h.reg_topk, h.reg_channels, h.add_mean) == ("GFocalHead", 3, 64, True)
    assert pipe.model("student").head.type == "GFLHead"  # the default: today's head
    assert pipe.model("teacher").stacked_convs == 2  # demo.toml's flat head keys still apply
    model = build_model(pipe.model("teacher"), 4)
    assert isinstance(model.bbox_head, GFocalHead) and len(model.bbox_head.cls_convs) == 2
    assert model.bbox_head.reg_conf[0].in_channels == 4 * (3 + 1)
    for bad, words in ((["models.teacher.head.type=GFLv2"], "models.teacher.head.type"),
                       (["models.teacher.head.topk=4"], "models.teacher.head.topk"),
                       (["models.teacher.head.type=GFocalHead", "models.teacher.head.reg_topk=18"],
                        "reg_topk"),
                       (["models.teacher.head.reg_channels=x"], "reg_channels")):
        with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
            load_pipeline(demo, bad)


def test_gfl_teacher_manifest_records_no_head():
    """A GFL teacher's architecture (part of the cache identity) is what it was before."""
    assert set(architecture(resolve_model(ModelConfig()))) == {"type", "backbone", "depth", "base_width",
                                                               "channels", "stacked_convs", "reg_max"}
    arch = architecture(resolve_model(ModelConfig(head=HeadConfig(type="GFocalHead"))))
    assert arch["head"] == {"type": "GFocalHead", "reg_topk": 4, "reg_channels": 64, "add_mean": True}


# ------------------------------------------------------------------ mmdetection GFocalV2 R-50
def mmdet_gfocal_r50_state_dict(num_classes: int = 3) -> dict[str, torch.Tensor]:
    """gfocal_r50_fpn_1x: mmdetection's GFL R-50 keys plus GFocalHead's ``reg_conf`` (1x1 convs,
    4 x (reg_topk 4 + mean) = 20 inputs, 64 hidden units), names and shapes by hand."""
    sd = mmdet_gfl_state_dict(depth=50, width=64, channels=256, stacked=4, num_classes=num_classes)
    for k, v in sd.items():  # He-scaled, so that the random network's outputs stay finite
        if v.dim() == 4:
            v.mul_((2.0 / v[0].numel()) ** 0.5)
    g = torch.Generator().manual_seed(9)
    sd["bbox_head.reg_conf.0.weight"] = torch.randn(64, 20, 1, 1, generator=g) * 0.1
    sd["bbox_head.reg_conf.0.bias"] = torch.randn(64, generator=g) * 0.1
    sd["bbox_head.reg_conf.2.weight"] = torch.randn(1, 64, 1, 1, generator=g) * 0.1
    sd["bbox_head.reg_conf.2.bias"] = torch.randn(1, generator=g) * 0.1
    return sd


@pytest.mark.skipif(not os.path.isdir(BCCD), reason="no ../shared/datasets/bccd")
def test_mmdet_gfocalv2_r50_loads_strictly_and_evaluates_on_bccd(tmp_path):

    sd = mmdet_gfocal_r50_state_dict()
    assert sd["bbox_head.gfl_reg.weight"].shape == (68, 256, 3, 3)
    assert sd["neck.lateral_convs.2.conv.weight"].shape == (256, 2048, 1, 1)
    ckpt = str(tmp_path / "gfocal_r50_fpn_1x_bccd.pth")
    torch.save(mmdet_checkpoint(sd), ckpt)
    # `ldpipe eval` below loads it with strict=True (a missing, unexpected or reshaped key is
    # an error); a GFL model section refuses the same layout, naming the DGQP keys (tiny widths)
    from ldpipe.models.checkpoint import CheckpointError
    tiny = mmdet_gfl_state_dict(depth=18, width=8, channels=16, stacked=1, num_classes=3)
    tiny.update({k: v for k, v in sd.items() if "reg_conf" in k})
    tiny_ckpt = str(tmp_path / "tiny.pth")
    torch.save({"state_dict": tiny}, tiny_ckpt)
    with pytest.raises(CheckpointError, match="reg_conf"):
        load_weights(build_model(resolve_model(tiny_model_config()), 3),
                     tiny_ckpt)

    # `ldpipe eval` on a handful of BCCD test images (a data root of links + a 3-image split)
    root = tmp_path / "bccd"
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for sub in ("Annotations", "JPEGImages"):
        os.symlink(os.path.join(BCCD, sub), root / sub)
    with open(os.path.join(BCCD, "ImageSets", "Main", "test.txt")) as fh:
        ids = [line.strip() for line in fh if line.strip()][:3]
    (root / "ImageSets" / "Main" / "few.txt").write_text("\n".join(ids) + "\n")
    metrics = str(tmp_path / "metrics.json")
    res = invoke(
        "eval", os.path.join(ROOT, "pipelines", "bccd.toml"), "--model", "teacher", "--checkpoint", ckpt,
        "-o", "models.teacher.head.type=GFocalHead", "-o", f"data.root={root}", "-o", "data.val=few",
        "-o", "data.test_scale=[320,240]", "--out", metrics)
    assert res.exit_code == 0, res.output
    m = json.loads(open(metrics).read())
    assert m["checkpoint"] == os.path.abspath(ckpt) and m["num_images"] == 3
    assert m["num_detections"] > 0 and 0 <= m["bbox_mAP"] <= 1  # random weights: AP about 0


# ------------------------------------------------------------------ teacher, TA, student
@pytest.fixture(scope="module")
def gfocal_teacher(make_tiny_pipe, tmp_path_factory):
    """A random tiny GFocalV2 teacher (checkpoint) and its fp32 cache on the synthetic set."""
    pipe = make_tiny_pipe(*BASE)
    torch.manual_seed(0)
    model = build_model(pipe.model("teacher"), 4)
    with torch.no_grad():  # non-trivial distributions and qualities
        model.bbox_head.gfl_reg.weight.normal_(0, 0.3)
        model.bbox_head.gfl_cls.weight.normal_(0, 0.3)
        model.bbox_head.reg_conf[0].weight.normal_(0, 0.5)
    base = tmp_path_factory.mktemp("gfocal")
    ckpt = str(base / "teacher.pth")
    save_checkpoint(ckpt, model, {"ldpipe": {"model": "teacher"}})
    cache = str(base / "teacher.zarr")
    dump_teacher(pipe, "teacher", ckpt, cache, device="cpu", progress=False)
    return pipe, model, ckpt, cache


def test_gfocal_cache_stores_class_logits_and_says_so(gfocal_teacher):
    pipe, model, _, cache = gfocal_teacher
    reader = CacheReader(cache)
    m = reader.manifest
    assert m.teacher_head == "GFocalHead" and m.cls_logits == "class"
    assert m.teacher.architecture["head"]["reg_topk"] == 4
    from ldpipe.cache import open_cache
    root, _ = open_cache(cache)
    assert json.dumps(m.to_dict()) == json.dumps(root.attrs["ldpipe_cache"])  # round trip
    from ldpipe.cache.info import format_info, info
    d = info(cache, max_samples=2)
    assert d["cls_logits"] == "class" and "head          GFocalHead" in format_info(d)
    split = load_split(pipe.data, "train")
    ds = DetectionDataset(split, pipe.data, train_variants(pipe.data))
    sample = ds[(0, 0)]
    got = reader.read(0, 0, with_cls=True)
    model.eval()
    with torch.no_grad():
        out = model(sample["img"][None])  # one image: its own grid is the batch grid
    idx = got["anchor"].long()
    assert torch.allclose(got["cls"], F.log_softmax(out.cls[0, idx], dim=1), atol=1e-5)
    joint = out.scores()[0, idx]
    assert not torch.allclose(got["cls"], F.log_softmax(torch.logit(joint), dim=1), atol=1e-2)
    assert torch.allclose(got["box"], F.log_softmax(out.reg[0, idx], dim=-1), atol=1e-5)  # unchanged


def test_gfl_student_kd_from_gfocal_teacher_refused_naming_both(gfocal_teacher, tmp_path):
    pipe, _, ckpt, cache = gfocal_teacher
    with pytest.raises(CacheError) as err:
        train_student(pipe, "student", str(tmp_path / "s"), cache=cache, device="cpu", progress=False)
    msg = str(err.value)
    assert "class KD" in msg and "GFocalHead" in msg and "GFLHead" in msg
    assert "'class'" in msg and "'joint'" in msg and "distill.kd=false" in msg
    online = OnlineTeacher(pipe, "teacher", ckpt)
    with pytest.raises(CacheError, match="class KD"):
        online.check(pipe, "student", load_split(pipe.data, "train"))


def test_gfocal_teacher_to_gfl_student_without_kd_trains(gfocal_teacher, make_tiny_pipe, tmp_path):
    _, _, _, cache = gfocal_teacher
    pipe2 = make_tiny_pipe(*BASE, "distill.kd=false", *SHORT)
    path = train_student(pipe2, "student", str(tmp_path / "s"), cache=cache, device="cpu", progress=False)
    assert os.path.exists(path)


def test_gfocal_student_from_gfocal_cache_then_dumped_as_ta(gfocal_teacher, make_tiny_pipe, tmp_path):
    """GFocalV2 -> GFocalV2 with LD, VLR and class KD (class logits on both sides), 2 steps on
    the CPU; the student's checkpoint then dumps its own cache (a TA) with the lineage."""
    _, _, _, cache = gfocal_teacher
    pipe2 = make_tiny_pipe(*BASE, "models.student.head.type=GFocalHead", *SHORT, "train.log_interval=1")
    ckpt = train_student(pipe2, "student", str(tmp_path / "s"), cache=cache, device="cpu", progress=False)
    rows = [json.loads(line) for line in open(tmp_path / "s" / "metrics.jsonl")]
    steps = [r for r in rows if "loss_kd" in r]
    assert steps and all(math.isfinite(r[k]) for r in steps for k in ("loss_ld", "loss_kd", "loss_ld_vlr"))
    ta_cache = str(tmp_path / "ta.zarr")
    dump_teacher(pipe2, "student", ckpt, ta_cache, device="cpu", progress=False)
    m = CacheReader(ta_cache).manifest
    assert m.teacher_head == "GFocalHead" and m.cls_logits == "class"
    assert m.lineage["cache"]["cache_id"] == CacheReader(cache).manifest.cache_id


def test_ld_into_a_gfocal_student_reads_the_joint_score_and_class_logits(gfocal_teacher, make_tiny_pipe):
    """LDv2Head: the LD weights are the student's detached max joint score (sigmoid(cls) x
    quality), class KD compares class logits (``cls``), and QFL trains the DGQP."""
    _, _, _, cache = gfocal_teacher
    pipe2 = make_tiny_pipe(*BASE, "models.student.head.type=GFocalHead")
    cfg = pipe2.model("student")
    split = load_split(pipe2.data, "train")
    from ldpipe.config import enabled_terms
    from ldpipe.distill import CachedTeacher, DistillCriterion
    from ldpipe.distill.loader import CacheTargets
    hook = CachedTeacher(pipe2, cache)
    hook.check(pipe2, "student", split)
    ds = DetectionDataset(split, pipe2.data, train_variants(pipe2.data), extra=CacheTargets(cache))
    sample = next(ds[(i, 0)] for i in range(len(ds)) if len(ds[(i, 0)]["gt_boxes"]))
    seed_everything(0)
    model = build_model(cfg, len(split.classes))
    batch = TrainCollate(cfg, len(split.classes), with_vlr=True)([sample])
    seen = {}

    class Spy(DistillCriterion):
        def distill_terms(self, batch, out, bt, pos, model=None):
            seen.update(out=out, pos=pos)
            return super().distill_terms(batch, out, bt, pos, model)

    spy = Spy(pipe2.distill, enabled_terms(pipe2), hook)
    losses = step_losses(model, model, batch, torch.device("cpu"), False, spy)
    out, positives = seen["out"], seen["pos"]
    pos = positives.index
    assert pos.numel() > 0
    assert torch.equal(positives.weight, out.flat_scores().detach().max(dim=1).values[pos])
    assert not torch.allclose(positives.weight, out.flat_cls().sigmoid().max(dim=1).values[pos])
    model.zero_grad()
    losses["loss_cls"].backward()
    assert model.bbox_head.reg_conf[0].weight.grad.abs().sum() > 0
