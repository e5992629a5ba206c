"""Careless and hostile inputs (issue 10): each ends in one ``Error:`` line naming the file, unit
or value (exit code 1), or succeeds correctly; none is silent, none is a traceback.

Data sets here are built in the test (tiny COCO sets of PIL images); the cache cases damage a
copy of one tiny dump.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mmcv
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from helpers import (DEMO_PIPELINE, SHARD, TINY_STUDENT, TINY_TEACHER, _empty, _flip,  # noqa: F401
                     _remove, cli_args, coco_overrides, coco_pipe, error_line, make_coco, write_jpeg)
from ldpipe.cache import CacheError, CacheReader
from ldpipe.cache.info import info
from ldpipe.cache.verify import verify
from ldpipe.cli import main as cli
from ldpipe.config import load_pipeline
from ldpipe.data import DataError, DetectionDataset, collate, load_split, train_variants
from ldpipe.data.decode import read_image
from ldpipe.engine import dump as dump_mod
from ldpipe.engine.dump import dump_teacher
from ldpipe.engine.dumplock import DumpLock, lock_url, stale_reason
from ldpipe.engine.infer import evaluate_checkpoint
from ldpipe.engine.train import train
from ldpipe.models.checkpoint import CheckpointError



# --------------------------------------------------------------------------- cache damage
@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_coco(tmp_path_factory.mktemp("fuzz-data"))


@pytest.fixture(scope="module")
def cache(data_root, tiny_teacher_ckpt, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("fuzz-cache") / "c")
    dump_teacher(coco_pipe(data_root, SHARD), "teacher", tiny_teacher_ckpt, path, device="cpu",
                 progress=False)
    return path


def _json(rel: str, edit):
    def damage(root: Path) -> None:
        p = root / rel
        doc = json.loads(p.read_text())
        edit(doc)
        p.write_text(json.dumps(doc))
    return damage


def _manifest(key: str, value):
    def edit(doc):
        d = doc["attributes"]["ldpipe_cache"]
        *path, last = key.split(".")
        for k in path:
            d = d[k]
        d[last] = value
    return _json("zarr.json", edit)


# (damage, what the error must name); image 2 (sample 2) lives in unit 1
DAMAGE = {
    "box shard deleted": (_remove("units/000001/box/c/*/*/*"), "units/000001/box"),
    "cls shard deleted": (_remove("units/000001/cls/c/*/*"), "units/000001/cls"),
    "box shard empty": (_empty("units/000001/box/c/*/*/*"), "units/000001/box"),
    "box shard corrupt": (_flip("units/000001/box/c/*/*/*"), "units/000001/box"),
    "anchor shard deleted": (_remove("units/000001/anchor/c/*"), "units/000001/anchor"),
    "unit deleted": (_remove("units/000001"), "units/000001"),
    "box array metadata deleted": (_remove("units/000001/box/zarr.json"), "units/000001/box"),
    "index samples deleted": (_remove("index/samples/c/*/*"), "index/samples"),
    "index unit deleted": (_remove("index/unit/c/*"), "index/unit"),
    "huge box shape": (_json("units/000001/box/zarr.json",
                             lambda d: d.__setitem__("shape", [4, 19, 10 ** 12])), "units/000001/box"),
    "stride 0": (_manifest("geometry.strides", [0, 16, 32, 64, 128]), "geometry.strides"),
    "huge sample count": (_manifest("num_samples", 10 ** 15), "num_samples"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_cache_is_named_by_reader_and_info(cache, tmp_path, case):
    damage, name = DAMAGE[case]
    path = tmp_path / "c"
    shutil.copytree(cache, path)
    damage(path)
    for preload in (128 << 20, 0):  # read whole units (checksummed) and slice by slice
        with pytest.raises(CacheError) as err:
            CacheReader(str(path), preload_bytes=preload).read(2, 0)
        msg = str(err.value)
        assert name in msg and str(path) in msg and "\n" not in msg, msg
        assert "region policy" not in msg and "data set" not in msg, msg
    line = error_line(CliRunner().invoke(cli, ["cache", "info", str(path)]), name)
    assert "region policy" not in line and "data set" not in line


def test_undamaged_cache_passes_the_checks(cache):
    """The checks pass a good cache (both read paths), and the rows are the stored ones."""
    whole, sliced = CacheReader(cache), CacheReader(cache, preload_bytes=0)
    for i, v in ((0, 0), (3, 0)):
        a, b = whole.read(i, v), sliced.read(i, v)
        assert a["box"].shape[0] > 0 and torch.equal(a["box"], b["box"])
    assert info(cache)["complete"] and verify(cache)["ok"]


@pytest.mark.parametrize("workers", [0, 1])
def test_train_student_stops_on_a_deleted_box_shard(cache, data_root, tmp_path, workers):
    """Also when the unit is read in a DataLoader worker (``train.workers = 1``): the worker's
    error arrives as its own one line, not torch's "Caught CacheError in DataLoader worker"."""
    path = tmp_path / "c"
    shutil.copytree(cache, path)
    _remove("units/000001/box/c/*/*/*")(path)
    student = cli_args(*TINY_STUDENT)
    args = ["train-student", DEMO_PIPELINE, "--model", "student", "--cache", str(path),
            "--work-dir", str(tmp_path / "s"), "--device", "cpu", *student,
            *sum((["-o", o] for o in coco_overrides(data_root, SHARD)), []),
            "-o", "models.student.train={}", "-o", f"train.workers={workers}"]
    line = error_line(CliRunner().invoke(cli, args), "units/000001/box")
    assert "DataLoader worker" not in line and "Traceback" not in line
    assert not (tmp_path / "s" / "latest.pth").exists()


