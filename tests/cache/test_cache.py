"""The teacher cache: dump, regions, codecs, crash safety, corruption, and ``ldpipe cache``."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as Fn
from click.testing import CliRunner

from helpers import DEMO_PIPELINE, REPO, invoke, kl_rows, ld_kl
from ldpipe.cache import codec as C
from ldpipe.cache import CacheError, CacheReader
from ldpipe.cache.diff import diff
from ldpipe.cache.info import format_info, info
from ldpipe.cache.manifest import F
from ldpipe.cache.store import committed_units, open_root
from ldpipe.cache.verify import verify
from ldpipe.engine.dump import dump_teacher
from ldpipe.cli import main as cli
from ldpipe.data import DetectionDataset, collate, load_split, train_variants
from ldpipe.models import build_model
from ldpipe.models import image_targets
from ldpipe.models.anchors import grid_to_batch_index, make_grid
from ldpipe.models.checkpoint import load_weights

NUM_SAMPLES = 24  # 12 images x 2 variants (no flip, flip)


@pytest.fixture(scope="module")
def cache_at(make_tiny_pipe, tiny_teacher_ckpt, tmp_path_factory):
    """``cache_at(region, codec)`` -> path of a finished dump (made once per module)."""
    made: dict[tuple[str, str], str] = {}

    def get(region: str = "ld", codec: str = "int8") -> str:
        if (region, codec) not in made:
            out = str(tmp_path_factory.mktemp(f"cache-{region}-{codec}") / "c")
            pipe = make_tiny_pipe(f"cache.region={region}", f"cache.codec={codec}")
            dump_teacher(pipe, "teacher", tiny_teacher_ckpt, out, device="cpu", progress=False)
            made[region, codec] = out
        return made[region, codec]

    return get


def _samples(path: str):
    """(image_index, variant, decoded sample) for every sample of a cache."""
    r = CacheReader(path)
    for rec in r.table:
        i, v = int(rec[F["image_index"]]), int(rec[F["variant"]])
        yield i, v, r.read(i, v)


def _teacher_unit(pipe, ckpt: str, unit: int) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
    """Run the teacher on one unit's samples as the dump batches them (one batch per unit:
    zero padding to the batch's largest image changes GroupNorm statistics, so only the
    same batch reproduces the cached values bit for bit); own-grid log-probs per sample."""
    cfg = pipe.model("teacher")
    split = load_split(pipe.data, "train")
    variants = train_variants(pipe.data)
    nv, per = len(variants), pipe.cache.samples_per_shard
    assert pipe.cache.batch_size >= per
    ds = DetectionDataset(split, pipe.data, variants)
    model = build_model(cfg, len(split.classes))
    load_weights(model, ckpt)
    model.eval()
    numbers = range(unit * per, min((unit + 1) * per, len(split.records) * nv))
    items = [ds[(s // nv, s % nv)] for s in numbers]
    batch = collate(items)
    with torch.no_grad():
        dense = model(batch["img"])
    out = {}
    for b, s in enumerate(numbers):
        own = make_grid(items[b]["meta"].pad_shape, cfg.strides, cfg.anchor_scale)
        to_batch = grid_to_batch_index(list(own.sizes), dense.level_sizes)
        box = Fn.log_softmax(dense.reg[b, to_batch], dim=-1)
        cls = Fn.log_softmax(dense.cls[b, to_batch], dim=-1)
        out[s // nv, s % nv] = (box, cls)
    return out


def _mtimes(path: str) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in Path(path).rglob("*") if p.is_file()}


# ------------------------------------------------------------------ dump / verify / info
def test_dump_verifies_and_info_reports_sizes(cache_at):
    path = cache_at("ld", "int8")
    report = verify(path)
    assert report["ok"], report["errors"]
    assert report["checked"]["complete"] and report["checked"]["samples"] == NUM_SAMPLES
    d = info(path)
    json.dumps(d)
    assert d["complete"] and d["samples_committed"] == d["samples_planned"] == NUM_SAMPLES
    assert d["variants"] == ["s0n", "s0f"] and d["codec"] == "int8" and d["region"]["policy"] == "ld"
    assert d["stored_bytes"] > 0 and d["bytes_per_sample"] > 0
    assert 0 < d["ratio_to_dense_fp16"] < 1 and d["compression_factor"] > 1
    assert d["ratio_to_dense_fp16"] == pytest.approx(d["bytes_per_sample"] / d["dense_fp16_bytes_per_sample"])
    assert len(d["anchors_per_sample_per_level"]) == 5
    assert sum(d["anchors_per_sample_per_level"]) == pytest.approx(d["anchors_per_sample"])
    assert 0 < d["teacher_entropy_nats"] <= d["max_entropy_nats"] + 1e-6
    assert d["lineage"] and d["cache_id"] in d["lineage"][0]
    assert "ratio" in format_info(d)


def test_one_unit_cache_verifies(make_tiny_pipe, tiny_teacher_ckpt, tmp_path):
    """All samples in unit 0: ``index/unit`` is all zeros (the fill value) and must still be
    written, or verify would find its chunk missing."""
    out = str(tmp_path / "one")
    pipe = make_tiny_pipe("cache.samples_per_shard=64", "cache.region=main")
    dump_teacher(pipe, "teacher", tiny_teacher_ckpt, out, device="cpu", progress=False)
    assert len(committed_units(open_root(out))) == 1
    report = verify(out)
    assert report["ok"], report["errors"]


def test_chunk_rows_setting_changes_the_chunks_not_the_rows(make_tiny_pipe, tiny_teacher_ckpt,
                                                         cache_at, tmp_path):
    """``cache.chunk_rows`` sets the inner chunks of a unit's row arrays (recorded in the
    manifest and part of the cache's identity); every sample reads back the same rows as
    the default's (1024) cache."""
    out = str(tmp_path / "c16")
    dump_teacher(make_tiny_pipe("cache.chunk_rows=16"), "teacher", tiny_teacher_ckpt, out,
                 device="cpu", progress=False)
    default = cache_at("ld", "int8")
    small, big = CacheReader(out), CacheReader(default)
    assert small.manifest.chunk_rows == 16 and big.manifest.chunk_rows == 1024
    assert small.manifest.cache_id != big.manifest.cache_id
    g = open_root(out)["units/000000"]
    assert g["box"].chunks[-1] == 16 and g["cls"].chunks[-1] == 16 and g["anchor"].chunks == (16,)
    assert int(g.attrs["commit"]["rows"]) > 16  # several chunks per unit
    n = 0
    for (i, v, a), (_, _, b) in zip(_samples(out), _samples(default)):
        for key in ("anchor", "box", "cls"):
            assert torch.equal(a[key], b[key]), (i, v, key)
        n += 1
    assert n == NUM_SAMPLES and verify(out)["ok"]
    with pytest.raises(Exception, match="cache.chunk_rows must be >= 1"):
        make_tiny_pipe("cache.chunk_rows=0")


