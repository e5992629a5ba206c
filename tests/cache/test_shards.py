"""``ldpipe.cache.shards``: row ranges read from the shard bytes equal zarr's reads, and damage is named."""
from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from ldpipe.cache import CacheError
from ldpipe.cache.reader import UnitArrays, sample_rows
from ldpipe.cache.shards import ShardRows, shard_rows
from ldpipe.cache.store import SampleRows, assemble_unit, write_unit

AXES = {"anchor": 0, "box": 2, "cls": 1}


def _unit(codec: str, rows=(37, 1, 0, 90), classes: int = 5, seed: int = 0) -> list[SampleRows]:
    g = torch.Generator().manual_seed(seed)
    items = []
    for s, n in enumerate(rows):
        meta = {"index": s // 2, "image_id": s // 2 + 1, "img_shape": (64, 80), "pad_shape": (64, 96),
                "ori_shape": (32, 40), "flip": bool(s % 2), "scale_factor": (2.0, 2.0)}
        anchor = torch.sort(torch.randperm(500, generator=g)[:n]).values.to(torch.int32)
        box = torch.log_softmax(3 * torch.randn(n, 4, 17, generator=g), -1)
        cls = torch.log_softmax(2 * torch.randn(n, classes, generator=g), -1)
        items.append(SampleRows(s, meta, anchor, box, cls))
    return items


def _write(url: str, codec: str, compressor: str, chunk_rows: int) -> zarr.Group:
    root = zarr.open_group(url, mode="w", zarr_format=3)
    write_unit(root, 0, assemble_unit(_unit(codec), codec, 2, 0.125 if codec == "int8" else 0.0),
               compressor, chunk_rows)
    return root


def _ranges(n: int, inner: int, rng) -> list[tuple[int, int]]:
    fixed = [(0, n), (0, 1), (n - 1, n), (inner - 1, inner + 1), (inner, 2 * inner), (5, 5), (n, n)]
    return [r for r in fixed if 0 <= r[0] <= r[1] <= n] + \
        [tuple(sorted(int(x) for x in rng.integers(0, n + 1, 2))) for _ in range(25)]


@pytest.mark.parametrize("codec,compressor,chunk_rows", [
    ("int8", "zstd", 7), ("fp16", "zstd", 16), ("fp32", "zstd", 1024), ("int8", "blosc", 9)])
