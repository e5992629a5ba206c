"""Every row a student reads is bound to its unit's commit (issue 23, item 1), on the direct path.

A cache above the reader's preload size is read straight from its shards (``ShardRows``), which
checks each chunk's crc32c: that says a chunk is undamaged, not that it is the chunk its unit
committed.  Each case below passes every crc32c - a shard swapped, copied or symlinked between
two units with the same chunk count (68 and 69 rows in 8-row chunks: 9 full-size chunks each),
two entries of a shard index swapped, a chunk re-encoded with its crc32c recomputed, two index
table entries' row ranges swapped, two unit groups swapped - and must be refused in one line
naming the unit and the array, by the reader (direct and preloaded), by ``train-student``
(``Error:``, exit 1) and by ``cache verify``.  The cache is the tiny COCO set of
``test_fuzz`` with a box per image in another place, so the two units' anchors differ.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import google_crc32c
import numcodecs
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ldpipe.cache import CacheError, CacheReader
from ldpipe.cache import reader as reader_mod
from ldpipe.cache.manifest import F
from ldpipe.cache.shards import ShardBinding, shard_rows
from ldpipe.cache.store import ROWS_LAST, open_root
from ldpipe.cache.verify import verify
from ldpipe.cli import main as cli
from ldpipe.engine.dump import dump_teacher
from helpers import DEMO_PIPELINE, coco_overrides, coco_pipe, error_line, make_coco

SETTINGS = ("cache.samples_per_shard=2", "cache.chunk_rows=8")  # units 000000 (images 0, 1), 000001
KEY = {"anchor": "c/0", "cls": "c/0/0", "box": "c/0/0/0"}
STUDENT = ["-o", "models.student.depth=18", "-o", "models.student.base_channels=8",
           "-o", "models.student.channels=16", "-o", "models.student.stacked_convs=1"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    def edit(coco):  # the box of image i moves with i: the units' anchors (and row counts) differ
        for i, ann in enumerate(coco["annotations"]):
            ann["bbox"] = [4 + 3 * i, 4 + 2 * (i % 2), 30, 20]
    return make_coco(tmp_path_factory.mktemp("bind-data"), edit=edit)


@pytest.fixture(scope="module")
def cache(data_root, tiny_teacher_ckpt, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("bind-cache") / "c")
    dump_teacher(coco_pipe(data_root, *SETTINGS), "teacher", tiny_teacher_ckpt, path, device="cpu",
                 progress=False)
    return path


# ------------------------------------------------------------------------- the damage
def _shard(root: Path, u: int, name: str) -> Path:
    return root / "units" / f"{u:06d}" / name / KEY[name]


def _parts(data: bytes, n: int) -> tuple[list[bytes], np.ndarray]:
    """The chunks (in row-chunk order) and the index of a shard of ``n`` chunks."""
    idx = np.frombuffer(data[-(16 * n + 4):-4], "<u8").reshape(n, 2)
    return [data[int(o):int(o) + int(b)] for o, b in idx], idx


def _with_index(chunks_in_order: list[bytes], idx: np.ndarray) -> bytes:
    body = idx.astype("<u8").tobytes()
    return b"".join(chunks_in_order) + body + google_crc32c.value(body).to_bytes(4, "little")


def _crc(frame: bytes) -> bytes:
    return frame + google_crc32c.value(frame).to_bytes(4, "little")


def _swap(name):
    def damage(root: Path) -> None:
        a, b = _shard(root, 0, name), _shard(root, 1, name)
        data = a.read_bytes()
        a.write_bytes(b.read_bytes())
        b.write_bytes(data)
    return damage


def _copy(name):
    def damage(root: Path) -> None:
        _shard(root, 1, name).write_bytes(_shard(root, 0, name).read_bytes())
    return damage


def _link(name):
    def damage(root: Path) -> None:
        b = _shard(root, 1, name)
        b.unlink()
        b.symlink_to(_shard(root, 0, name).resolve())
    return damage


def _swap_index_entries(name, j=0, k=1):
    """Entries j and k of the shard index exchanged, the index's crc32c recomputed."""
    def damage(root: Path) -> None:
        p = _shard(root, 1, name)
        data = p.read_bytes()
        idx = _parts(data, 9)[1].copy()
        idx[[j, k]] = idx[[k, j]]
        p.write_bytes(data[:-(16 * 9 + 4)] + _with_index([], idx))
    return damage