def test_format_v2_layout_rows_last_and_delta_filtered(cache_at):
    """docs/cache-format.md v2: box/cls stored [4, B', rows] / [C', rows]; 8-bit values and
    anchor indices delta-filtered; the reader returns the rows-first view of exactly that."""
    path = cache_at("ld", "int8")
    root = open_root(path)
    g = root["units/000000"]
    reader = CacheReader(path)
    rec = reader.table[0]
    start, count = int(rec[F["row_start"]]), int(rec[F["row_count"]])
    rows = int(g.attrs["commit"]["rows"])
    box, cls = g["box"][...], g["cls"][...]
    assert box.shape == (4, 17 + 2, rows) and box.dtype == np.uint8
    assert cls.shape == (4 + 2, rows)  # 4 synthetic classes
    for name in ("anchor", "box", "cls"):
        inner = g[name].metadata.to_dict()["codecs"][0]["configuration"]["codecs"]
        assert inner[0]["name"] == "numcodecs.delta", (name, inner)
    for name in ("samples", "scale"):
        inner = g[name].metadata.to_dict()["codecs"][0]["configuration"]["codecs"]
        assert inner[0]["name"] == "bytes", (name, inner)
    d = reader.read(int(rec[F["image_index"]]), int(rec[F["variant"]]))
    raw = np.moveaxis(box[..., start:start + count], -1, 0)
    assert torch.equal(d["box"], C.decode(raw[..., :17], raw[..., 17:].copy().view("<f2")[..., 0], "int8"))
    assert torch.equal(d["anchor"], torch.from_numpy(g["anchor"][start:start + count].astype(np.int64)))
    assert root.attrs["ldpipe_cache"]["format_version"] == 2