# ------------------------------------------- the tiny COCO set (helpers.make_coco)


def _cli_load(root: Path, *extra: str):
    """``ldpipe eval`` stops at loading the split: the data errors come before the checkpoint."""
    args = ["eval", DEMO_PIPELINE, "--model", "teacher", "--checkpoint", "none.pth",
            "--split", "val"]
    return CliRunner().invoke(cli, args + sum((["-o", o] for o in coco_overrides(root, *extra)), []))


def _set(path: str, value):
    def edit(coco):
        *keys, last = path.split(".")
        d = coco
        for k in keys:
            d = d[int(k)] if k.isdigit() else d[k]
        d[int(last) if last.isdigit() else last] = value
    return edit


@pytest.mark.parametrize("edit,needles", [
    (_set("annotations.0.image_id", "1"), ["annotations[0].image_id", "'1'", "a string"]),
    (_set("images.2.id", "000003"), ["images[2].id", "'000003'", "not an integer"]),
    (_set("annotations.1.bbox", [1, 2, 3]), ["annotations[1]", "malformed bbox", "[1, 2, 3]"]),
    (_set("annotations.1.bbox", [1, 2, "wide", 3]), ["annotations[1]", "malformed bbox"]),
    (_set("images.0.width", "abc"), ["images[0]", "width", "'abc'"]),
    (_set("images.0.height", 0), ["images[0]", "height 0"]),
    (_set("images", []), ["has no images"]),
])
def test_malformed_coco_is_one_line_naming_the_entry(tmp_path, edit, needles):
    root = make_coco(tmp_path, edit=edit)
    error_line(_cli_load(root), str(root / "annotations" / "a.json"), *needles)


def test_orphan_annotations_are_counted_and_most_dropped_is_an_error(tmp_path, caplog):
    def orphans(k):
        def edit(coco):
            for a in coco["annotations"][:k]:
                a["image_id"] = 99
        return edit

    root = make_coco(tmp_path / "one", edit=orphans(1))
    with caplog.at_level(logging.WARNING, logger="ldpipe.data"):
        split = load_split(coco_pipe(root).data, "train")
    assert split.stats["annotations_orphaned"] == 1 and split.stats["boxes_kept"] == 3
    assert any("1 annotations name an image_id" in r.message and "99" in r.message
               for r in caplog.records)
    root = make_coco(tmp_path / "most", edit=orphans(3))
    error_line(_cli_load(root), "drops 3 of its 4 boxes", "3 annotations name an image_id",
               "data.max_dropped_boxes")
    split = load_split(coco_pipe(root, "data.max_dropped_boxes=1.0").data, "train")  # asked for
    assert split.stats["annotations_orphaned"] == 3 and split.stats["boxes_kept"] == 1


