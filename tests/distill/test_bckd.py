"""BCKD (ICCV 2023) as distillation terms: each term against an independent float64 port of
the authors' per-level code, cached (dense, fp32, raw class logits) equal to online per term,
refusals of caches that cannot serve it, and a CLI run from a cache with the teacher moved away."""
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
from ldpipe.distill import CachedTeacher, DistillCriterion, OnlineTeacher, TargetSource
from ldpipe.distill.bckd import bckd_box_loss, bckd_cls_loss, expected_distances
from ldpipe.distill.loader import CacheTargets
from ldpipe.distill.online import OnlineBatch
from ldpipe.engine.dump import dump_teacher
from ldpipe.engine.runtime import seed_everything
from ldpipe.engine.step import TrainCollate, step_losses
from ldpipe.models import batch_targets, build_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(ROOT, "pipelines", "demo.toml")
BCKD = ("distill.ld=false", "distill.vlr=false", "distill.kd=false", "distill.bckd_cls=true",
        "distill.bckd_box=true")
DENSE = ("cache.region=dense", "cache.codec=fp32", "cache.cls_values=logits")
EPS = float(torch.finfo(torch.float32).eps)


# ------------------------------------------------------------------ the independent port
def _giou64(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """mmdetection's aligned ``bbox_overlaps(mode='giou')``, one box pair at a time."""
    out = []
    for p, t in zip(a.tolist(), b.tolist()):
        iw = max(min(p[2], t[2]) - max(p[0], t[0]), 0.0)
        ih = max(min(p[3], t[3]) - max(p[1], t[1]), 0.0)
        inter = iw * ih
        union = max((p[2] - p[0]) * (p[3] - p[1]) + (t[2] - t[0]) * (t[3] - t[1]) - inter, eps)
        ew = max(max(p[2], t[2]) - min(p[0], t[0]), 0.0)
        eh = max(max(p[3], t[3]) - min(p[1], t[1]), 0.0)
        enclose = max(ew * eh, eps)
        out.append(inter / union - (enclose - union) / enclose)
    return torch.tensor(out, dtype=torch.float64)


def reference_bckd(s_cls, s_reg, t_cls, t_reg, bt, level_sizes, strides, beta=1.0):
    """BCKD's two terms as TinyTigerPan/BCKD's ``LDHead.loss_single`` computes them, in float64:
    level by level over all anchors of the batch (``images_to_levels``), both terms only where
    the level holds a positive, NovelKDLoss and GIoULoss reduced by ``sum / (avg_factor + eps)``
    with ``avg_factor = max(sum_img max(n_pos, 1), 1)``; weights 1.0 and 4.0 applied.

    s_cls / t_cls ``[B, N, C]`` logits, s_reg / t_reg ``[B, N, 4, reg_max + 1]``."""
    bsz, n, c = s_cls.shape
    bins = s_reg.shape[-1]
    s_reg, t_reg = s_reg.reshape(bsz, n, 4, bins), t_reg.reshape(bsz, n, 4, bins)
    labels = bt.labels.reshape(bsz, n)
    lw = bt.label_weights.reshape(bsz, n).double()
    anchors = bt.anchors.reshape(bsz, n, 4).double()
    avg = max(sum(max(int((labels[b] < c).sum()), 1) for b in range(bsz)), 1)
    cls_total = s_cls.new_zeros((), dtype=torch.float64)
    box_total = s_cls.new_zeros((), dtype=torch.float64)
    start = 0
    for (h, w), stride in zip(level_sizes, strides):
        sl = slice(start, start + h * w)
        start += h * w
        if not bool((labels[:, sl] < c).any()):
            continue
        sc, tc = s_cls[:, sl].reshape(-1, c).double(), t_cls[:, sl].reshape(-1, c).double()
        weight = lw[:, sl].reshape(-1)
        p, q = torch.sigmoid(tc), torch.sigmoid(sc)
        # soft-target BCE on logits, from log-sigmoids (the loss novel_kd_loss calls)
        bce = -(p * torch.nn.functional.logsigmoid(sc) + (1 - p) * torch.nn.functional.logsigmoid(-sc))
        cls_total = cls_total + ((bce * (p - q).abs() ** beta).sum(dim=1) * weight).sum() / (avg + EPS)
        proj = torch.arange(bins, dtype=torch.float64)
        ds = (torch.softmax(s_reg[:, sl].reshape(-1, 4, bins).double(), -1) * proj).sum(-1)
        dt = (torch.softmax(t_reg[:, sl].reshape(-1, 4, bins).double(), -1) * proj).sum(-1)
        a = anchors[:, sl].reshape(-1, 4)
        cx, cy = (a[:, 0] + a[:, 2]) / 2 / stride, (a[:, 1] + a[:, 3]) / 2 / stride
        box_s = torch.stack([cx - ds[:, 0], cy - ds[:, 1], cx + ds[:, 2], cy + ds[:, 3]], 1)
        box_t = torch.stack([cx - dt[:, 0], cy - dt[:, 1], cx + dt[:, 2], cy + dt[:, 3]], 1)
        wb = (p - q.detach()).abs().max(dim=1).values * weight
        if bool((wb > 0).any()):
            # GIoU's value from the per-pair port; its gradient through a float64 twin
            g = _giou64(box_s.detach(), box_t)
            g_twin = _giou_twin(box_s, box_t)
            g = g + g_twin - g_twin.detach()
            box_total = box_total + ((1 - g) * wb).sum() / (avg + EPS)
    return cls_total, 4.0 * box_total


def _giou_twin(a, b, eps=1e-6):
    iw = (torch.min(a[:, 2], b[:, 2]) - torch.max(a[:, 0], b[:, 0])).clamp(min=0)
    ih = (torch.min(a[:, 3], b[:, 3]) - torch.max(a[:, 1], b[:, 1])).clamp(min=0)
    inter = iw * ih
    union = ((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
             - inter).clamp(min=eps)
    enclose = ((torch.max(a[:, 2], b[:, 2]) - torch.min(a[:, 0], b[:, 0])).clamp(min=0)
               * (torch.max(a[:, 3], b[:, 3]) - torch.min(a[:, 1], b[:, 1])).clamp(min=0)).clamp(min=eps)
    return inter / union - (enclose - union) / enclose


class FixedTeacher(TargetSource):
    """A teacher whose batch-flat outputs are given."""

    def __init__(self, box, cls):
        self.box, self.cls = box, cls

    def prepare(self, batch, bt, device):
        return OnlineBatch(self.box, self.cls)


def _samples(pipe, split, extra=None, same_shape=False, n=2):
    ds = DetectionDataset(split, pipe.data, train_variants(pipe.data), extra=extra)
    items = [ds[(i, v)] for i in range(len(ds)) for v in range(len(ds.variants))]
    items = [s for s in items if len(s["gt_boxes"])]
    if not same_shape:  # two shapes: the batch pads one of them (label weight 0 there)
        first = items[0]
        other = next(s for s in items if tuple(s["meta"].pad_shape) != tuple(first["meta"].pad_shape))
        return [first, other]
    by_shape: dict = {}
    for s in items:
        by_shape.setdefault(tuple(s["meta"].pad_shape), []).append(s)
    return max(by_shape.values(), key=len)[:n]


@pytest.mark.parametrize("beta", [1.0, 2.0])
def test_terms_equal_an_independent_port_of_the_authors_code(make_tiny_pipe, beta):
    # two input scales: a batch of a 160 px and a 128 px sample pads the second
    pipe = make_tiny_pipe(*BCKD, f"distill.bckd_beta={beta}", "data.train_scales=[[160,160],[128,128]]")
    split = load_split(pipe.data, "train")
    cfg = pipe.model("student")
    seed_everything(0)
    model = build_model(cfg, len(split.classes))
    batch = TrainCollate(cfg, len(split.classes), with_vlr=False)(_samples(pipe, split))
    out = model(batch["img"])
    bt = batch_targets(batch["targets"], out.level_sizes, cfg.strides, cfg.anchor_scale,
                       model.num_classes, torch.device("cpu"))
    assert bool((bt.label_weights == 0).any())  # padding: anchors BCKD must leave out
    g = torch.Generator().manual_seed(1)
    t_cls = torch.randn(out.cls.shape, generator=g) * 2 - 2
    t_reg = torch.randn(out.reg.shape, generator=g) * 2
    teacher = FixedTeacher(t_reg.reshape(-1, 4, cfg.reg_max + 1), t_cls.reshape(-1, t_cls.shape[-1]))
    losses = DistillCriterion(pipe.distill, enabled_terms(pipe), teacher)(model, batch, out, bt)
    ref_cls, ref_box = reference_bckd(out.cls, out.reg, t_cls, t_reg, bt, out.level_sizes,
                                      cfg.strides, beta)
    assert {"loss_bckd_cls", "loss_bckd_box"} <= set(losses) and "loss_ld" not in losses
    for name, ref in (("loss_bckd_cls", ref_cls), ("loss_bckd_box", ref_box)):
        ours = losses[name]
        assert float(ref.detach()) > 0, name
        assert float(ours.detach()) == pytest.approx(float(ref.detach()), rel=1e-5), name
        # the gradients too: the cls term's modulating |sigma_t - sigma_s|^beta is not detached
        mine = torch.autograd.grad(ours, [out.cls, out.reg], retain_graph=True, allow_unused=True)
        theirs = torch.autograd.grad(ref, [out.cls, out.reg], retain_graph=True, allow_unused=True)
        for a, b in zip(mine, theirs):
            if b is None:
                assert a is None or float(a.abs().max()) == 0, name
                continue
            rel = float((a.double() - b).norm() / b.norm())
            assert rel <= 1e-5, (name, rel)


def test_terms_read_only_valid_anchors_of_levels_with_a_positive():
    """The functions' reductions on hand-made rows: weight 0 rows add nothing, the divisor is
    ``num_total + eps``, and the box term is 0 where student and teacher agree."""
    s = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    t = torch.tensor([[-0.5, 1.0], [2.0, 0.0]])
    w = torch.tensor([1.0, 0.0])
    got = bckd_cls_loss(s, t, w, 2.0, beta=1.0)
    p, q = t[0].sigmoid().double(), s[0].sigmoid().double()
    sd = s[0].double()
    want = (-(p * torch.log(torch.sigmoid(sd)) + (1 - p) * torch.log(1 - torch.sigmoid(sd)))
            * (p - q).abs()).sum() / (2.0 + EPS)
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    corners = torch.randn(2, 4, 17)
    anchors = torch.tensor([[0.0, 0.0, 64.0, 64.0], [32.0, 32.0, 96.0, 96.0]])
    strides = torch.tensor([8.0, 8.0])
    dist = expected_distances(corners.clone())
    assert float(bckd_box_loss(s, t, corners, dist, anchors, strides, torch.ones(2), 1.0)) \
        == pytest.approx(0.0, abs=1e-6)
    assert float(bckd_cls_loss(s[:0], t[:0], w[:0], 1.0)) == 0.0


# ------------------------------------------------------------------ cached == online
@pytest.fixture(scope="module")
def bckd_teacher(make_tiny_pipe, tmp_path_factory) -> str:
    """The tiny teacher with non-trivial distributions and scores (not the prior's 0.01)."""
    return scored_teacher(make_tiny_pipe(), str(tmp_path_factory.mktemp("bckd-teacher") / "teacher.pth"))


@pytest.fixture(scope="module")
def dense_cache(make_tiny_pipe, bckd_teacher, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("bckd-cache") / "dense.zarr")
    dump_teacher(make_tiny_pipe(*DENSE), "teacher", bckd_teacher, path, progress=False)
    return path


def _step(pipe, source, samples, split):
    cfg = pipe.model("student")
    seed_everything(0)
    model = build_model(cfg, len(split.classes))
    batch = TrainCollate(cfg, len(split.classes), with_vlr=False)(samples)
    source.check(pipe, "student", split)
    losses = step_losses(model, model, batch, torch.device("cpu"), False,
                         DistillCriterion(pipe.distill, enabled_terms(pipe), source))
    model.zero_grad()
    (losses["loss_bckd_cls"] + losses["loss_bckd_box"]).backward()
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    return {k: float(v.detach()) for k, v in losses.items()}, grads


def test_cached_bckd_equals_online(make_tiny_pipe, bckd_teacher, dense_cache):
    pipe = make_tiny_pipe(*DENSE, *BCKD)
    split = load_split(pipe.data, "train")
    samples = _samples(pipe, split, CacheTargets(dense_cache), same_shape=True)
    assert len(samples) == 2
    online, g_online = _step(pipe, OnlineTeacher(pipe, "teacher", bckd_teacher), samples, split)
    cached, g_cached = _step(pipe, CachedTeacher(pipe, dense_cache), samples, split)
    for name in ("loss_bckd_cls", "loss_bckd_box", "loss_cls", "loss_bbox", "loss_dfl"):
        assert online[name] > 0, name
        assert cached[name] == pytest.approx(online[name], rel=1e-5, abs=1e-7), name
    assert float((g_cached - g_online).norm() / g_online.norm()) <= 1e-5


def test_class_kd_reads_a_logits_cache_as_a_log_probability_one(make_tiny_pipe, bckd_teacher,
                                                                dense_cache, tmp_path):
    """Class KD is a softmax of the class rows: raw logits give what log-probabilities give."""
    lp_cache = str(tmp_path / "lp.zarr")
    dump_teacher(make_tiny_pipe("cache.region=dense", "cache.codec=fp32"), "teacher", bckd_teacher,
                 lp_cache, progress=False)
    got = {}
    for name, url, extra in (("logits", dense_cache, DENSE), ("log_probs", lp_cache, ())):
        pipe = make_tiny_pipe(*extra, "cache.region=dense", "cache.codec=fp32")
        split = load_split(pipe.data, "train")
        samples = _samples(pipe, split, CacheTargets(url), same_shape=True)
        seed_everything(0)
        model = build_model(pipe.model("student"), len(split.classes))
        batch = TrainCollate(pipe.model("student"), len(split.classes), with_vlr=True)(samples)
        source = CachedTeacher(pipe, url)
        source.check(pipe, "student", split)
        got[name] = {k: float(v.detach()) for k, v in step_losses(
            model, model, batch, torch.device("cpu"), False,
            DistillCriterion(pipe.distill, enabled_terms(pipe), source)).items()}
    assert got["logits"]["loss_kd"] > 0
    for k in ("loss_kd", "loss_ld", "loss_ld_vlr"):
        assert got["logits"][k] == pytest.approx(got["log_probs"][k], rel=1e-5), k


# ------------------------------------------------------------------ refusals
def test_train_student_refuses_bckd_from_an_ld_cache(make_tiny_pipe, tiny_overrides, bckd_teacher,
                                                     tmp_path):
    ld_cache = str(tmp_path / "ld.zarr")
    dump_teacher(make_tiny_pipe(), "teacher", bckd_teacher, ld_cache, progress=False)
    pipe = make_tiny_pipe(*BCKD)
    split = load_split(pipe.data, "train")
    with pytest.raises(CacheError) as err:
        CachedTeacher(pipe, ld_cache).check(pipe, "student", split)
    msg = str(err.value)
    assert "region policy 'ld' cannot serve ['bckd_box', 'bckd_cls']" in msg
    assert "cache.region='dense'" in msg and "cache.cls_values=logits" in msg
    assert "class log-probabilities" in msg
    args = ["train-student", DEMO, "--cache", ld_cache, "--work-dir", str(tmp_path / "s"),
            "--device", "cpu"]
    for kv in (*tiny_overrides, *BCKD):
        args += ["-o", kv]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 1 and "Error:" in res.output, res.output
    assert "cache.region=dense" in res.output and "bckd_cls" in res.output
    assert not os.path.exists(tmp_path / "s" / "latest.pth")


def test_dense_log_probability_cache_is_refused_naming_cls_values(make_tiny_pipe, bckd_teacher,
                                                                  tmp_path):
    path = str(tmp_path / "dense-lp.zarr")
    dump_teacher(make_tiny_pipe("cache.region=dense", "cache.codec=fp32"), "teacher", bckd_teacher,
                 path, progress=False)
    pipe = make_tiny_pipe(*BCKD)
    with pytest.raises(CacheError, match="cache.cls_values=logits") as err:
        CachedTeacher(pipe, path).check(pipe, "student", load_split(pipe.data, "train"))
    assert "cannot serve" not in str(err.value)  # the region is right: only the class rows


def test_logits_need_a_float_codec(make_tiny_pipe):
    with pytest.raises(ConfigError, match="cache.cls_values='logits' needs cache.codec"):
        make_tiny_pipe("cache.cls_values=logits", "cache.codec=int8")


# ------------------------------------------------------------------ the CLI, teacher moved away
def test_train_student_bckd_from_a_dense_cache_without_the_teacher(tiny_overrides, bckd_teacher,
                                                                   tmp_path):
    runner = CliRunner()
    ckpt = tmp_path / "t" / "teacher.pth"
    ckpt.parent.mkdir()
    shutil.copy(bckd_teacher, ckpt)
    cache = str(tmp_path / "c.zarr")
    o = [a for kv in (*tiny_overrides, *DENSE, *BCKD, "train.epochs=1", "train.batch_size=2",
                      "train.max_iters_per_epoch=2", "train.log_interval=1")
         for a in ("-o", kv)]
    res = runner.invoke(cli, ["dump-teacher", DEMO, "--model", "teacher", "--checkpoint", str(ckpt),
                              "--out", cache, "--device", "cpu", *o])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["cache", "verify", cache])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["cache", "info", cache, "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["serves"] == {"LD": ["ld", "vlr", "kd"], "BCKD": ["bckd_cls", "bckd_box"]}
    assert info["cls_values"] == "logits"
    text = runner.invoke(cli, ["cache", "info", cache]).output
    assert "serves        LD (ld, vlr, kd); BCKD (bckd_cls, bckd_box)" in text
    assert "class logits stored" in text
    shutil.move(str(ckpt.parent), str(tmp_path / "elsewhere"))
    sw = tmp_path / "s"
    res = runner.invoke(cli, ["train-student", DEMO, "--cache", cache, "--work-dir", str(sw),
                              "--device", "cpu", *o])
    assert res.exit_code == 0, res.output
    records = [json.loads(x) for x in open(sw / "metrics.jsonl")]
    last = [r for r in records if r["type"] == "train"][-1]
    assert last["loss_bckd_cls"] > 0 and last["loss_bckd_box"] > 0
    assert "loss_ld" not in last and "loss_kd" not in last


# ------------------------------------------------------------------ the published recipes
# file: (student depth, the BCKD README's numbers: baseline, BCKD; the LD README's LD v2 number)
RECIPES = {"coco_bckd_r101_r50": (50, "40.1", "43.2", "42.1"),
           "coco_bckd_r101_r34": (34, "38.9", "42.0", "41.0"),
           "coco_bckd_r101_r18": (18, "35.8", "38.6", "37.5")}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_pipelines_set_the_authors_terms_and_cite_their_numbers(name):
    import tomllib

    from ldpipe.config import load_pipeline
    from ldpipe.config.resolve import resolved_dict
    path = os.path.join(ROOT, "pipelines", f"{name}.toml")
    raw = tomllib.load(open(path, "rb"))
    assert raw["extends"] == "coco_bckd_base.toml" and set(raw) <= {"name", "extends", "models"}
    pipe = load_pipeline(path)
    assert [os.path.basename(b) for b in pipe.bases] == ["coco_base.toml", "coco_bckd_base.toml"]
    base = load_pipeline(os.path.join(ROOT, "pipelines", "coco_bckd_base.toml"))
    assert resolved_dict(pipe)["distill"] == resolved_dict(base)["distill"]
    assert enabled_terms(pipe) == {"bckd_cls", "bckd_box"}
    d = pipe.distill
    assert (d.bckd_cls_weight, d.bckd_beta, d.bckd_box_weight) == (1.0, 1.0, 4.0)
    assert (pipe.cache.region, pipe.cache.cls_values, pipe.cache.store_cls) == ("dense", "logits", True)
    assert (pipe.train.batch_size, pipe.train.lr, pipe.train.epochs, pipe.train.steps) == (2, 0.01, 12, [8, 11])
    depth, *numbers = RECIPES[name]
    assert (pipe.model("student").depth, pipe.model("teacher").depth) == (depth, 101)
    assert pipe.model("teacher").checkpoint == "checkpoints/gfl_r101_fpn_mstrain_2x_coco.pth"
    header = "".join(line for line in open(path) if line.startswith("#"))
    assert "TinyTigerPan/BCKD" in header and "README" in header
    for number in numbers:
        assert number in header, number
    with open(os.path.join(ROOT, "README.md")) as fh:
        assert f"`{name}.toml`" in fh.read()


def test_compact_form_study_measures_bytes_and_the_floors_effect(tiny_overrides, dense_cache, tmp_path):
    """benchmarks.studies.bckd_compact: 4 expected distances per anchor instead of 4 x 17 bins,
    class logits above a floor; with every class kept only float16 rounding remains."""
    from benchmarks.studies import bckd_compact
    args = [DEMO, dense_cache, "--floor", "1e-9,0.05", "--json", str(tmp_path / "c.json")]
    for kv in (*tiny_overrides, *DENSE, *BCKD):
        args += ["-o", kv]
    r = bckd_compact.main(args)
    assert r["samples"] == 24 and r["dist_fp16_bytes_per_sample"] < r["dense_fp16_bytes_per_sample"] / 5
    everything, sparse = r["floors"]["1e-09"], r["floors"]["0.05"]
    assert everything["class_values_kept"] == 1.0
    assert all(e <= 1e-3 for e in everything["rel_error_sum"].values())
    # (whether the sparse rows are smaller depends on the teacher: this random one keeps 93%)
    assert 0 < sparse["class_values_kept"] < 1.0 and sparse["cls_bytes_per_sample"] > 0
    assert json.loads((tmp_path / "c.json").read_text()) == r


def test_chain_stamps_of_older_chains_are_unchanged_at_the_defaults(make_tiny_pipe, tmp_path):
    """The BCKD switches and cache.cls_values enter a chain's stage stamps only when set: at
    their defaults a chain stamped before them skips its finished stages as before."""
    from ldpipe import chain as chain_mod
    for extra, present in (((), False), ((*BCKD, *DENSE), True)):
        pipe = make_tiny_pipe(*extra)
        ch = chain_mod.Chain(DEMO, (), pipe, str(tmp_path / "wd"), run_argv=lambda argv: None)
        stages = []
        ch.run_stage = stages.append  # capture the stages instead of running them
        ch.dump_stage("teacher", str(tmp_path / "none.pth"), "teacher")
        ch.train_stage("student", str(tmp_path / "none.zarr"), "student")
        dump, train = (st.inputs for st in stages)
        assert ("cls_values" in dump["cache"]) == present and "codec" in dump["cache"]
        assert ("bckd_cls" in train["distill"]) == present and "bckd_beta" not in train["distill"]
        assert "ld_norm" not in train["distill"] and "kd_weight" in train["distill"]
