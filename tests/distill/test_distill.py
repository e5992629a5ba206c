"""Cached LD equals online LD; incompatible caches are refused before training."""
from __future__ import annotations

import os

import pytest
import torch

from helpers import TINY_KVS, distill_criterion, distill_pipe, distill_step, same_shape_batch, synth_set
from ldpipe.cache import CacheError
from ldpipe.engine.dump import dump_teacher
from ldpipe.data import DetectionDataset, load_split, train_variants
from ldpipe.distill import CachedTeacher, OnlineTeacher
from ldpipe.distill.loader import CacheTargets
from ldpipe.engine.train import TrainCollate, step_losses
from ldpipe.models import build_model
from ldpipe.models.checkpoint import save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def online_result(synth, teacher_ckpt, caches):
    pipe = distill_pipe(synth)
    split = load_split(pipe.data, "train")
    samples = same_shape_batch(pipe, split, CacheTargets(caches["fp32"]))
    hook = OnlineTeacher(pipe, "teacher", teacher_ckpt)
    return samples, distill_step(pipe, hook, samples, split)


@pytest.mark.parametrize("codec,tol", [("fp32", 1e-5), ("fp16", 1e-3)])
def test_cached_equals_online(synth, caches, online_result, codec, tol):
    pipe = distill_pipe(synth)
    split = load_split(pipe.data, "train")
    ref_samples, (ref_losses, ref_grads) = online_result
    keys = [(s["meta"].index, s["meta"].variant_index) for s in ref_samples]
    ds = DetectionDataset(split, pipe.data, train_variants(pipe.data), extra=CacheTargets(caches[codec]))
    samples = [ds[k] for k in keys]
    losses, grads = distill_step(pipe, CachedTeacher(pipe, caches[codec]), samples, split)
    for name in ("loss_ld", "loss_ld_vlr", "loss_kd", "loss_cls", "loss_bbox", "loss_dfl"):
        assert ref_losses[name] > 0 or name == "loss_kd", name
        assert losses[name] == pytest.approx(ref_losses[name], rel=tol, abs=1e-7), name
    rel = float((grads - ref_grads).norm() / ref_grads.norm())
    assert rel <= tol, rel


@pytest.mark.parametrize("codec", ["int8", "fp16"])
def test_rows_handed_over_as_stored_train_bit_for_bit(synth, caches, online_result, codec):
    """On a GPU the loader hands the rows over as stored (uint8 for int8) and the step decodes
    them on its device: the same losses and gradients, bit for bit, as rows decoded in the
    workers (what a CPU run does)."""
    import torch as _t
    pipe = distill_pipe(synth)
    split = load_split(pipe.data, "train")
    ref_samples, _ = online_result
    keys = [(s["meta"].index, s["meta"].variant_index) for s in ref_samples]
    runs = []
    for decode in (True, False):
        ds = DetectionDataset(split, pipe.data, train_variants(pipe.data), extra=CacheTargets(caches[codec], decode=decode))
        samples = [ds[k] for k in keys]
        box = samples[0]["teacher"]["box"]
        assert box.dtype == (_t.float32 if decode else {"int8": _t.uint8, "fp16": _t.float16}[codec])
        runs.append(distill_step(pipe, CachedTeacher(pipe, caches[codec]), samples, split))
    (la, ga), (lb, gb) = runs
    assert la == lb and _t.equal(ga, gb)
    hook = CachedTeacher(pipe, caches[codec])
    assert hook.sample_extra(_t.device("cpu")).decode
    assert not hook.sample_extra(_t.device("cuda")).decode  # (only the type: nothing runs on a GPU)


