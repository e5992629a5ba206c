"""Scale paths of the cache library: index lookup without per-sample objects, the parallel
verifier (same report as a sequential one), info on caches it does not list whole, and the
dump's writer threads (the same bits with 1 and 3 threads)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from ldpipe.cache.diff import diff
from ldpipe.cache.info import info, sized_objects
from ldpipe.cache.reader import SamplePositions, read_index
from ldpipe.cache.store import open_cache
from ldpipe.cache.verify import verify
from ldpipe.engine.dump import dump_teacher


def test_sample_positions_dense_sparse_and_unsorted():
    dense = SamplePositions(np.arange(6))
    assert dense.dense and [dense(s) for s in (0, 5, 6, -1)] == [0, 5, None, None]
    sparse = SamplePositions(np.array([0, 2, 3, 9]))
    assert not sparse.dense and [sparse(s) for s in (2, 9, 1, 10)] == [1, 3, None, None]
    shuffled = SamplePositions(np.array([7, 1, 4]))
    assert [shuffled(s) for s in (7, 1, 4, 2)] == [0, 1, 2, None]


@pytest.fixture(scope="module")
def two_caches(make_tiny_pipe, tiny_teacher_ckpt, tmp_path_factory):
    """The same dump written with 1 and with 3 writer threads (12 units of 2 samples)."""
    out = {}
    for k in (1, 3):
        path = str(tmp_path_factory.mktemp("wt") / f"t{k}.zarr")
        pipe = make_tiny_pipe("cache.samples_per_shard=2", "cache.batch_size=2", f"cache.writer_threads={k}")
        dump_teacher(pipe, "teacher", tiny_teacher_ckpt, path, device="cpu", progress=False)
        out[k] = path
    return out


def test_writer_threads_write_the_same_bits(two_caches):
    d = diff(two_caches[1], two_caches[3])
    assert d["common"] == d["samples_a"] == 24 and d["only_a"] == d["only_b"] == 0
    assert d["max_abs_box"] == 0 and d["max_abs_cls"] == 0 and d["anchor_set_mismatches"] == 0
    for k in (1, 3):
        assert verify(two_caches[k])["ok"]


def test_parallel_verify_reports_like_a_sequential_one(two_caches, tmp_path):
    path = str(tmp_path / "damaged.zarr")
    shutil.copytree(two_caches[1], path)
    for unit in ("000002", "000007"):  # two damaged units: both named, in unit order
        shard = sorted(p for p in Path(path).glob(f"units/{unit}/box/c/**/*") if p.is_file())[0]
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    one, many = verify(path, workers=1), verify(path, workers=4)
    assert not one["ok"] and one["errors"] == many["errors"] and one["checked"] == many["checked"]
    named = [e for e in many["errors"] if "/box" in e]
    assert "units/000002" in named[0] and "units/000007" in named[-1]


def test_info_sizes_from_spread_units(two_caches):
    root, m = open_cache(two_caches[1])
    table, _, unit_of = read_index(root, two_caches[1])
    exact, is_exact, listed = sized_objects(root, table, unit_of, m.num_units)
    assert is_exact and listed == 12  # a local cache is listed whole
    d = info(two_caches[1])
    assert d["stored_bytes_exact"] and d["stored_bytes"] == sum(exact.values())
    assert d["grid_anchors_per_sample"] > 0