def test_voc_malformed_size_names_the_xml(tmp_path):
    root = tmp_path / "voc"
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True)
    write_jpeg(root / "JPEGImages" / "a.jpg", 64, 48)
    (root / "ImageSets/Main/train.txt").write_text("a\n")
    (root / "Annotations/a.xml").write_text(
        "<annotation><size><width>abc</width><height>48</height></size><object><name>thing</name>"
        "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>20</xmax><ymax>20</ymax></bndbox></object>"
        "</annotation>")
    pipe = load_pipeline(DEMO_PIPELINE, [f"data.root={root}", "data.format=voc",
                                         "data.classes=['thing']"])
    with pytest.raises(DataError) as err:
        load_split(pipe.data, "train")
    assert "a.xml" in str(err.value) and "<width>" in str(err.value) and "'abc'" in str(err.value)


# --------------------------------------------------------------------------------- images
def test_truncated_jpeg_decodes_through_the_fallback_with_a_warning(tmp_path, caplog):
    full, cut = tmp_path / "full.jpg", tmp_path / "cut.jpg"
    write_jpeg(full, 96, 64)
    data = full.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    # the premise: OpenCV 5 (through mmcv.imread) gives up on a JPEG that ends early
    assert mmcv.imread(str(cut)) is None
    with caplog.at_level(logging.WARNING, logger="ldpipe.data"):
        img = read_image(str(cut))
    assert img.shape == (64, 96, 3) and img.dtype == np.uint8
    assert any(str(cut) in r.message and "PIL" in r.message for r in caplog.records)
    # the decoded top half is the image's (BGR, as mmcv gives it)
    ref = mmcv.imread(str(full))
    assert np.abs(img[:16].astype(int) - ref[:16].astype(int)).mean() < 2
    from PIL import ImageFile
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # scoped to the fallback's call


def test_exif_orientation_against_the_annotated_size(tmp_path):
    # stored 64x48 with orientation 6 (rotate 90): decoded 48x64
    root = make_coco(tmp_path / "a")
    write_jpeg(root / "images" / "1.jpg", 64, 48, exif_orientation=6)
    pipe = coco_pipe(root)
    ds = DetectionDataset(load_split(pipe.data, "train"), pipe.data, train_variants(pipe.data))
    assert ds[0]["meta"].ori_shape == (48, 64)
    with pytest.raises(DataError) as err:  # annotated on the unrotated pixels: refused
        ds[1]
    msg = str(err.value)
    assert "1.jpg" in msg and "48x64" in msg and "64x48" in msg and "EXIF orientation 6" in msg
    # annotated in the decoded (rotated) frame: accepted
    root = make_coco(tmp_path / "b", edit=_set("images.1", {"id": 2, "file_name": "1.jpg",
                                                            "width": 48, "height": 64}))
    write_jpeg(root / "images" / "1.jpg", 64, 48, exif_orientation=6)
    pipe = coco_pipe(root)
    ds = DetectionDataset(load_split(pipe.data, "train"), pipe.data, train_variants(pipe.data))
    assert ds[1]["meta"].ori_shape == (64, 48)