def _reencode(name, same_size: bool, k=0):
    """Chunk k decoded, one byte of it changed, compressed again with a fresh crc32c; the shard
    rebuilt around it (same size: the index stays as it was, only the chunk's bytes differ)."""
    def damage(root: Path) -> None:
        p = _shard(root, 1, name)
        chunks, idx = _parts(p.read_bytes(), 9)
        zstd = numcodecs.Zstd(level=3)
        raw = bytearray(zstd.decode(chunks[k][:-4]))
        for pos in range(len(raw)):
            edited = bytearray(raw)
            edited[pos] = (edited[pos] + 1) % 256
            frame = _crc(zstd.encode(bytes(edited)))
            if (len(frame) == len(chunks[k])) == same_size:
                break
        else:
            raise AssertionError("no edit of that size")
        chunks[k] = frame
        order = np.argsort(idx[:, 0])
        new, at = idx.copy(), 0
        for i in order:
            new[i] = (at, len(chunks[i]))
            at += len(chunks[i])
        p.write_bytes(_with_index([chunks[i] for i in order], new))
        assert (new == idx).all() == same_size
    return damage


def _swap_row_ranges(root: Path) -> None:
    """The index table's row ranges of samples 2 and 3 (unit 000001) exchanged."""
    z = open_root(str(root), "a")["index/samples"]
    t = z[...]
    cols = [F["row_start"], F["row_count"]]
    t[2, cols], t[3, cols] = t[3, cols].copy(), t[2, cols].copy()
    z[...] = t


def _swap_units(root: Path) -> None:
    a, b, tmp = root / "units" / "000000", root / "units" / "000001", root / "units" / "tmp"
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


# case -> (damage, the array the error names, the units it may name)
CASES = {
    "box shard swapped": (_swap("box"), "box", "01"),
    "anchor shard swapped": (_swap("anchor"), "anchor", "01"),
    "cls shard copied": (_copy("cls"), "cls", "1"),
    "box shard copied": (_copy("box"), "box", "1"),
    "box shard symlinked": (_link("box"), "box", "1"),
    "anchor shard symlinked": (_link("anchor"), "anchor", "1"),
    "box shard index entries swapped": (_swap_index_entries("box"), "box", "1"),
    "box chunk re-encoded, same size": (_reencode("box", True), "box", "1"),
    "box chunk re-encoded, other size": (_reencode("box", False), "box", "1"),
    "anchor chunk re-encoded": (_reencode("anchor", True), "anchor", "1"),
    "index entries' row ranges swapped": (_swap_row_ranges, "index/samples", "1"),
    "unit groups swapped": (_swap_units, "index/samples", "01"),
}


def _damaged(cache: str, tmp_path: Path, case: str) -> Path:
    path = tmp_path / "c"
    shutil.copytree(cache, path, symlinks=True)
    CASES[case][0](path)
    return path


def _names(msg: str, case: str) -> bool:
    _, array, units = CASES[case]
    if array.startswith("index/"):
        return array in msg and any(f"units/00000{u}" in msg for u in units)
    return any(f"units/00000{u}/{array}" in msg for u in units)