# ----------------------------------------------------------------------------- regions
def test_regions_main_is_atss_positives_ld_contains_it_dense_is_everything(cache_at, make_tiny_pipe):
    pipe = make_tiny_pipe()
    cfg, reader_cfg = pipe.model("teacher"), pipe.model("student")
    split = load_split(pipe.data, "train")
    ds = DetectionDataset(split, pipe.data, train_variants(pipe.data))
    main = {(i, v): d for i, v, d in _samples(cache_at("main", "fp32"))}
    ld = {(i, v): d for i, v, d in _samples(cache_at("ld", "int8"))}
    dense = {(i, v): d for i, v, d in _samples(cache_at("dense", "fp16"))}
    assert len(main) == len(ld) == len(dense) == NUM_SAMPLES
    n_pos = 0
    for (i, v), d in main.items():
        s = ds[(i, v)]
        pad = s["meta"].pad_shape
        assert d["geometry"].pad_shape == pad
        t = image_targets(s["gt_boxes"], s["gt_labels"], s["ignore_boxes"], pad, cfg.strides,
                          cfg.anchor_scale, len(split.classes), topk=reader_cfg.assigner.topk,
                          ignore_iof_thr=reader_cfg.assigner.ignore_iof_thr)
        pos_index = torch.nonzero(t.labels < t.num_classes).squeeze(1)
        assert torch.equal(d["anchor"], pos_index), (i, v)
        n_pos += pos_index.numel()
        assert np.isin(d["anchor"].numpy(), ld[i, v]["anchor"].numpy()).all(), (i, v)
        grid = make_grid(pad, cfg.strides, cfg.anchor_scale)
        assert torch.equal(dense[i, v]["anchor"], torch.arange(grid.num_anchors)), (i, v)
    assert n_pos > 0
    assert sum(d["anchor"].numel() for d in ld.values()) > n_pos  # the VLR adds anchors


# ------------------------------------------------------------------------------ codecs
def test_fp32_is_exactly_the_teachers_log_softmax(cache_at, make_tiny_pipe, tiny_teacher_ckpt):
    pipe = make_tiny_pipe("cache.codec=fp32", "cache.region=main")
    reader = CacheReader(cache_at("main", "fp32"))
    for unit in (0, 3):
        for (i, v), (box, cls) in _teacher_unit(pipe, tiny_teacher_ckpt, unit).items():
            d = reader.read(i, v)
            assert d["anchor"].numel() > 0
            assert torch.equal(d["box"], box[d["anchor"]]), (i, v)
            assert torch.equal(d["cls"], cls[d["anchor"]]), (i, v)


@pytest.fixture(scope="module")
def trained_caches(make_tiny_pipe, trained_tiny_teacher, tmp_path_factory):
    """main/fp32, dense/fp16 and ld/int8 dumps of the trained tiny teacher."""
    out = {}
    for region, codec in (("main", "fp32"), ("dense", "fp16"), ("ld", "int8")):
        path = str(tmp_path_factory.mktemp(f"trained-{region}-{codec}") / "c")
        pipe = make_tiny_pipe(f"cache.region={region}", f"cache.codec={codec}")
        dump_teacher(pipe, "teacher", trained_tiny_teacher, path, device="cpu",
                     progress=False)
        out[codec] = path
    return out