def test_int8_ld_loss_within_one_percent(synth, caches, online_result):
    pipe = distill_pipe(synth)
    split = load_split(pipe.data, "train")
    ref_samples, (ref_losses, _) = online_result
    keys = [(s["meta"].index, s["meta"].variant_index) for s in ref_samples]
    ds = DetectionDataset(split, pipe.data, train_variants(pipe.data), extra=CacheTargets(caches["int8"]))
    losses, _ = distill_step(pipe, CachedTeacher(pipe, caches["int8"]), [ds[k] for k in keys], split)
    for name in ("loss_ld", "loss_ld_vlr"):
        assert losses[name] == pytest.approx(ref_losses[name], rel=0.01), name


def test_refuses_other_reg_max(synth, caches):
    pipe = distill_pipe(synth, "models.student.reg_max=8")
    split = load_split(pipe.data, "train")
    with pytest.raises(CacheError) as err:
        CachedTeacher(pipe, caches["int8"]).check(pipe, "student", split)
    msg = str(err.value)
    assert "reg_max" in msg and "16" in msg and "8" in msg


def test_refuses_other_data_set(synth, caches, tmp_path):
    pipe = distill_pipe(synth_set(tmp_path / "other", n_train=8, n_val=2, seed=99))
    split = load_split(pipe.data, "train")
    with pytest.raises(CacheError) as err:
        CachedTeacher(pipe, caches["int8"]).check(pipe, "student", split)
    msg = str(err.value)
    data_fp = CacheTargets(caches["int8"]).reader.manifest.data.fingerprint
    assert "data set" in msg and data_fp[:16] in msg and split.fingerprint[:16] in msg


def test_region_policy_must_serve_losses(synth, teacher_ckpt, tmp_path):
    pipe = distill_pipe(synth, "cache.region=main")
    path = str(tmp_path / "main.zarr")
    dump_teacher(pipe, "teacher", teacher_ckpt, path, progress=False)
    split = load_split(pipe.data, "train")
    with pytest.raises(CacheError, match="cannot serve"):
        CachedTeacher(pipe, path).check(pipe, "student", split)
    # with VLR off, the main region serves LD and KD
    pipe_ok = distill_pipe(synth, "cache.region=main", "distill.vlr=false")
    CachedTeacher(pipe_ok, path).check(pipe_ok, "student", split)


def test_missing_anchor_is_an_error(synth, caches):
    pipe = distill_pipe(synth)
    split = load_split(pipe.data, "train")
    ds = DetectionDataset(split, pipe.data, train_variants(pipe.data), extra=CacheTargets(caches["fp32"]))
    idx = next(i for i, r in enumerate(split.records) if len(r.boxes))
    sample = ds[(idx, 0)]
    sample["teacher"] = {k: (v[:0] if torch.is_tensor(v) else v) for k, v in sample["teacher"].items()}
    cfg = pipe.model("student")
    batch = TrainCollate(cfg, len(split.classes), True)([sample])
    model = build_model(cfg, len(split.classes))
    hook = CachedTeacher(pipe, caches["fp32"])
    with pytest.raises(CacheError, match=f"image_id={sample['meta'].image_id}"):
        step_losses(model, model, batch, torch.device("cpu"), False, distill_criterion(pipe, hook))


def test_geometry_mismatch_is_an_error(synth, caches):
    pipe = distill_pipe(synth, "data.train_scales=[[192, 192]]")
    split = load_split(pipe.data, "train")
    with pytest.raises(CacheError, match="input scales"):
        CachedTeacher(pipe, caches["fp32"]).check(pipe, "student", split)
    ds = DetectionDataset(split, pipe.data, train_variants(pipe.data), extra=CacheTargets(caches["fp32"]))
    with pytest.raises(CacheError, match="shape"):
        ds[(0, 0)]