# ------------------------------------------------------------------------- the tests
def test_the_dump_binds_every_shard(cache):
    """Each array's commit binding is what its shard holds; the cache reads on both paths."""
    root = open_root(cache)
    for u in (0, 1):
        g = root[f"units/{u:06d}"]
        commit = g.attrs["commit"]
        assert sorted(commit["shards"]) == sorted(commit["sha256"]) == ["anchor", "box", "cls", "samples", "scale"]
        assert commit["rows"] in (68, 69)
        for name, raw in commit["shards"].items():
            z = g[name]
            fast = shard_rows(z, z.ndim - 1 if name in ROWS_LAST else 0, name)
            assert fast.stored_binding() == ShardBinding.parse(raw, name)
            assert fast.n_chunks == (9 if name in KEY else 1)
    direct, whole = CacheReader(cache, preload_bytes=0), CacheReader(cache)
    for i in range(4):
        a, b = direct.read(i, 0), whole.read(i, 0)
        assert all(torch.equal(a[k], b[k]) for k in ("anchor", "box", "cls"))
    assert not direct._open()["units"].decoded and whole._open()["units"].decoded
    assert not torch.equal(direct.read(0, 0)["anchor"][:5], direct.read(2, 0)["anchor"][:5])
    assert verify(cache)["ok"]


@pytest.mark.parametrize("case", list(CASES))
def test_a_swapped_or_edited_shard_is_refused_by_the_reader(cache, tmp_path, case):
    path = _damaged(cache, tmp_path, case)
    for preload in (0, 128 << 20):  # the direct path (a cache above the preload size), then whole
        with pytest.raises(CacheError) as err:
            reader = CacheReader(str(path), preload_bytes=preload)
            for i in (2, 3, 0, 1):  # unit 000001 first
                reader.read(i, 0)
        msg = str(err.value)
        assert _names(msg, case) and str(path) in msg and "\n" not in msg, (preload, msg)
        assert reader._open()["units"].decoded == bool(preload)
    problems = verify(str(path))["errors"]
    assert problems and any(_names(p, case) or "index row" in p for p in problems), problems


@pytest.mark.parametrize("case,workers", [(c, 0) for c in CASES] + [("box shard copied", 1)])
def test_train_student_on_a_cache_above_the_preload_size_stops_naming_unit_and_array(
        cache, data_root, tmp_path, case, workers, monkeypatch):
    """``train.workers = 1``: the reader is pickled into the worker with the preload limit it
    was made with, and the worker's error arrives as the one line."""
    path = _damaged(cache, tmp_path, case)
    monkeypatch.setattr(reader_mod, "PRELOAD_BYTES", 0)  # every cache is above it: direct reads
    opened = []
    real = reader_mod.UnitArrays.__init__

    def spy(self, *a, **kw):
        real(self, *a, **kw)
        opened.append(self.decoded)
    monkeypatch.setattr(reader_mod.UnitArrays, "__init__", spy)
    args = ["train-student", DEMO_PIPELINE, "--model", "student", "--cache", str(path),
            "--work-dir", str(tmp_path / "s"), "--device", "cpu", *STUDENT,
            *sum((["-o", o] for o in coco_overrides(data_root, *SETTINGS)), []),
            "-o", "models.student.train={}", "-o", f"train.workers={workers}"]
    line = error_line(CliRunner().invoke(cli, args), str(path))
    assert _names(line, case) and "DataLoader worker" not in line, line
    if not workers:  # (a worker's UnitArrays is made in its own process)
        assert opened and not any(opened), opened  # the direct path, not whole units
    assert not (tmp_path / "s" / "latest.pth").exists()