def test_codecs_keep_the_ld_loss_of_a_trained_teacher(trained_caches, cache_at):
    # training sharpened its edge distributions (what the codecs must survive) away from the
    # random teacher's near-uniform ones
    trained = info(trained_caches["fp32"])["teacher_entropy_nats"]
    random_ = info(cache_at("main", "fp32"))["teacher_entropy_nats"]
    assert trained < random_ - 0.1, (trained, random_)
    fp32, fp16, int8 = trained_caches["fp32"], trained_caches["fp16"], trained_caches["int8"]
    # same batches -> same teacher outputs; regions differ, compare on common anchors
    d16 = diff(fp32, fp16)
    assert d16["common"] == NUM_SAMPLES and d16["common_anchors"] > 0
    assert d16["max_abs_box"] <= 1e-2 and d16["max_abs_cls"] <= 1e-2
    d8 = diff(fp32, int8)
    assert d8["common"] == NUM_SAMPLES and d8["anchor_set_mismatches"] == NUM_SAMPLES  # ld ⊋ main
    assert d8["mean_kl"] < 1e-4

    readers = {c: CacheReader(p) for c, p in trained_caches.items()}
    rows = {c: [] for c in readers}
    for rec in readers["fp32"].table:
        i, v = int(rec[F["image_index"]]), int(rec[F["variant"]])
        ref = readers["fp32"].read(i, v)
        for c, r in readers.items():
            d = r.read(i, v)
            _, ia, ib = np.intersect1d(ref["anchor"].numpy(), d["anchor"].numpy(), return_indices=True)
            assert len(ia) == ref["anchor"].numel()
            rows[c].append(d["box"][torch.from_numpy(ib)].reshape(-1, d["box"].shape[-1]))
    t = {c: torch.cat(v) for c, v in rows.items()}
    gen = torch.Generator().manual_seed(0)
    # a student far from the teacher, and one that has nearly learned it (small losses, where
    # a codec's error weighs most)
    for student in (torch.randn(t["fp32"].shape, generator=gen) * 3.0,
                    t["fp32"] + torch.randn(t["fp32"].shape, generator=gen)):
        ref = ld_kl(t["fp32"], student)
        assert ref > 0
        assert abs(ld_kl(t["fp16"], student) - ref) / ref <= 1e-3
        assert abs(ld_kl(t["int8"], student) - ref) / ref <= 0.01


def _sharpened_losses(lp: torch.Tensor, k: float, T: float, gen: torch.Generator,
                      weights: torch.Tensor, step: float = 0.0) -> list[tuple[float, float]]:
    """(fp32, int8) loss pairs of the teacher ``lp`` sharpened ``k`` times (logits x k), for a
    far and a near student; weighted sum of per-row KDs as the LD/VLR/KD terms reduce them.
    ``step``: the int8 codec's smallest step (the dump's: ``BOX_STEP`` for box rows, 0 for cls)."""
    sharp = torch.log_softmax(lp.double() * k, dim=-1).float()
    e = C.encode(sharp, "int8", step)
    int8 = C.decode(e.values, e.scale, "int8")
    out = []
    for student in (torch.randn(sharp.shape, generator=gen) * 3.0,
                    sharp + torch.randn(sharp.shape, generator=gen)):
        pair = []
        for t in (sharp, int8):
            kl = kl_rows(t, student, T)
            kl = kl.mean(-1) if t.dim() == 3 else kl
            pair.append(float((kl * weights).sum()))
        out.append((pair[0], pair[1]))
    return out


