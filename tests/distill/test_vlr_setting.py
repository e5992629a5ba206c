"""``assigner.vlr_region``: the reference's VLR definition (default) vs true DIoU changes the
dumped ``ld`` region, the manifest, the student's VLR loss, and a cache of one definition
is refused for a student of the other."""
from __future__ import annotations

import pytest
import torch

from helpers import distill_pipe, distill_step, same_shape_batch
from ldpipe.cache import CacheError, CacheReader
from ldpipe.cache.diff import diff
from ldpipe.cache.info import format_info, info
from ldpipe.data import load_split
from ldpipe.distill import CachedTeacher
from ldpipe.engine.dump import dump_teacher

BOTH = [f"models.{m}.assigner.vlr_region={{r}}" for m in ("teacher", "ta", "student")]


def _pipe(synth, region, *extra):
    return distill_pipe(synth, *[o.format(r=region) for o in BOTH], *extra)


@pytest.fixture(scope="module")
def vlr_caches(synth, teacher_ckpt, tmp_path_factory):
    base = tmp_path_factory.mktemp("vlr")
    out = {}
    for region in ("reference", "diou"):
        out[region] = str(base / f"{region}.zarr")
        dump_teacher(_pipe(synth, region, "cache.codec=fp32"), "teacher", teacher_ckpt, out[region],
                     progress=False)
    return out


def test_default_is_the_reference_definition(synth):
    assert distill_pipe(synth).model("student").assigner.vlr_region == "reference"


def test_setting_changes_the_stored_region_and_the_manifest(vlr_caches):
    ref, true = (CacheReader(vlr_caches[r]) for r in ("reference", "diou"))
    assert [a["vlr_region"] for a in ref.manifest.region.assigners] == ["reference"]
    assert [a["vlr_region"] for a in true.manifest.region.assigners] == ["diou"]
    d = diff(vlr_caches["reference"], vlr_caches["diou"])
    assert d["anchor_set_mismatches"] > 0 and d["common"] == ref.table.shape[0]
    assert ref.table[:, 5].sum() != true.table[:, 5].sum()  # row_count: other region sizes
    # cache info tells the two apart: other cache ids, and the definition is printed
    a, b = info(vlr_caches["reference"]), info(vlr_caches["diou"])
    assert a["cache_id"] != b["cache_id"]
    assert "vlr=reference" in format_info(a) and "vlr=diou" in format_info(b)


def test_setting_changes_the_vlr_loss(synth, vlr_caches):
    losses = {}
    for region in ("reference", "diou"):
        pipe = _pipe(synth, region, "cache.codec=fp32")
        split = load_split(pipe.data, "train")
        hook = CachedTeacher(pipe, vlr_caches[region])
        samples = same_shape_batch(pipe, split, hook.sample_extra(torch.device("cpu")))
        losses[region], _ = distill_step(pipe, hook, samples, split)
    assert losses["reference"]["loss_ld"] == pytest.approx(losses["diou"]["loss_ld"], rel=1e-6)
    assert losses["reference"]["loss_ld_vlr"] != pytest.approx(losses["diou"]["loss_ld_vlr"], rel=1e-3)


def test_a_cache_of_the_other_definition_is_refused(synth, vlr_caches):
    pipe = _pipe(synth, "diou", "cache.codec=fp32")
    split = load_split(pipe.data, "train")
    with pytest.raises(CacheError) as err:
        CachedTeacher(pipe, vlr_caches["reference"]).check(pipe, "student", split)
    msg = str(err.value)
    assert "VLR region" in msg and "'reference'" in msg and "'diou'" in msg
    # without the VLR term the region's definition does not matter
    no_vlr = _pipe(synth, "diou", "cache.codec=fp32", "distill.vlr=false")
    CachedTeacher(no_vlr, vlr_caches["reference"]).check(no_vlr, "student", split)


def test_a_dense_cache_serves_both(synth, teacher_ckpt, tmp_path):
    path = str(tmp_path / "dense.zarr")
    dump_teacher(_pipe(synth, "reference", "cache.region=dense", "cache.codec=fp16"), "teacher",
                 teacher_ckpt, path, progress=False)
    for region in ("reference", "diou"):
        pipe = _pipe(synth, region, "cache.region=dense", "cache.codec=fp16")
        CachedTeacher(pipe, path).check(pipe, "student", load_split(pipe.data, "train"))
    assert torch.is_tensor(CacheReader(path).read(0, 0)["box"])


def test_a_teacher_only_assigner_override_is_named_as_doing_nothing(synth):
    """The dump's region follows the readers' assigners: overriding only the teacher's is a
    warning that names both settings (and none when the settings agree or the policy is dense)."""
    from ldpipe.cache.region import own_assigner_note, reader_settings
    pipe = distill_pipe(synth, "models.teacher.assigner.vlr_region=diou")
    note = own_assigner_note(pipe, "teacher", reader_settings(pipe, "teacher"))
    assert note and "models.teacher.assigner (vlr_region=diou" in note, note
    assert "student" in note and "vlr_region=reference" in note and "does not shape" in note, note
    same = _pipe(synth, "diou")
    assert own_assigner_note(same, "teacher", reader_settings(same, "teacher")) is None
    dense = distill_pipe(synth, "models.teacher.assigner.vlr_region=diou", "cache.region=dense")
    assert own_assigner_note(dense, "teacher", reader_settings(dense, "teacher")) is None