def test_zero_byte_image_is_an_error_or_skipped_when_asked(tmp_path, tiny_teacher_ckpt, caplog):
    root = make_coco(tmp_path)
    (root / "images" / "2.jpg").write_bytes(b"")
    error_line(CliRunner().invoke(cli, ["dump-teacher", DEMO_PIPELINE, "--checkpoint",
                                        tiny_teacher_ckpt, "--out", str(tmp_path / "c"),
                                        "--device", "cpu",
                                        *sum((["-o", o] for o in coco_overrides(root)), [])]),
               "2.jpg", "empty (0 bytes)")
    # a dump never skips: the cache must hold every sample
    res = CliRunner().invoke(cli, ["dump-teacher", DEMO_PIPELINE, "--checkpoint", tiny_teacher_ckpt,
                                   "--out", str(tmp_path / "c2"), "--device", "cpu",
                                   *sum((["-o", o] for o in coco_overrides(
                                       root, "data.skip_undecodable_images=true")), [])])
    error_line(res, "2.jpg")
    pipe = coco_pipe(root, "data.skip_undecodable_images=true")
    ds = DetectionDataset(load_split(pipe.data, "train"), pipe.data, train_variants(pipe.data))
    batch = collate([ds[1], ds[2], ds[3]])
    assert batch["skipped"] == [str(root / "images" / "2.jpg")] and len(batch["metas"]) == 2
    assert collate([ds[2]]) == {"img": None, "metas": [], "skipped": [str(root / "images" / "2.jpg")]}
    metrics = evaluate_checkpoint(pipe, "teacher", tiny_teacher_ckpt, "val", device="cpu",
                                  progress=False)
    assert metrics["skipped_images"] == 1
    with caplog.at_level(logging.WARNING):
        ckpt = train(pipe, "teacher", str(tmp_path / "w"), device="cpu", progress=False)
    assert os.path.exists(ckpt)
    epoch = [json.loads(x) for x in open(tmp_path / "w" / "metrics.jsonl") if '"epoch"' in x]
    assert epoch[-1]["type"] == "epoch" and epoch[-1]["skipped_images"] == 1
    assert any("skipped 1 undecodable" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------------- config
@pytest.mark.parametrize("override,needles", [
    ("train.batch_size=0", ["train.batch_size", "got 0"]),
    ("train.workers=-1", ["train.workers", "got -1"]),
    ("data.train_scales=[[0, 160]]", ["data.train_scales[0]", "positive"]),
    ("data.test_scale=[-5, 160]", ["data.test_scale", "positive"]),
    ("cache.samples_per_shard=0", ["cache.samples_per_shard", "got 0"]),
    ("cache.batch_size=-2", ["cache.batch_size", "got -2"]),
    ("data.max_dropped_boxes=1.5", ["data.max_dropped_boxes", "1.5"]),
    ("models.teacher.strides=[0, 16]", ["models.teacher.strides"]),
])
def test_bad_values_are_one_line_errors(override, needles, synth_root):
    res = CliRunner().invoke(cli, ["eval", DEMO_PIPELINE, "--model", "teacher", "--checkpoint",
                                   "x.pth", "-o", f"data.root={synth_root}", "-o", override])
    error_line(res, "demo.toml", *needles)


@pytest.mark.parametrize("args,needles", [
    (["dump-teacher", "--batch-size", "0"], ["--batch-size", "got 0"]),
    (["dump-teacher", "--workers", "-1"], ["--workers", "got -1"]),
    (["eval", "--model", "teacher", "--batch-size", "0"], ["--batch-size", "got 0"]),
])
def test_bad_run_arguments(args, needles, synth_root, tiny_teacher_ckpt, tmp_path):
    cmd, *rest = args
    res = CliRunner().invoke(cli, [cmd, DEMO_PIPELINE, "--checkpoint", tiny_teacher_ckpt,
                                   *(["--out", str(tmp_path / "c")] if cmd == "dump-teacher" else []),
                                   *rest, "-o", f"data.root={synth_root}"])
    error_line(res, *needles)
    assert not (tmp_path / "c").exists()


def test_binary_pipeline_and_text_checkpoint(tmp_path, synth_root):
    binary = tmp_path / "p.toml"
    binary.write_bytes(bytes(range(256)) * 8)
    error_line(CliRunner().invoke(cli, ["eval", str(binary), "--model", "t", "--checkpoint", "x"]),
               str(binary), "binary")
    text = tmp_path / "model.pth"
    text.write_text("these are not the weights you are looking for\n")
    res = CliRunner().invoke(cli, ["eval", DEMO_PIPELINE, "--model", "teacher", "--checkpoint",
                                   str(text), "-o", f"data.root={synth_root}"])
    error_line(res, str(text), "not a PyTorch checkpoint")


# ------------------------------------------------------------------------------ full disk
def test_full_disk_during_dump_keeps_committed_units(tiny_teacher_ckpt, tmp_path, monkeypatch):
    root, out = make_coco(tmp_path / "d"), tmp_path / "c"  # 4 samples, 2 per unit
    real = dump_mod.write_unit

    def write_until_full(root, u, data, compressor, chunk_rows, **kw):
        if u >= 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out / "units" / f"{u:06d}"))
        real(root, u, data, compressor, chunk_rows, **kw)

    monkeypatch.setattr(dump_mod, "write_unit", write_until_full)
    args = ["dump-teacher", DEMO_PIPELINE, "--checkpoint", tiny_teacher_ckpt, "--out", str(out),
            "--device", "cpu",
            *sum((["-o", o] for o in coco_overrides(root, SHARD)), [])]
    error_line(CliRunner().invoke(cli, args), str(out), "units/000001", "No space left on device",
               "rerun")
    assert sorted(p.name for p in (out / "units").iterdir() if p.is_dir()) == ["000000"]
    assert not Path(lock_url(str(out))).exists()  # the lock went with the failed dump
    kept = (out / "units" / "000000" / "box" / "c" / "0" / "0" / "0").stat().st_mtime_ns
    monkeypatch.setattr(dump_mod, "write_unit", real)
    assert CliRunner().invoke(cli, args).exit_code == 0  # space again: the rerun resumes
    assert (out / "units" / "000000" / "box" / "c" / "0" / "0" / "0").stat().st_mtime_ns == kept
    assert verify(str(out))["ok"]


