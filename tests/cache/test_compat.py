"""``check_compatible`` refuses, before the first step, every cache that cannot serve the
student; each message names the cache's value and the student's."""
from __future__ import annotations

import copy

import pytest

from helpers import TINY_STUDENT as STUDENT
from ldpipe.cache import CacheError, CacheReader
from ldpipe.cache.compat import check_compatible
from ldpipe.data import load_split
from ldpipe.engine.dump import dump_teacher

ALL = {"ld", "vlr", "kd"}


@pytest.fixture(scope="module")
def cache(make_tiny_pipe, tiny_teacher_ckpt, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("refusals") / "c")
    dump_teacher(make_tiny_pipe(*STUDENT), "teacher", tiny_teacher_ckpt, path, device="cpu",
                 progress=False)
    return path


@pytest.fixture(scope="module")
def manifest(cache):
    return CacheReader(cache).manifest


def _stored(cache) -> int:
    return CacheReader(cache).table.shape[0]


def _refusal(cache, manifest, pipe, terms=ALL) -> str:
    split = load_split(pipe.data, "train")
    with pytest.raises(CacheError) as err:
        check_compatible(manifest, cache, _stored(cache), pipe.model("student"), pipe.data, "student",
                         split, terms)
    return str(err.value)


def test_compatible_cache_passes(cache, manifest, make_tiny_pipe):
    pipe = make_tiny_pipe(*STUDENT)
    check_compatible(manifest, cache, _stored(cache), pipe.model("student"), pipe.data, "student",
                     load_split(pipe.data, "train"), ALL)


@pytest.mark.parametrize("override,what,cache_value,ours", [
    ("models.student.strides=[8, 16, 32, 64]", "strides", "[8, 16, 32, 64, 128]", "[8, 16, 32, 64]"),
    ("models.student.anchor_scale=6.0", "anchor_scale", "8.0", "6.0"),
    ("data.pad_divisor=64", "pad_divisor", "32", "64"),
    ("models.student.assigner.topk=7", "assigner", "[(9, -1.0)]", "(7, -1.0)"),
    ("models.student.assigner.ignore_iof_thr=0.5", "assigner", "[(9, -1.0)]", "(9, 0.5)"),
])
def test_geometry_and_assigner_refusals_name_both_values(cache, manifest, make_tiny_pipe, override,
                                                         what, cache_value, ours):
    msg = _refusal(cache, manifest, make_tiny_pipe(*STUDENT, override))
    line = next(x for x in msg.splitlines() if x.strip().startswith(f"- {what}"))
    assert cache_value in line and ours in line and "'student'" in line, msg
    assert line.index(cache_value) < line.index(ours), msg  # "the cache has X, model has Y"


def test_other_classes_refused(cache, manifest, make_tiny_pipe):
    other = copy.deepcopy(manifest)
    theirs = ["a", "b", "c", "d"]
    other.geometry.classes = theirs
    pipe = make_tiny_pipe(*STUDENT)
    msg = _refusal(cache, other, pipe)
    ours = load_split(pipe.data, "train").classes
    assert "classes" in msg and repr(theirs) in msg and repr(list(ours)) in msg, msg


def test_several_problems_are_reported_together(cache, manifest, make_tiny_pipe):
    msg = _refusal(cache, manifest, make_tiny_pipe(*STUDENT, "models.student.anchor_scale=6.0",
                                                   "models.student.reg_max=8"))
    assert "- reg_max" in msg and "- anchor_scale" in msg, msg


def test_kd_needs_stored_class_logits(cache, manifest, make_tiny_pipe):
    no_cls = copy.deepcopy(manifest)
    no_cls.store_cls = False
    pipe = make_tiny_pipe(*STUDENT)
    msg = _refusal(cache, no_cls, pipe, ALL)
    assert "store_cls=false" in msg and "distill.kd=false" in msg, msg
    # the same cache serves LD and VLR
    check_compatible(no_cls, cache, _stored(cache), pipe.model("student"), pipe.data, "student",
                     load_split(pipe.data, "train"), {"ld", "vlr"})


def test_incomplete_cache_refused(cache, manifest, make_tiny_pipe):
    more = copy.deepcopy(manifest)
    stored = manifest.num_samples
    more.num_samples = stored + 5
    msg = _refusal(cache, more, make_tiny_pipe(*STUDENT))
    assert "incomplete" in msg and f"{stored} of {stored + 5} samples" in msg, msg


def test_augmentation_against_a_fixed_variant_cache_is_refused_naming_both(cache, manifest, make_tiny_pipe):
    """A student whose pipeline declares [[data.augment]] cannot read a cache of the fixed
    variants: the teacher never saw those inputs."""
    pipe = make_tiny_pipe(*STUDENT, 'data.augment=[{type="Resize", img_scale=[[160,96],[160,160]]}]')
    msg = _refusal(cache, manifest, pipe)
    assert "augmentation: the cache holds the teacher's outputs for the fixed variants ['s0n', 's0f']" in msg
    assert "data.augment [Resize]" in msg and "[[160, 96], [160, 160]]" in msg and "--online-teacher" in msg
