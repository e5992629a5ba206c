"""Paths that alias, nest or cannot be (issue 23, items 2, 4 and 5): a write never eats what
the command reads, however either place is spelled (a ``file://`` URL, a symlinked folder);
one lock per cache; a damaged merge input is an error naming it; each bad path or value is
one ``Error:`` line (exit code 1) naming it.

The caches are dumps of the 4-image COCO set of ``test_fuzz.py`` (2 units of 2 samples).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from helpers import SHARD, _empty, _flip, _remove, coco_overrides, coco_pipe

from helpers import DEMO_PIPELINE, error_line, invoke, make_coco
from ldpipe.cache import CacheError
from ldpipe.cache.merge import merge
from ldpipe.cache.verify import verify
from ldpipe.engine.dump import dump_teacher
from ldpipe.engine.dumplock import DumpLock, lock_url
from ldpipe.files import canonical_location, location_relation


def _o(root: Path, *extra: str) -> list[str]:
    return sum((["-o", o] for o in coco_overrides(root, SHARD, *extra)), [])


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_coco(tmp_path_factory.mktemp("paths-data"))


@pytest.fixture(scope="module")
def source(data_root, tiny_teacher_ckpt, tmp_path_factory) -> str:
    """A complete cache; tests copy it (into a folder of their own) before anything risky."""
    path = str(tmp_path_factory.mktemp("paths-cache") / "c.zarr")
    dump_teacher(coco_pipe(data_root, SHARD), "teacher", tiny_teacher_ckpt, path, device="cpu",
                 progress=False)
    return path


def _pair(source: str, where: Path) -> tuple[str, str]:
    """Two copies of ``source`` in ``where``: inputs a merge may (try to) destroy."""
    where.mkdir(parents=True, exist_ok=True)
    a, b = str(where / "a.zarr"), str(where / "b.zarr")
    shutil.copytree(source, a)
    shutil.copytree(source, b)
    return a, b


def _merge(*args: str):
    return invoke("cache", "merge", *args)


# ------------------------------------------------------------------------- one spelling
def test_canonical_location_resolves_urls_and_symlinks(tmp_path):
    (tmp_path / "real" / "c").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    real = os.path.realpath(tmp_path / "real" / "c")
    for spelling in (str(tmp_path / "real" / "c"), f"file://{tmp_path}/real/c", f"{tmp_path}/link/c",
                     f"{tmp_path}/real/./c/", f"local://{tmp_path}/link/c"):
        assert canonical_location(spelling) == real, spelling
    assert canonical_location("memory://x/c") == canonical_location("memory:///x/c/") == "memory://x/c"
    assert canonical_location("S3://bucket//c/") == "s3://bucket/c"
    assert location_relation(f"{tmp_path}/link/c", str(tmp_path / "real")) == "inside"
    assert location_relation(f"file://{tmp_path}/link", str(tmp_path / "real" / "c")) == "contains"
    assert location_relation(str(tmp_path / "real" / "cc"), str(tmp_path / "real" / "c")) is None
    assert location_relation("s3://b/c", "memory://b/c") is None


# ------------------------------------------------------------------ merge: the inputs stay
def test_merge_cannot_eat_its_inputs_however_spelled(source, tmp_path):
    a, b = _pair(source, tmp_path / "in")
    (tmp_path / "link").symlink_to(tmp_path / "in")
    for out, needle in ((f"file://{a}", "is one of the caches to merge"),
                        (str(tmp_path / "link" / "a.zarr"), "is one of the caches to merge"),
                        (str(tmp_path / "in"), "contains one of the caches to merge"),
                        (str(tmp_path / "link"), "contains one of the caches to merge"),
                        (str(Path(b) / "nested"), "lies inside one of the caches to merge")):
        line = error_line(_merge(a, b, "--out", out, "--overwrite"), f"--out {out}", needle)
        assert "choose another --out" in line
    assert verify(a)["ok"] and verify(b)["ok"]  # untouched
    assert sorted(os.listdir(b)) == sorted(os.listdir(source))


def test_merge_out_a_file_or_a_symlink_with_overwrite(source, tmp_path):
    a, b = _pair(source, tmp_path / "in")
    file = tmp_path / "notes.txt"
    file.write_text("mine\n")
    error_line(_merge(a, b, "--out", str(file), "--overwrite"), str(file), "is a file, not a cache")
    assert file.read_text() == "mine\n"
    error_line(_merge(a, b, "--out", str(file / "m.zarr")), str(file), "is a file, not a folder")
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("mine\n")
    link = tmp_path / "m.zarr"
    link.symlink_to(target)
    error_line(_merge(a, b, "--out", str(link), "--overwrite"), str(link), "symbolic link",
               str(target))
    assert (target / "keep.txt").read_text() == "mine\n"
    # without --overwrite, into a link to an empty folder: the cache is written through it
    (target / "keep.txt").unlink()
    res = _merge(a, b, "--out", str(link))
    assert res.exit_code == 0, res.output
    assert link.is_symlink() and (target / "zarr.json").exists() and verify(str(link))["ok"]


# ----------------------------------------------------------- merge: damaged inputs refused
DAMAGE = {  # (damage, the array named); unit 000001 holds images 2 and 3
    "box shard deleted": (_remove("units/000001/box/c/*/*/*"), "units/000001/box"),
    "cls shard deleted": (_remove("units/000001/cls/c/*/*"), "units/000001/cls"),
    "box shard empty": (_empty("units/000001/box/c/*/*/*"), "units/000001/box"),
    "anchor shard deleted": (_remove("units/000001/anchor/c/*"), "units/000001/anchor"),
    "samples shard empty": (_empty("units/000001/samples/c/*/*"), "units/000001/samples"),
    "index samples deleted": (_remove("index/samples/c/*/*"), "index/samples"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_merge_refuses_a_damaged_input_before_writing(source, tmp_path, case):
    damage, name = DAMAGE[case]
    a, b = _pair(source, tmp_path / "in")
    damage(Path(b))
    out = str(tmp_path / "m.zarr")
    with pytest.raises(CacheError) as err:
        merge([a, b], out)
    msg = str(err.value)
    assert b in msg and name in msg and "\n" not in msg, msg
    assert not os.path.exists(out)  # found by the checks before anything was written


def test_merge_refuses_a_corrupt_input_shard_from_the_cli(source, tmp_path):
    """A flipped byte passes the listing checks; the chunk's crc32c (or the commit's sha256)
    stops the merge when the unit is read, naming the source, unit and array."""
    a, b = _pair(source, tmp_path / "in")
    _flip("units/000001/cls/c/*/*")(Path(b))
    line = error_line(_merge(a, b, "--out", str(tmp_path / "m.zarr")), b, "units/000001/cls")
    assert "verify" in line


# --------------------------------------------------------------- dump: what it reads stays
def test_dump_out_cannot_be_or_enclose_its_checkpoint_or_data(tiny_teacher_ckpt, tmp_path):
    data_root = make_coco(tmp_path / "d" / "coco")
    ckpt = tmp_path / "ckpt" / "t.pth"
    ckpt.parent.mkdir()
    shutil.copy(tiny_teacher_ckpt, ckpt)
    (tmp_path / "alias").symlink_to(tmp_path / "ckpt")

    def dump(out: str):
        return invoke("dump-teacher", DEMO_PIPELINE, "--checkpoint", str(ckpt),
                      "--out", out, "--overwrite", "--device", "cpu",
                      *_o(data_root))

    for out, needles in ((str(tmp_path / "alias" / "t.pth"), ["is the teacher checkpoint"]),
                         (str(tmp_path / "alias"), ["contains the teacher checkpoint"]),
                         (f"file://{data_root}", ["is data.root"]),
                         (str(data_root.parent), ["contains data.root"]),
                         (str(data_root / "images"), ["is an image folder of split 'train'"]),
                         (str(data_root / "annotations" / "a.json"), ["is the annotations"])):
        error_line(dump(out), f"--out {out}", *needles)
    assert ckpt.stat().st_size > 0 and len(list((data_root / "images").iterdir())) == 4
    # a cache below the data folder is fine (and is the one written through --overwrite)
    res = dump(str(data_root / "caches" / "c.zarr"))
    assert res.exit_code == 0, res.output


# ------------------------------------------------------------------------ one lock per cache
def test_one_lock_per_cache_however_it_is_spelled(make_tiny_pipe, tiny_teacher_ckpt, tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    out = str(tmp_path / "real" / "c")
    assert lock_url(str(tmp_path / "alias" / "c")) == lock_url(f"file://{out}") == lock_url(out)
    with DumpLock(out):
        for spelling in (str(tmp_path / "alias" / "c"), f"file://{out}"):
            with pytest.raises(CacheError, match="being written by another dump"):
                dump_teacher(make_tiny_pipe(), "teacher", tiny_teacher_ckpt, spelling, device="cpu",
                             progress=False)
    assert not os.path.exists(out) and not os.path.exists(lock_url(out))


def test_a_lock_path_that_is_a_directory_is_one_error_line(data_root, tiny_teacher_ckpt, tmp_path):
    out = tmp_path / "c"
    Path(lock_url(str(out))).mkdir()
    res = invoke("dump-teacher", DEMO_PIPELINE, "--checkpoint", tiny_teacher_ckpt,
                 "--out", str(out), "--device", "cpu", *_o(data_root))
    error_line(res, str(out), lock_url(str(out)), "is a directory")
    assert not out.exists()


# ----------------------------------------------------------------- bad paths and values: one line
def test_predict_out_below_a_file_and_a_one_pixel_high_image(data_root, tiny_teacher_ckpt, tmp_path):
    base = ["predict", DEMO_PIPELINE, "--model", "teacher", "--checkpoint", tiny_teacher_ckpt,
            "--device", "cpu", *_o(data_root)]
    file = tmp_path / "f.txt"
    file.write_text("x")
    res = invoke(*base, "--out", str(file / "p"), str(data_root / "images"))
    error_line(res, str(file / "p"), "is a file, not a folder")
    thin = tmp_path / "thin.png"
    Image.fromarray(np.zeros((1, 5000, 3), np.uint8)).save(thin)
    res = invoke(*base, "--out", str(tmp_path / "p"), str(thin))
    error_line(res, str(thin), "5000x1", "too thin")


@pytest.mark.parametrize("args,needles", [
    (["--num-anchors", "0"], ["--num-anchors 0", "at least 1"]),
    (["--out", "x.xyz"], ["--out x.xyz", ".xyz", ".png"]),
])
def test_cache_show_bad_arguments(data_root, source, tmp_path, args, needles):
    base = ["cache", "show", DEMO_PIPELINE, source, "--image", "1", "--out", str(tmp_path / "s.png")]
    error_line(invoke(*base, *args, *_o(data_root)), *needles)
    assert os.listdir(tmp_path) == []


def test_export_out_through_a_symlinked_folder_is_the_checkpoint(tiny_overrides, tiny_teacher_ckpt,
                                                                  tmp_path):
    ckpt = tmp_path / "ckpt" / "t.pth"
    ckpt.parent.mkdir()
    shutil.copy(tiny_teacher_ckpt, ckpt)
    (tmp_path / "alias").symlink_to(tmp_path / "ckpt")
    before = ckpt.read_bytes()
    base = ["export", DEMO_PIPELINE, "--model", "teacher", "--checkpoint", str(ckpt),
            *sum((["-o", o] for o in tiny_overrides), [])]
    error_line(invoke(*base, "--out", str(tmp_path / "alias" / "t.pth")),
               "is the checkpoint being exported")
    pipeline = tmp_path / "p.toml"
    shutil.copy(DEMO_PIPELINE, pipeline)
    res = invoke("export", str(pipeline), *base[2:], "--out", str(pipeline),
                 "--format", "pth")
    error_line(res, "is the pipeline file")
    (tmp_path / "f.txt").write_text("x")
    error_line(invoke(*base, "--out", str(tmp_path / "f.txt" / "e.pth")),
               str(tmp_path / "f.txt"), "is a file, not a folder")
    assert ckpt.read_bytes() == before