def test_int8_holds_for_sharpened_teachers(trained_caches, monkeypatch):
    """A converged teacher has deep tails: the trained teacher's rows, and the same rows
    sharpened x3 and x5, keep the LD and VLR losses (T = 10) and the class KD (T = 2) within 1%
    of fp32 after the int8 codec - which the former clip at -40 nats did not."""
    r = CacheReader(trained_caches["fp32"])
    box = torch.cat([r.read(int(x[F["image_index"]]), int(x[F["variant"]]))["box"] for x in r.table])
    cls = torch.cat([r.read(int(x[F["image_index"]]), int(x[F["variant"]]))["cls"] for x in r.table])
    gen = torch.Generator().manual_seed(0)
    ones, iou = torch.ones(box.shape[0]), torch.rand(box.shape[0], generator=gen)
    assert box.min() > -C.CLIP
    deepest = {}
    assert C.BOX_STEP == 0.125 and CacheReader(trained_caches["int8"]).manifest.box_step == C.BOX_STEP
    for k in (1.0, 3.0, 5.0):
        deepest[k] = float(torch.log_softmax(box.double() * k, -1).min())
        # box rows as the dump stores them (on the 1/8-nat grid) and over their own range
        for name, rows, T, w, step in (("LD", box, 10.0, ones, C.BOX_STEP), ("VLR", box, 10.0, iou, C.BOX_STEP),
                                       ("LD", box, 10.0, ones, 0.0), ("KD", cls, 2.0, ones, 0.0)):
            for ref, got in _sharpened_losses(rows, k, T, gen, w, step):
                assert abs(got - ref) / ref <= 0.01, (name, k, step, ref, got)
    assert deepest[5.0] < -40 < deepest[1.0] / 2  # the sharpened rows do reach past the old clip
    former = dataclasses.replace(C.codec_for("int8"), clip=C.LEGACY_INT8_CLIP)
    monkeypatch.setitem(C.CODEC_TABLE, "int8", former)  # the former codec distorts them
    errors = [abs(got - ref) / ref for ref, got in _sharpened_losses(box, 5.0, 10.0, gen, ones)]
    assert max(errors) > 0.01, errors


def test_int8_box_step_is_recorded_and_makes_the_cache_smaller(make_tiny_pipe, trained_tiny_teacher,
                                                                 trained_caches, tmp_path):
    """cache.int8_box_step: the 1/8-nat grid (default) against each row over its own range (0):
    both recorded in the manifest and shown by `cache info`, told apart by their cache ids, the
    grid's box bytes smaller, and every stored box value within half a step of the fp32 one."""
    from ldpipe.config import ConfigError
    own = str(tmp_path / "own.zarr")
    dump_teacher(make_tiny_pipe("cache.region=ld", "cache.codec=int8", "cache.int8_box_step=0"),
                 "teacher", trained_tiny_teacher, own, device="cpu", progress=False)
    grid = trained_caches["int8"]
    a, b = info(grid), info(own)
    assert (a["codec_step"], b["codec_step"]) == (0.125, 0.0)
    assert "box step >= 0.125 nat" in format_info(a) and "each row over its own range" in format_info(b)
    assert a["cache_id"] != b["cache_id"] and a["anchors_per_sample"] == b["anchors_per_sample"]
    # step 0 writes what caches before the setting wrote: no field, the same identity
    assert "codec_step" not in CacheReader(own).manifest.to_dict()
    with pytest.raises(CacheError, match=r"to resume it, -o cache.int8_box_step=0"):
        dump_teacher(make_tiny_pipe("cache.region=ld", "cache.codec=int8"), "teacher",
                     trained_tiny_teacher, own, device="cpu", progress=False)
    assert CacheReader(own).manifest.cache_id == b["cache_id"]  # refused before anything was written
    assert a["stored_bytes_by_part"]["box"] < 0.9 * b["stored_bytes_by_part"]["box"]
    ref, r8 = CacheReader(trained_caches["fp32"]), CacheReader(grid)
    for rec in ref.table:
        i, v = int(rec[F["image_index"]]), int(rec[F["variant"]])
        x, d = ref.read(i, v), r8.read(i, v)
        _, ia, ib = np.intersect1d(x["anchor"].numpy(), d["anchor"].numpy(), return_indices=True)
        want, got = x["box"][torch.from_numpy(ia)], d["box"][torch.from_numpy(ib)]
        step = (-want.min(-1, keepdim=True).values / 255).clamp(min=0.125)
        assert ((got - want).abs() <= 0.5 * step.half().float() + 1e-4).all()
    for bad in ("2.0", "-0.1", "true"):
        with pytest.raises(ConfigError, match="int8_box_step"):
            make_tiny_pipe(f"cache.int8_box_step={bad}")