def test_full_disk_during_training_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    root = make_coco(tmp_path / "d")
    pipe = coco_pipe(root, "train.epochs=2")
    work = tmp_path / "w"
    import ldpipe.models.checkpoint as ck
    real, calls = torch.save, []

    def save_until_full(obj, f, *a, **k):
        calls.append(f)
        if len(calls) >= 2:
            with open(f, "wb") as fh:  # a partial file, as a full disk leaves it
                fh.write(b"PK\x03\x04 partial")
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(ck.torch, "save", save_until_full)
    with pytest.raises(CheckpointError) as err:
        train(pipe, "teacher", str(work), device="cpu", progress=False)
    assert "epoch_2.pth" in str(err.value) and "kept" in str(err.value)
    # beside the provenance and log files (pipeline.toml, run.json, runs.jsonl, train.log) and the
    # checkpoint ledger: the one good checkpoint, and no partial or temporary file left behind
    kept = ("pipeline.toml", "run.json", "runs.jsonl", "train.log", ".ldpipe-outputs")
    assert sorted(f for f in os.listdir(work) if f not in kept) == [
        "epoch_1.pth", "latest.pth", "metrics.jsonl"]
    assert os.readlink(work / "latest.pth") == "epoch_1.pth"
    monkeypatch.setattr(ck.torch, "save", real)
    torch.load(work / "epoch_1.pth", weights_only=True)  # intact


# ------------------------------------------------------------------------------ dump lock
def test_second_dump_into_one_out_is_refused_up_front(make_tiny_pipe, tiny_teacher_ckpt, tmp_path):
    out = str(tmp_path / "c")
    with DumpLock(out):  # a dump in progress (this process: alive)
        with pytest.raises(CacheError) as err:
            dump_teacher(make_tiny_pipe(), "teacher", tiny_teacher_ckpt, out, device="cpu",
                         progress=False)
        msg = str(err.value)
        assert "being written by another dump" in msg and f"pid {os.getpid()}" in msg, msg
        assert lock_url(out) in msg and not os.path.exists(out)
    assert not os.path.exists(lock_url(out))


def test_lock_of_a_killed_dump_is_taken_over(tmp_path, caplog):
    import socket
    import time
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = str(tmp_path / "c")
    Path(lock_url(out)).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                               "started": time.time(), "heartbeat": time.time()}))
    with caplog.at_level(logging.WARNING, logger="ldpipe.dump"):
        with DumpLock(out):
            holder = json.loads(Path(lock_url(out)).read_text())
            assert holder["pid"] == os.getpid()
    assert any("taking over" in r.getMessage() and f"process {dead.pid}" in r.getMessage()
               for r in caplog.records)
    assert not os.path.exists(lock_url(out))


def test_lock_staleness_rules():
    import socket
    import time
    now = time.time()
    assert stale_reason({"pid": os.getpid(), "host": socket.gethostname()}, now) is None
    assert stale_reason({"pid": 1, "host": "elsewhere", "heartbeat": now - 60}, now) is None
    assert "heartbeat" in stale_reason({"pid": 1, "host": "elsewhere", "heartbeat": now - 3600}, now)
    assert stale_reason({}, now) == "it is unreadable"


def test_memory_store_lock_refuses_a_second_holder():
    url = "memory://fuzz-lock-test/c"
    with DumpLock(url):
        with pytest.raises(CacheError, match="being written by another dump"):
            DumpLock(url).acquire()
    with DumpLock(url):  # released: free again
        pass
