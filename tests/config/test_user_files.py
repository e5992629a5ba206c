"""Files named by a user path (issue 23, item 3) and table overrides (item 6).

A pipeline file, an ``extends`` base and a COCO annotation file that is a device
(``/dev/zero`` would be read forever), a FIFO (it would block), a directory, a symbolic link
to a device or a file over its bound ends in one ``Error:`` line naming the file and what it
is, within seconds; and ``-o KEY={}`` never resets a table silently.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from helpers import REPO, error_line
from ldpipe import files
from ldpipe.cli import main as cli
from ldpipe.config import ConfigError, load_pipeline
from ldpipe.data import DataError, load_split

DEMO = str(REPO / "pipelines" / "demo.toml")
LIMIT_S = 20  # each invocation ends in well under a second; a blocked open would never end


def invoke(args: list[str], fifo: Path | None = None):
    """``ldpipe ARGS`` through click's runner in a thread that must end within ``LIMIT_S``
    (a read blocked on ``fifo`` is released by opening its write end, then the test fails)."""
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(res=CliRunner().invoke(cli, args)),
                              daemon=True)
    thread.start()
    thread.join(LIMIT_S)
    if thread.is_alive():
        if fifo is not None:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(5)
        pytest.fail(f"ldpipe {' '.join(args)} did not end within {LIMIT_S} s")
    return out["res"]


def _special(kind: str, tmp_path: Path, bound: int) -> tuple[str, list[str]]:
    """A path of the given ``kind`` and the words its error must hold."""
    if kind in ("/dev/zero", "/dev/urandom"):
        return kind, [kind, "is a character device, not a regular file"]
    if kind == "fifo":
        path = tmp_path / "fifo"
        os.mkfifo(path)
        return str(path), [str(path), "is a FIFO, not a regular file"]
    if kind == "directory":
        path = tmp_path / "folder"
        path.mkdir()
        return str(path), [str(path), "is a directory, not a regular file"]
    if kind == "link":
        path = tmp_path / "link"
        path.symlink_to("/dev/zero")
        return str(path), [str(path), "a link to /dev/zero", "is a character device"]
    assert kind == "oversized"
    path = tmp_path / "big"
    with open(path, "wb") as fh:
        fh.truncate(bound + 1)  # sparse: nothing is written, nothing needs to be read
    return str(path), [str(path), f"({bound + 1} bytes), above the", "bound"]


KINDS = ["/dev/zero", "/dev/urandom", "fifo", "directory", "link", "oversized"]


def _fifo(path: str) -> Path | None:
    return Path(path) if path.endswith("fifo") else None


@pytest.mark.parametrize("kind", KINDS)
def test_pipeline_file(kind, tmp_path):
    path, needles = _special(kind, tmp_path, files.PIPELINE_FILE_BOUND)
    res = invoke(["config", "show", path], _fifo(path))
    last = error_line(res, "pipeline file", *needles)
    if kind == "oversized":
        assert "above the 1 MiB bound for pipeline files" in last


@pytest.mark.parametrize("kind", KINDS)
def test_extends_base(kind, tmp_path):
    path, needles = _special(kind, tmp_path, files.PIPELINE_FILE_BOUND)
    top = tmp_path / "top.toml"
    top.write_text(f'extends = "{path}"\n')
    res = invoke(["config", "show", str(top)], _fifo(path))
    last = error_line(res, str(top), "extends base", *needles)
    if kind == "oversized":
        assert "above the 1 MiB bound for extends bases" in last


@pytest.mark.parametrize("kind", KINDS)
def test_coco_annotation_file(kind, tmp_path, synth_root):
    path, needles = _special(kind, tmp_path, files.ANNOTATION_FILE_BOUND)
    res = invoke(["eval", DEMO, "--model", "teacher", "--checkpoint", str(tmp_path / "x.pth"),
                  "-o", f"data.root={synth_root}", "-o", f"data.val={path}"], _fifo(path))
    last = error_line(res, "annotation file", *needles)
    if kind == "oversized":
        assert "above the 2 GiB bound for annotation files" in last


def test_voc_xml_and_split_list(tmp_path):
    root = tmp_path / "voc"
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True)
    os.mkfifo(root / "ImageSets/Main/train.txt")
    pipe = load_pipeline(DEMO, [f"data.root={root}", "data.format=voc", "data.classes=['thing']"])
    with pytest.raises(DataError, match="split file .*train.txt is a FIFO, not a regular file"):
        load_split(pipe.data, "train")
    (root / "ImageSets/Main/train.txt").unlink()
    (root / "ImageSets/Main/train.txt").write_text("a\n")
    (root / "Annotations/a.xml").mkdir()
    with pytest.raises(DataError, match="annotation file .*a.xml is a directory, not a regular file"):
        load_split(pipe.data, "train")


def test_read_bounded_reads_to_the_bound_only(tmp_path):
    small = tmp_path / "small.toml"
    small.write_bytes(b"x" * 100)
    assert files.read_bounded(small, 100, "pipeline file") == b"x" * 100
    with pytest.raises(ConfigError, match=r"is 101 bytes, above the 100 bytes bound for pipeline files"):
        small.write_bytes(b"x" * 101)
        files.read_bounded(small, 100, "pipeline file", ConfigError)
    with pytest.raises(FileNotFoundError):  # for the caller to name as it did
        files.read_bounded(tmp_path / "missing", 100, "pipeline file")
    # a file whose stat tells no size (procfs: 0) is read past it, to the bound + 1 at most
    proc = Path("/proc/self/status")
    if not proc.exists() or proc.stat().st_size:
        pytest.skip("no /proc/self/status of stat size 0")
    assert b"Name:" in files.read_bounded(proc, 1 << 20, "status file")
    with pytest.raises(files.LdpipeError, match="grew above the 16 bytes bound for status files"):
        files.read_bounded(proc, 16, "status file")


# ----------------------------------------------------------------------- table overrides
def test_empty_table_over_a_model_section_is_refused():
    res = invoke(["config", "show", DEMO, "-o", "models.teacher={}"])
    error_line(res, "models.teacher={}", "demo.toml", "empty one", "defaults", "depth",
               "-o models.teacher.KEY=VALUE")
    error_line(invoke(["config", "show", DEMO, "-o", "models={}"]), "models={}", "student, teacher")


def test_empty_train_table_clears_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="ldpipe.config"):
        res = invoke(["config", "show", DEMO, "-o", "models.teacher.train={}"])
    assert res.exit_code == 0, res.output
    said = [r.getMessage() for r in caplog.records if r.name == "ldpipe.config"]
    assert any("clears models.teacher.train" in m and "epochs, steps" in m and "[train]" in m
               for m in said), said
    pipe = load_pipeline(DEMO, ["models.teacher.train={}"])
    assert pipe.model("teacher").train == {} and pipe.schedules["teacher"] == pipe.train


def test_a_table_that_drops_keys_says_which(caplog):
    with caplog.at_level(logging.WARNING, logger="ldpipe.config"):
        pipe = load_pipeline(DEMO, ["models.teacher.train={epochs = 3}"])
        load_pipeline(DEMO, ["models.student.train={}", "models.student.train={epochs = 2}"])
    assert pipe.model("teacher").train == {"epochs": 3}
    said = [r.getMessage() for r in caplog.records if r.name == "ldpipe.config"]
    assert any("replaces the table models.teacher.train" in m and "models.teacher.train.steps" in m
               for m in said), said
    # nothing dropped, nothing said: the table was already empty, or the override keeps its keys
    assert not any("models.student.train={epochs = 2}" in m for m in said), said
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ldpipe.config"):
        load_pipeline(DEMO, ["models.teacher.train={epochs = 3, steps = [2]}", "models.ta.train={}"])
    assert not [r for r in caplog.records if r.name == "ldpipe.config"]


@pytest.mark.parametrize("kind", ["dev_zero", "fifo", "dir"])
def test_a_checkpoint_that_is_no_regular_file_is_named(kind, tmp_path):
    """``--checkpoint /dev/zero`` (or a FIFO, a folder) is named for what it is, never opened."""
    from ldpipe.models.checkpoint import CheckpointError, load_file
    path = {"dev_zero": "/dev/zero", "fifo": str(tmp_path / "f"), "dir": str(tmp_path)}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    what = {"dev_zero": "a device", "fifo": "a FIFO", "dir": "a directory"}[kind]
    with pytest.raises(CheckpointError, match=f"is {what}, not a regular file"):
        load_file(path)