def test_shard_rows_read_what_zarr_reads(tmp_path, codec, compressor, chunk_rows):
    root = _write(str(tmp_path / "c"), codec, compressor, chunk_rows)
    g = root["units/000000"]
    rng = np.random.default_rng(0)
    for name, axis in AXES.items():
        z = g[name]
        sr = shard_rows(z, axis, f"c/{name}")
        assert isinstance(sr, ShardRows) and sr.path is not None, name  # a local file
        n = z.shape[axis]
        assert sr.n_chunks == -(-n // min(chunk_rows, n)) > (1 if chunk_rows < n else 0)
        for a, b in _ranges(n, sr.inner, rng):
            want = z[a:b] if axis == 0 else z[..., a:b]
            got = sr.rows(a, b)
            assert got.dtype == want.dtype and got.shape == want.shape, (name, a, b)
            assert np.array_equal(got, want), (name, a, b)
        with pytest.raises(CacheError, match="outside"):
            sr.rows(0, n + 1)


def test_unit_reads_equal_zarr_through_a_store_that_is_not_local():
    """memory:// goes through the zarr store's byte-range gets; a unit's samples decode to what
    zarr's own reads give, row for row."""
    url = f"memory://ldpipe-shards-{uuid.uuid4().hex}"
    root = _write(url, "int8", "zstd", 8)
    fast = UnitArrays(root, url, decoded=False, keep=2)
    arrays = fast.get(0)
    assert all(isinstance(arrays[k], ShardRows) and arrays[k].path is None for k in AXES)
    plain = {k: root["units/000000"][k] for k in AXES}
    table = root["units/000000/samples"][...]
    for rec in table:
        a = sample_rows(arrays, rec, "int8")
        b = sample_rows(plain, rec, "int8")
        for k in ("anchor", "box", "cls"):
            assert torch.equal(a[k], b[k]), k


def test_other_layouts_fall_back_to_zarr(tmp_path):
    root = zarr.open_group(str(tmp_path / "z"), mode="w", zarr_format=3)
    plain = root.create_array("plain", shape=(40,), dtype="int32", chunks=(8,))  # not sharded
    two = root.create_array("two", shape=(40,), dtype="int32", chunks=(8,), shards=(16,))  # 3 shards
    gz = root.create_array("gz", shape=(40,), dtype="int32", chunks=(8,), shards=(40,),
                           compressors=[zarr.codecs.GzipCodec()])
    for z in (plain, two, gz):
        assert shard_rows(z, 0, "x") is None


def test_damaged_chunks_and_short_shards_are_named(tmp_path):
    root = _write(str(tmp_path / "c"), "int8", "zstd", 8)
    z = root["units/000000/box"]
    sr = shard_rows(z, 2, "c: units/000000/box")
    idx = sr.index()
    shard = Path(sr.path)
    good, first = shard.read_bytes(), z[..., 0:8]
    data = bytearray(good)
    data[int(idx[2, 0]) + 3] ^= 0xFF  # inside chunk 2's compressed bytes
    shard.write_bytes(bytes(data))
    fresh = shard_rows(z, 2, "c: units/000000/box")
    assert np.array_equal(fresh.rows(0, 8), first)  # chunk 0 is intact
    with pytest.raises(CacheError, match=r"units/000000/box: chunk 2 .*crc32c"):
        fresh.rows(16, 20)
    shard.write_bytes(good[:-1])  # the index's checksum no longer lines up
    with pytest.raises(CacheError, match=r"units/000000/box: the shard index .*crc32c"):
        shard_rows(z, 2, "c: units/000000/box").rows(0, 1)
    shard.write_bytes(good[: int(idx[:, 0].max()) // 2] + good[-(16 * sr.n_chunks + 4):])
    with pytest.raises(CacheError, match=r"units/000000/box: shard .* shorter"):
        shard_rows(z, 2, "c: units/000000/box").rows(int(z.shape[2]) - 1, int(z.shape[2]))
    shard.unlink()
    with pytest.raises(CacheError, match=r"units/000000/box: shard c/0/0/0 cannot be read"):
        shard_rows(z, 2, "c: units/000000/box").rows(0, 1)


@pytest.mark.parametrize("codec", ["int8", "fp16", "fp32"])
def test_rows_as_stored_decode_bit_for_bit_where_they_are_used(tmp_path, codec):
    """The loader hands stored rows (int8 with their scale bytes) to the step, which decodes
    them with ``decode_packed``: the same bits as the reader's own decoding, a quarter of the
    bytes for int8."""
    from ldpipe.cache.codec import decode_packed
    root = _write(str(tmp_path / "c"), codec, "zstd", 16)
    arrays = UnitArrays(root, "c", decoded=False).get(0)
    for rec in root["units/000000/samples"][...]:
        done = sample_rows(arrays, rec, codec)
        raw = sample_rows(arrays, rec, codec, decode=False)
        assert raw["codec"] == codec and torch.equal(raw["anchor"], done["anchor"])
        for k in ("box", "cls"):
            assert raw[k].is_contiguous() and raw[k].shape[0] == done[k].shape[0]
            assert raw[k].dtype == {"int8": torch.uint8, "fp16": torch.float16, "fp32": torch.float32}[codec]
            got = decode_packed(raw[k], codec)
            assert got.dtype == torch.float32 and torch.equal(got, done[k]), k
    with pytest.raises(ValueError, match="two trailing scale bytes"):
        decode_packed(torch.zeros(3, 4, 17), "int8")