def test_each_step_reads_its_own_batch(synth, caches, online_result):
    """A hook reused across steps gives each batch its own teacher rows."""
    pipe = distill_pipe(synth)
    split = load_split(pipe.data, "train")
    ds = DetectionDataset(split, pipe.data, train_variants(pipe.data), extra=CacheTargets(caches["fp32"]))
    a = [ds[(i, 0)] for i in range(2)]
    b = [ds[(i, 1)] for i in range(2, 4)]
    fresh, _ = distill_step(pipe, CachedTeacher(pipe, caches["fp32"]), b, split)
    hook = CachedTeacher(pipe, caches["fp32"])
    distill_step(pipe, hook, a, split)
    again, _ = distill_step(pipe, hook, b, split)
    for name in ("loss_ld", "loss_ld_vlr", "loss_kd"):
        assert again[name] == fresh[name]


def test_self_ld_teacher_of_the_students_own_architecture(synth, tmp_path):
    """Self-LD: the cache comes from a checkpoint of the student's architecture and size."""
    pipe = distill_pipe(synth)
    split = load_split(pipe.data, "train")
    torch.manual_seed(1)
    own = build_model(pipe.model("student"), len(split.classes))
    ckpt = str(tmp_path / "self.pth")
    save_checkpoint(ckpt, own, {"ldpipe": {"model": "student"}})
    cache = str(tmp_path / "self.zarr")
    dump_teacher(pipe, "student", ckpt, cache, progress=False)
    manifest = CacheTargets(cache).reader.manifest
    assert manifest.teacher.model == "student"
    student = pipe.model("student")
    assert manifest.teacher.architecture["depth"] == student.depth
    assert manifest.teacher.architecture["channels"] == student.channels
    ds = DetectionDataset(split, pipe.data, train_variants(pipe.data), extra=CacheTargets(cache))
    idx = [i for i, r in enumerate(split.records) if len(r.boxes)][:2]
    losses, _ = distill_step(pipe, CachedTeacher(pipe, cache), [ds[(i, 0)] for i in idx], split)
    assert losses["loss_ld"] > 0 and losses["loss_ld_vlr"] > 0


def test_multi_scale_variants_round_trip(synth, teacher_ckpt, tmp_path):
    """Two input scales x flip = four variants; each cached sample matches its own geometry."""
    pipe = distill_pipe(synth, "data.train_scales=[[160, 160], [128, 128]]")
    cache = str(tmp_path / "ms.zarr")
    dump_teacher(pipe, "teacher", teacher_ckpt, cache, progress=False)
    reader = CacheTargets(cache).reader
    assert [v["key"] for v in reader.manifest.geometry.variants] == ["s0n", "s0f", "s1n", "s1f"]
    split = load_split(pipe.data, "train")
    hook = CachedTeacher(pipe, cache)
    hook.check(pipe, "student", split)
    variants = hook.variants(pipe)
    assert [(v.scale_idx, v.flip) for v in variants] == [(0, False), (0, True), (1, False), (1, True)]
    ds = DetectionDataset(split, pipe.data, variants, extra=CacheTargets(cache))
    for v in range(4):
        s = ds[(1, v)]
        assert max(s["meta"].img_shape) == (160 if v < 2 else 128)
        assert s["teacher"]["anchor"].numel() > 0 or len(s["gt_boxes"]) == 0
    losses, _ = distill_step(pipe, hook, [ds[(i, 3)] for i in range(2)], split)
    # the 128 px flipped variant's rows are those of a single-scale 128 px dump (same teacher,
    # same geometry), so the losses on them are too
    pipe128 = distill_pipe(synth, "data.train_scales=[[128, 128]]")
    single = str(tmp_path / "128.zarr")
    dump_teacher(pipe128, "teacher", teacher_ckpt, single, progress=False)
    ds128 = DetectionDataset(split, pipe128.data, train_variants(pipe128.data), extra=CacheTargets(single))
    want, _ = distill_step(pipe128, CachedTeacher(pipe128, single), [ds128[(i, 1)] for i in range(2)], split)
    for name in ("loss_ld", "loss_ld_vlr", "loss_kd"):
        assert losses[name] > 0 and losses[name] == want[name], name