def _rewrite_unit0(path: str, transform) -> None:
    """Re-encode unit 0 of an int8 cache with ``transform`` applied to its box rows."""
    from ldpipe.cache.store import SampleRows, assemble_unit, write_unit
    r = CacheReader(path)
    m = r.manifest
    items = []
    for rec in r.table[r.table[:, F["sample"]] < m.samples_per_shard]:
        d = r.read(int(rec[F["image_index"]]), int(rec[F["variant"]]))
        g = d["geometry"]
        meta = {"index": int(rec[F["image_index"]]), "image_id": int(rec[F["image_id"]]),
                **dataclasses.asdict(g)}
        items.append(SampleRows(int(rec[F["sample"]]), meta, d["anchor"].to(torch.int32),
                                transform(torch.log_softmax(d["box"], -1)), torch.log_softmax(d["cls"], -1)))
    write_unit(open_root(path, "a"), 0, assemble_unit(items, "int8", m.num_variants), m.compressor,
               m.chunk_rows)


def test_verify_checks_int8_rows_are_normalised(make_tiny_pipe, tiny_teacher_ckpt, tmp_path):
    path = str(tmp_path / "c")
    dump_teacher(make_tiny_pipe("cache.codec=int8"), "teacher", tiny_teacher_ckpt, path, progress=False)
    # deep rows (a very sharp teacher: coarse 8-bit steps) are valid log-probabilities
    _rewrite_unit0(path, lambda lp: torch.log_softmax(lp * 400, -1))
    assert CacheReader(path).read(0, 0)["box"].min() < -100
    assert verify(path)["ok"], verify(path)["errors"]
    # rows that do not sum to one are not
    _rewrite_unit0(path, lambda lp: lp + 1.0)
    errors = verify(path)["errors"]
    assert errors and all("not finite normalised log-probabilities" in e for e in errors), errors
    assert "units/000000/box" in errors[0]


# ---------------------------------------------------------------------- crash safety
CRASH_SETTINGS = ("cache.samples_per_shard=2", "cache.batch_size=2")  # 12 small units


def _dump_cmd(tiny_overrides, ckpt: str, out: str) -> list[str]:
    cmd = [sys.executable, "-m", "ldpipe", "dump-teacher", DEMO_PIPELINE, "--checkpoint", ckpt,
           "--out", out, "--device", "cpu"]
    for o in (*tiny_overrides, *CRASH_SETTINGS):
        cmd += ["-o", o]
    return cmd


def _committed_on_disk(out: str) -> int:
    n = 0
    for meta in Path(out).glob("units/*/zarr.json"):
        try:
            n += '"commit"' in meta.read_text()
        except OSError:
            pass
    return n