def test_old_caches_without_bindings_keep_working_and_keep_their_checks(cache, tmp_path):
    """A cache whose commits have no ``shards`` (written before them) reads as before, equal
    values; the index entries are still checked against its commits' sha256, a damaged chunk
    still fails its crc32c, and a unit read whole its sha256."""
    path = tmp_path / "old"
    shutil.copytree(cache, path)
    for u in (0, 1):
        meta = path / "units" / f"{u:06d}" / "zarr.json"
        doc = json.loads(meta.read_text())
        del doc["attributes"]["commit"]["shards"]
        meta.write_text(json.dumps(doc))
    old, new = CacheReader(str(path), preload_bytes=0), CacheReader(cache, preload_bytes=0)
    for i in range(4):
        assert torch.equal(old.read(i, 0)["box"], new.read(i, 0)["box"])
    assert verify(str(path))["ok"]
    for case in ("index entries' row ranges swapped", "unit groups swapped", "box shard copied"):
        copy = tmp_path / re.sub(r"\W", "_", case)
        shutil.copytree(path, copy)
        CASES[case][0](copy)
        with pytest.raises(CacheError, match=r"units/00000[01]") as err:
            reader = CacheReader(str(copy), preload_bytes=0 if "index" in CASES[case][1] else 128 << 20)
            for i in (2, 3):
                reader.read(i, 0)
        assert _names(str(err.value), case), str(err.value)


def test_a_partial_or_malformed_binding_is_refused(cache, tmp_path):
    path = tmp_path / "c"
    shutil.copytree(cache, path)
    meta = path / "units" / "000001" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["commit"]["shards"]["box"]["chunk_crc32c"] = "xyz"
    meta.write_text(json.dumps(doc))
    with pytest.raises(CacheError, match=r"units/000001/box: its commit's shard binding is malformed"):
        CacheReader(str(path), preload_bytes=0).read(2, 0)
    del doc["attributes"]["commit"]["shards"]["box"]
    meta.write_text(json.dumps(doc))
    with pytest.raises(CacheError, match=r"units/000001: its commit binds the shards of"):
        CacheReader(str(path), preload_bytes=0).read(2, 0)
    assert not verify(str(path))["ok"]


def test_bound_reads_cost_no_extra_read(cache, monkeypatch):
    """The binding is checked on bytes read anyway: one read per array per sample (the shard
    indexes once per unit), as without it."""
    from ldpipe.cache import shards
    reads = []
    real = shards.ShardRows._read

    def counted(self, start, length):
        reads.append((self.key, start is None))
        return real(self, start, length)
    monkeypatch.setattr(shards.ShardRows, "_read", counted)
    reader = CacheReader(cache, preload_bytes=0)
    reader.read(2, 0)
    assert sorted(k for k, suffix in reads if suffix) == sorted(KEY.values())  # the indexes
    reads.clear()
    reader.read(3, 0)
    assert sorted(k for k, _ in reads) == sorted(KEY.values())  # one range per array


@pytest.mark.parametrize("codec", ["fp32", "int8"])
def test_a_bound_unit_differs_from_format_v2_only_in_its_commit(codec):
    """The golden unit of ``tests/test_format_golden.py`` written with ``bind``: every stored
    object has format version 2's bytes but the unit group's ``zarr.json``, whose commit is the
    golden one plus ``shards``."""
    from test_format_golden import GOLDEN, _items, _object_hashes

    from ldpipe.cache.store import assemble_unit, write_index, write_unit
    root = open_root(f"memory://bound_golden_{codec}", "w")
    write_unit(root, 0, assemble_unit(_items(), codec, num_variants=2), "zstd", 1024, bind=True)
    write_index(root, "zstd")
    got, want = _object_hashes(root), json.loads(GOLDEN.read_text())[codec]
    assert sorted(got) == sorted(want)
    assert [k for k in got if got[k] != want[k]] == ["units/000000/zarr.json"]
    commit = dict(root["units/000000"].attrs["commit"])
    shards = commit.pop("shards")
    plain = open_root(f"memory://plain_golden_{codec}", "w")
    write_unit(plain, 0, assemble_unit(_items(), codec, num_variants=2), "zstd", 1024)
    assert commit == plain["units/000000"].attrs["commit"]
    assert {n: len(b["chunk_crc32c"]) for n, b in shards.items()} == {n: 8 for n in shards}  # 1 chunk