def test_preloaded_reader_equals_shard_reads(caches):
    """A small cache is read a unit at a time and kept decoded; values equal per-sample shard reads."""
    from ldpipe.cache import CacheReader
    from ldpipe.cache.manifest import F
    for codec in ("fp32", "int8"):
        whole, direct = CacheReader(caches[codec]), CacheReader(caches[codec], preload_bytes=0)
        assert whole._open()["units"].decoded and not direct._open()["units"].decoded
        for rec in whole.table:
            i, v = int(rec[F["image_index"]]), int(rec[F["variant"]])
            x, y = whole.read(i, v), direct.read(i, v)
            assert torch.equal(x["anchor"], y["anchor"]) and torch.equal(x["box"], y["box"])
            assert torch.equal(x["cls"], y["cls"]) and x["geometry"] == y["geometry"]


def test_step_divergence_benchmark_trains_cached_and_online_alike(synth, teacher_ckpt, caches, tmp_path):
    """benchmarks.studies.step_divergence: whole `train-student` runs, step by step; the fp32 cache's
    first step is the online teacher's (the same targets), and a repeated run is identical."""
    import json as _json

    from benchmarks.studies import step_divergence

    over = [f"data.root={synth}", "train.workers=0", "data.train_scales=[[160, 160]]",
            "data.test_scale=[160, 160]", "train.batch_size=2"]
    over += [f"models.{m}.{kv}" for m in ("teacher", "student") for kv in TINY_KVS]
    over.append("models.teacher.channels=24")
    out = tmp_path / "div.json"
    args = [os.path.join(ROOT, "pipelines", "demo.toml"), "--teacher", teacher_ckpt,
            "--cache", f"fp32={caches['fp32']}", "--cache", f"int8={caches['int8']}", "--iters", "3",
            "--repeat", "--workdir", str(tmp_path / "runs"), "--json", str(out)]
    for o in over:
        args += ["-o", o]
    step_divergence.main(args)
    losses = _json.loads(out.read_text())["losses"]
    assert sorted(losses, key=int) == ["1", "2", "3"]
    first = losses["1"]
    assert first["fp32"] == pytest.approx(first["online"], rel=1e-5)
    assert first["int8"] == pytest.approx(first["online"], rel=1e-2)
    assert all(v["fp32 again"] == v["fp32"] for v in losses.values())  # bitwise reproducible


def test_ld_norm_image_makes_ld_per_image(synth, caches):
    """``distill.ld_norm = "image"``: LD and VLR of a batch of two copies of one image equal
    those of the image alone; the reference's sum (default) doubles them; class KD (a mean over
    positives per level) is the same either way."""
    got = {}
    for norm in ("sum", "image"):
        pipe = distill_pipe(synth, f"distill.ld_norm={norm}")
        split = load_split(pipe.data, "train")
        ds = DetectionDataset(split, pipe.data, train_variants(pipe.data), extra=CacheTargets(caches["fp32"]))
        idx = next(i for i, r in enumerate(split.records) if len(r.boxes))
        one, _ = distill_step(pipe, CachedTeacher(pipe, caches["fp32"]), [ds[(idx, 0)]], split)
        two, _ = distill_step(pipe, CachedTeacher(pipe, caches["fp32"]), [ds[(idx, 0)], ds[(idx, 0)]], split)
        got[norm] = (one, two)
    (one, two), (one_i, two_i) = got["sum"], got["image"]
    for k in ("loss_ld", "loss_ld_vlr"):
        assert one[k] > 0 and two[k] == pytest.approx(2 * one[k], rel=1e-5)
        assert one_i[k] == pytest.approx(one[k], rel=1e-6) and two_i[k] == pytest.approx(one[k], rel=1e-5)
    assert two["loss_kd"] == pytest.approx(one["loss_kd"], rel=1e-5)
    assert two_i["loss_kd"] == pytest.approx(two["loss_kd"], rel=1e-6)