@pytest.mark.slow
def test_killed_dump_resumes_to_the_same_bits(make_tiny_pipe, tiny_overrides, tiny_teacher_ckpt,
                                              tmp_path):
    # same thread count in the subprocesses as in this process, which makes the reference
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    crashed, reference = str(tmp_path / "crashed"), str(tmp_path / "reference")
    proc = subprocess.Popen(_dump_cmd(tiny_overrides, tiny_teacher_ckpt, crashed), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # the uninterrupted reference dump runs here while the subprocess starts up
        ref = threading.Thread(target=dump_teacher, kwargs=dict(
            pipe=make_tiny_pipe(*CRASH_SETTINGS), model_name="teacher", checkpoint=tiny_teacher_ckpt,
            out=reference, device="cpu", progress=False))
        ref.start()
        deadline = time.time() + 120
        while _committed_on_disk(crashed) == 0:
            assert proc.poll() is None, "the dump ended before committing a unit"
            assert time.time() < deadline, "no unit committed in time"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        ref.join()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    root = open_root(crashed)
    done = committed_units(root)
    planned = root.attrs["ldpipe_cache"]["num_units"]
    assert 1 <= len(done) < planned, "the kill came too late to test anything"
    interrupted = verify(crashed)
    assert not interrupted["ok"] and any("no commit" in e for e in interrupted["errors"])
    # also leave a torn unit behind, as a writer killed halfway through one would
    torn = min(u for u in range(planned) if u not in done)
    root = open_root(crashed, "a")
    g = root.require_group(f"units/{torn:06d}")
    g.create_array("box", shape=(3,), dtype="uint8", fill_value=0, overwrite=True)[...] = 7

    rerun = subprocess.run(_dump_cmd(tiny_overrides, tiny_teacher_ckpt, crashed), cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert json.loads(rerun.stdout.strip().splitlines()[-1])["rank_images"] == NUM_SAMPLES - 2 * len(done)
    assert verify(reference)["ok"]

    report = verify(crashed)
    assert report["ok"], report["errors"]
    d = diff(crashed, reference)
    assert d["common"] == d["samples_a"] == d["samples_b"] == NUM_SAMPLES
    assert d["only_a"] == d["only_b"] == 0 and d["anchor_set_mismatches"] == 0
    assert d["max_abs_box"] == 0 and d["max_abs_cls"] == 0 and d["mean_kl"] == 0


# ------------------------------------------------------------------------- corruption
def test_flipped_byte_in_a_shard_is_reported(cache_at, tmp_path):
    path = str(tmp_path / "c")
    shutil.copytree(cache_at("ld", "int8"), path)
    shard = sorted(p for p in Path(path).glob("units/*/box/c/**/*") if p.is_file())[0]
    unit = shard.relative_to(path).parts[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))

    report = verify(path)
    assert not report["ok"]
    assert any(f"units/{unit}/box" in e for e in report["errors"]), report["errors"]
    assert any(str(shard) in e for e in report["errors"]), report["errors"]

    res = invoke("cache", "verify", path)
    assert res.exit_code != 0 and f"units/{unit}/box" in res.output, res.output
    res = invoke("cache", "verify", path, "--json")
    assert res.exit_code != 0
    parsed = json.loads(res.output)
    assert parsed["ok"] is False and parsed["errors"]


def test_edited_array_fails_its_commit_checksum(cache_at, tmp_path):
    """A shard rewritten validly (crc32c fine) but with other content is caught by the sha256."""
    path = str(tmp_path / "c")
    shutil.copytree(cache_at("ld", "int8"), path)
    z = open_root(path, "a")["units/000001/anchor"]
    z[0] = z[0] + 1
    report = verify(path)
    assert not report["ok"]
    assert any("units/000001/anchor" in e and "sha256" in e for e in report["errors"]), report["errors"]


def test_missing_shard_and_short_complete_index_are_reported(cache_at, tmp_path):
    path = str(tmp_path / "c")
    shutil.copytree(cache_at("ld", "int8"), path)
    # zarr reads a missing shard as fill values without complaint; verify must not
    shard = next(p for p in (Path(path) / "units" / "000002" / "cls" / "c").rglob("*") if p.is_file())
    shard.unlink()
    # an index that claims to be complete but lost its last sample
    ix = open_root(path, "a")["index"]
    table = ix["samples"][...]
    ix["samples"].resize((table.shape[0] - 1, table.shape[1]))
    errors = verify(path)["errors"]
    assert any("units/000002/cls" in e and "missing" in e for e in errors), errors
    assert any("claims complete" in e and f"{NUM_SAMPLES - 1} samples" in e for e in errors), errors


# ------------------------------------------------------------------ reruns and refusals
def test_rerun_is_a_noop_and_other_codec_is_refused(cache_at, make_tiny_pipe, tiny_teacher_ckpt,
                                                    tmp_path):
    path = str(tmp_path / "c")
    shutil.copytree(cache_at("ld", "int8"), path)
    before = _mtimes(path)
    summary = dump_teacher(make_tiny_pipe(), "teacher", tiny_teacher_ckpt, path, device="cpu",
                           progress=False)
    assert summary["rank_images"] == 0
    assert _mtimes(path) == before
    with pytest.raises(CacheError) as err:
        dump_teacher(make_tiny_pipe("cache.codec=fp16"), "teacher", tiny_teacher_ckpt, path,
                     device="cpu", progress=False)
    msg = str(err.value)
    assert "codec" in msg and '"int8"' in msg and '"fp16"' in msg, msg
    assert _mtimes(path) == before


def test_dump_refuses_to_wipe_a_directory_that_is_not_a_cache(make_tiny_pipe, tiny_teacher_ckpt,
                                                              tmp_path):
    keep = tmp_path / "precious.txt"
    keep.write_text("data")
    with pytest.raises(CacheError, match="not an ldpipe cache"):
        dump_teacher(make_tiny_pipe(), "teacher", tiny_teacher_ckpt, str(tmp_path), device="cpu",
                     progress=False)
    assert keep.read_text() == "data"


# ------------------------------------------------------------------------------ fsspec
def test_memory_cache_info_verify_and_diff(make_tiny_pipe, tiny_teacher_ckpt, cache_at):
    import fsspec
    url = f"memory://ldpipe-test-{uuid.uuid4().hex}"
    try:
        dump_teacher(make_tiny_pipe(), "teacher", tiny_teacher_ckpt, url, device="cpu", progress=False)
        report = verify(url)
        assert report["ok"], report["errors"]
        d = info(url)
        assert d["complete"] and d["samples_committed"] == NUM_SAMPLES and d["bytes_per_sample"] > 0
        local = info(cache_at("ld", "int8"))
        assert d["stored_bytes_by_part"]["box"] == local["stored_bytes_by_part"]["box"]
        same = diff(url, cache_at("ld", "int8"))
        assert same["common"] == NUM_SAMPLES and same["max_abs_box"] == 0 and same["max_abs_cls"] == 0
    finally:
        fs = fsspec.filesystem("memory")
        if fs.exists(url.removeprefix("memory:/")):
            fs.rm(url.removeprefix("memory:/"), recursive=True)


# --------------------------------------------------------------------------------- CLI
def test_cli_json_outputs_and_bad_input(cache_at, synth_root):
    path = cache_at("ld", "int8")
    runner = CliRunner()
    res = runner.invoke(cli, ["cache", "info", path, "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["samples_committed"] == NUM_SAMPLES
    res = runner.invoke(cli, ["cache", "verify", path, "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["ok"] is True
    res = runner.invoke(cli, ["cache", "diff", path, cache_at("main", "fp32"), "--T", "5", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["T"] == 5.0
    res = runner.invoke(cli, ["cache", "info", path])
    assert res.exit_code == 0 and "per sample" in res.output and "lineage" in res.output

    for bad in (synth_root, str(Path(synth_root) / "annotations" / "train.json"),
                str(Path(synth_root) / "nothing-here")):
        res = runner.invoke(cli, ["cache", "info", bad])
        assert res.exit_code == 1
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error:") and bad in lines[0], res.output
    with pytest.raises(CacheError, match="nothing-here"):
        verify(str(Path(synth_root) / "nothing-here"))
