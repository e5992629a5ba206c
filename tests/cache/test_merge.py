"""``ldpipe cache merge``: the ensemble cache averages its teachers' probabilities."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from helpers import TINY_STUDENT as STUDENT
from ldpipe.cache import CacheError, CacheReader
from ldpipe.cache.manifest import F
from ldpipe.cache.manifest import Manifest
from ldpipe.cache.merge import merge, shared_differences
from ldpipe.cache.store import UnitData, from_disk, open_cache, open_root, write_unit
from ldpipe.cache.verify import verify
from ldpipe.cli import main as cli
from ldpipe.engine.dump import dump_teacher



@pytest.fixture(scope="module")
def second_teacher(make_tiny_pipe, tmp_path_factory) -> str:
    """Another tiny teacher (seed 1) with sharpened outputs: its distributions differ clearly."""
    from ldpipe.models import build_model
    from ldpipe.models.checkpoint import save_checkpoint
    torch.manual_seed(1)
    model = build_model(make_tiny_pipe().model("teacher"), 4)
    with torch.no_grad():
        model.bbox_head.gfl_reg.weight.mul_(40)
        model.bbox_head.gfl_cls.weight.mul_(40)
    path = str(tmp_path_factory.mktemp("teacher2") / "teacher2.pth")
    save_checkpoint(path, model, {})
    return path


@pytest.fixture(scope="module")
def caches(make_tiny_pipe, tiny_teacher_ckpt, second_teacher, tmp_path_factory):
    """``caches(codec, which)`` -> a dump of teacher 0 or 1 with that codec (region ``ld``)."""
    made = {}

    def get(codec: str, which: int, region: str = "ld") -> str:
        key = (codec, which, region)
        if key not in made:
            out = str(tmp_path_factory.mktemp(f"t{which}-{codec}-{region}") / "c.zarr")
            ckpt = (tiny_teacher_ckpt, second_teacher)[which]
            dump_teacher(make_tiny_pipe(f"cache.codec={codec}", f"cache.region={region}"), "teacher",
                         ckpt, out, device="cpu", progress=False)
            made[key] = out
        return made[key]

    return get


def _rows(path):
    r = CacheReader(path)
    return {(int(rec[F["image_index"]]), int(rec[F["variant"]])):
            r.read(int(rec[F["image_index"]]), int(rec[F["variant"]])) for rec in r.table}


def _np_average(*rows):
    """log(mean of softmax) with numpy, in float64."""
    def log_softmax(x):
        x = np.asarray(x, np.float64)
        m = x.max(-1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
    return np.log(np.mean([np.exp(log_softmax(r)) for r in rows], axis=0))


def test_fp32_merge_is_the_average_of_the_teachers_and_verifies(caches, tmp_path):
    a, b = caches("fp32", 0), caches("fp32", 1)
    out = str(tmp_path / "m.zarr")
    summary = merge([a, b], out)
    assert summary["teachers"] == 2 and summary["samples"] == 24
    checked = verify(out)
    assert checked["ok"], checked["errors"]
    ra, rb, rm = _rows(a), _rows(b), _rows(out)
    assert ra.keys() == rm.keys() and len(rm) == 24
    moved = 0.0
    for key, m in rm.items():
        assert torch.equal(m["anchor"], ra[key]["anchor"]) and m["geometry"] == ra[key]["geometry"]
        for name in ("box", "cls"):
            want = _np_average(ra[key][name].numpy(), rb[key][name].numpy())
            np.testing.assert_allclose(m[name].numpy(), want, rtol=0, atol=2e-5)
            moved = max(moved, float(np.abs(want - ra[key][name].numpy()).max()))
    assert moved > 0.5  # the teachers differ: the average is neither of them
    _, man = open_cache(out)
    _, ma = open_cache(a)
    _, mb = open_cache(b)
    assert man.format_version == ma.format_version and man.codec == "fp32"
    assert [e["cache_id"] for e in man.lineage["ensemble"]] == [ma.cache_id, mb.cache_id]
    assert man.teacher.architecture["type"] == "ensemble"
    assert man.cache_id not in (ma.cache_id, mb.cache_id) and man.cache_id == man.compute_id()
    again = merge([a, b], out)  # a rerun resumes: nothing to write, nothing changed
    assert again["units_reused"] == summary["units"] and again["cache_id"] == summary["cache_id"]


def test_int8_merge_from_the_cli_is_the_average_within_a_step(caches, tmp_path):
    a, b = caches("int8", 0), caches("int8", 1)
    out = str(tmp_path / "m8.zarr")
    runner = CliRunner()
    res = runner.invoke(cli, ["cache", "merge", a, b, "--out", out])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["teachers"] == 2
    res = runner.invoke(cli, ["cache", "verify", out])
    assert res.exit_code == 0 and res.output.rstrip().endswith("OK"), res.output
    res = runner.invoke(cli, ["cache", "info", out])
    assert res.exit_code == 0 and res.output.count("averages cache") == 2, res.output
    res = runner.invoke(cli, ["cache", "merge", a, caches("fp32", 1), "--out", str(tmp_path / "bad")])
    assert res.exit_code == 1 and res.output.startswith("Error: cannot merge") and "codec" in res.output
    ra, rb, rm = _rows(a), _rows(b), _rows(out)
    box_step = CacheReader(out).manifest.box_step  # the sources' int8 box step, kept
    assert box_step == CacheReader(a).manifest.box_step > 0
    for key, m in rm.items():
        for name in ("box", "cls"):
            want = _np_average(ra[key][name].numpy(), rb[key][name].numpy())
            step = np.maximum(-want.min(-1, keepdims=True) / 255.0, box_step if name == "box" else 0.0)
            err = np.abs(m[name].numpy() - want)
            assert (err <= 0.51 * step + 1e-5).all(), float((err / step).max())


def test_student_trains_from_the_merged_cache(caches, make_tiny_pipe, tmp_path):
    from ldpipe.engine.student import train_student
    out = str(tmp_path / "m.zarr")
    merge([caches("int8", 0), caches("int8", 1)], out)
    pipe = make_tiny_pipe(*STUDENT, "train.epochs=1", "train.batch_size=2", "train.max_iters_per_epoch=2",
                          "train.warmup_iters=2", "train.log_interval=1")
    wd = str(tmp_path / "student")
    ckpt = train_student(pipe, "student", wd, cache=out, device="cpu", progress=False)
    assert os.path.exists(ckpt)
    with open(os.path.join(wd, "metrics.jsonl")) as fh:
        recs = [r for r in map(json.loads, fh) if r["type"] == "train"]
    assert len(recs) == 2 and all(r["loss_ld"] > 0 and r["loss_kd"] > 0 for r in recs)
    meta = torch.load(ckpt, weights_only=True, map_location="cpu")["meta"]
    assert "ensemble" in json.dumps(meta["ldpipe"]["lineage"])


def test_refusals_name_the_difference(caches, tmp_path):
    a = caches("int8", 0)
    with pytest.raises(CacheError, match=r'codec: cache 1 \(.*\) has "int8", cache 2 \(.*\) has "fp32"'):
        merge([a, caches("fp32", 1)], str(tmp_path / "x"))
    _, ma = open_cache(a)
    other = Manifest.parse(ma.to_dict(), "x")
    other.region.policy, other.geometry.reg_max = "main", 8
    assert shared_differences(ma, other, "A", "B") == ['geometry.reg_max: A has 16, B has 8',
                                                       'region.policy: A has "ld", B has "main"']
    with pytest.raises(CacheError, match="at least two caches"):
        merge([a], str(tmp_path / "x"))
    with pytest.raises(CacheError, match="is one of the caches to merge"):
        merge([a, caches("int8", 1)], a)
    # same settings, but one sample's stored anchors differ
    bent = str(tmp_path / "bent.zarr")
    shutil.copytree(caches("int8", 1), bent)
    root = open_root(bent, "a")
    g = root["units/000000"]
    arrays = {k: g[k][...] for k in ("samples", "scale", "anchor", "box", "cls")}
    arrays["anchor"][1] += 1
    data = UnitData(arrays["samples"], arrays["scale"], arrays["anchor"],
                    np.ascontiguousarray(from_disk("box", arrays["box"])),
                    np.ascontiguousarray(from_disk("cls", arrays["cls"])))
    write_unit(root, 0, data, "zstd", 1024)
    rec = arrays["samples"][0]
    with pytest.raises(CacheError, match=rf"sample 0 \(image {int(rec[F['image_id']])}, variant .*\): "
                                         "the stored anchors differ"):
        merge([a, bent], str(tmp_path / "y"))
    assert not os.path.exists(str(tmp_path / "y"))  # refused before writing anything

