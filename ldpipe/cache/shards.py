"""Row ranges of a unit's sharded arrays, read with one byte-range request per sample.

Every unit array is one Zarr v3 shard of inner chunks along the row axis
(``docs/cache-format.md``).  zarr-python reads a slice of it correctly, but fetches and decodes
the shard index again for every slice and then each inner chunk with its own request, through
its generic asynchronous machinery: most of a random read's CPU (docs/benchmarks.md, "Reading":
24 -> 6.4 ms per sample with this module).  :class:`ShardRows` reads
the same bytes the way the sharding specification lays them out: the shard index (an array of
``(offset, nbytes)`` pairs, little-endian uint64, at the end of the shard, followed by its
crc32c) is read once per array and kept; a row range is then one contiguous byte-range read of
the chunks it touches, each checked against its crc32c and decoded by the very codecs zarr
uses (numcodecs' Zstd / Blosc and Delta, google-crc32c).

It only takes arrays whose codec chain it knows - the chains ``ldpipe.cache.store`` writes -
and :func:`shard_rows` returns ``None`` for anything else, so the caller falls back to zarr.
``tests/test_shards.py`` compares it with zarr's reads value for value.

A crc32c says a chunk is undamaged, not that it is the chunk its unit committed: a shard
swapped or copied from another unit, two index entries swapped or a chunk re-encoded with a
new crc32c all pass it.  A unit written with ``bind`` therefore records, per array, a
:class:`ShardBinding` in its commit - the sha256 of the shard index and every inner chunk's
crc32c as written - and a :class:`ShardRows` given one checks the index once when it reads
it and each chunk's stored crc32c (the four bytes it reads anyway) against the list: no
extra read and no extra hash per sample (docs/cache-format.md, section 4).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import google_crc32c
import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
from zarr.abc.store import RangeByteRequest, SuffixByteRequest
from zarr.codecs.numcodecs import Delta
from zarr.codecs.sharding import ShardingCodecIndexLocation
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from .manifest import CacheError

EMPTY = 2**64 - 1  # the sharding index's marker of a chunk that was never written
CRC_BYTES = 4
INDEX_ENTRY = 16  # (offset, nbytes), two little-endian uint64
SWAPPED = "a shard swapped, copied or linked from another unit, or edited"


@dataclass(frozen=True)
class ShardBinding:
    """What a unit's commit records of one array's shard (the commit's ``shards`` field)."""

    index_sha256: str  # hex sha256 of the shard index's ``16 * n_chunks`` bytes (before its crc32c)
    chunk_crc32c: tuple[int, ...]  # each inner chunk's stored crc32c, in row-chunk order

    def to_json(self) -> dict:
        return {"index_sha256": self.index_sha256,
                "chunk_crc32c": "".join(f"{c:08x}" for c in self.chunk_crc32c)}

    @classmethod
    def parse(cls, raw, where: str) -> ShardBinding:
        """The binding of a commit's ``shards[name]`` (a :class:`CacheError` if malformed)."""
        sha = raw.get("index_sha256") if isinstance(raw, dict) else None
        crcs = raw.get("chunk_crc32c") if isinstance(raw, dict) else None
        try:
            if isinstance(sha, str) and len(sha) == 64 and isinstance(crcs, str) and len(crcs) % 8 == 0:
                return cls(sha, tuple(np.frombuffer(bytes.fromhex(crcs), ">u4").tolist()))
        except ValueError:
            pass
        raise CacheError(f"{where}: its commit's shard binding is malformed (an edited commit record)")


class ShardRows:
    """Reads ``[start, stop)`` rows of one single-shard unit array (rows on ``axis``)."""

    def __init__(self, arr: zarr.Array, axis: int, inner: int, filters: list, compressor,
                 where: str, binding: ShardBinding | None = None) -> None:
        self.axis, self.inner, self.where = axis, inner, where
        self.shape = arr.shape
        self.dtype = np.dtype(arr.dtype).newbyteorder("<")
        self.filters, self.compressor = filters, compressor
        chunk = list(arr.shape)
        chunk[axis] = inner
        self.chunk_shape = tuple(chunk)
        self.chunk_size = int(np.prod(chunk))
        rows = arr.shape[axis]
        self.n_chunks = -(-rows // inner) if rows else 0
        self.key = arr.metadata.encode_chunk_key((0,) * len(arr.shape))
        store, base = arr.store_path.store, arr.store_path.path
        self.store, self.full_key = store, f"{base}/{self.key}" if base else self.key
        self.path = os.path.join(str(store.root), self.full_key) if isinstance(store, LocalStore) else None
        self._index: np.ndarray | None = None
        self.binding = binding
        if binding is not None and len(binding.chunk_crc32c) != self.n_chunks:
            raise CacheError(f"{where}: has {self.n_chunks} chunks of {inner} rows, its commit "
                             f"binds {len(binding.chunk_crc32c)} ({SWAPPED})")

    # ------------------------------------------------------------------ bytes
    def _read(self, start: int | None, length: int) -> bytes:
        """``length`` bytes at ``start`` of the shard (``start=None``: its last ``length``)."""
        try:
            if self.path is not None:
                with open(self.path, "rb") as fh:
                    fh.seek(-length if start is None else start, os.SEEK_END if start is None else os.SEEK_SET)
                    data = fh.read(length)
            else:
                req = SuffixByteRequest(length) if start is None else RangeByteRequest(start, start + length)
                buf = sync(self.store.get(self.full_key, prototype=default_buffer_prototype(), byte_range=req))
                data = b"" if buf is None else buf.to_bytes()
        except OSError as exc:
            raise CacheError(f"{self.where}: shard {self.key} cannot be read ({exc})") from None
        if len(data) != length:
            raise CacheError(f"{self.where}: shard {self.key} is shorter than its index says "
                             f"({len(data)} of {length} bytes)")
        return data

    @staticmethod
    def _checked(data: bytes | memoryview, what: str) -> bytes:
        body = bytes(data[:-CRC_BYTES])
        stored = int.from_bytes(data[-CRC_BYTES:], "little")
        if google_crc32c.value(body) != stored:
            raise CacheError(f"{what} fails its crc32c checksum (damaged)")
        return body

    def _read_index(self) -> bytes:
        raw = self._read(None, INDEX_ENTRY * self.n_chunks + CRC_BYTES)
        return self._checked(raw, f"{self.where}: the shard index of {self.key}")

    def index(self) -> np.ndarray:
        """``[n_chunks, 2]`` (offset, nbytes) of the inner chunks along the rows (read once,
        checked against the binding once)."""
        if self._index is None:
            body = self._read_index()
            if self.binding is not None and hashlib.sha256(body).hexdigest() != self.binding.index_sha256:
                raise CacheError(f"{self.where}: the shard index of {self.key} is not the one its "
                                 f"unit's commit records ({SWAPPED})")
            self._index = np.frombuffer(body, dtype="<u8").reshape(self.n_chunks, 2)
        return self._index

    # ----------------------------------------------------------------- values
    def _decode(self, data: bytes | memoryview, k: int) -> np.ndarray:
        body = self._checked(data, f"{self.where}: chunk {k} of {self.key}")
        if self.binding is not None and \
                int.from_bytes(data[-CRC_BYTES:], "little") != self.binding.chunk_crc32c[k]:
            raise CacheError(f"{self.where}: chunk {k} of {self.key} is not the one its unit's "
                             f"commit records (re-encoded, or moved from another chunk or shard)")
        raw = self.compressor.decode(body)
        for f in reversed(self.filters):
            raw = f.decode(raw)
        out = np.frombuffer(raw, dtype=self.dtype)
        if out.size != self.chunk_size:
            raise CacheError(f"{self.where}: chunk {k} of {self.key} decodes to {out.size} values, "
                             f"not {self.chunk_size} (damaged)")
        return out.reshape(self.chunk_shape)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` in the stored orientation, as zarr would return them."""
        if not 0 <= start <= stop <= self.shape[self.axis]:
            raise CacheError(f"{self.where}: rows {start}:{stop} are outside its "
                             f"{self.shape[self.axis]} rows")
        if start == stop:
            shape = list(self.shape)
            shape[self.axis] = 0
            return np.zeros(shape, self.dtype)
        k0, k1 = start // self.inner, (stop - 1) // self.inner
        idx = self.index()[k0:k1 + 1]
        if (idx == EMPTY).any():
            raise CacheError(f"{self.where}: chunk {k0 + int(np.nonzero((idx == EMPTY).any(1))[0][0])} "
                             f"of {self.key} was never written (damaged)")
        lo, hi = int(idx[:, 0].min()), int((idx[:, 0] + idx[:, 1]).max())
        blob = memoryview(self._read(lo, hi - lo))
        parts = [self._decode(blob[int(o) - lo:int(o) - lo + int(n)], k0 + j)
                 for j, (o, n) in enumerate(idx)]
        whole = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=self.axis)
        sl = [slice(None)] * len(self.shape)
        sl[self.axis] = slice(start - k0 * self.inner, stop - k0 * self.inner)
        return whole[tuple(sl)]

    def stored_binding(self) -> ShardBinding:
        """The binding of the shard as stored now (reads its index, then its chunks in one read)."""
        if not self.n_chunks:
            return ShardBinding(hashlib.sha256(b"").hexdigest(), ())
        body = self._read_index()
        idx = np.frombuffer(body, dtype="<u8").reshape(self.n_chunks, 2)
        if (idx == EMPTY).any():
            raise CacheError(f"{self.where}: a chunk of {self.key} was never written (damaged)")
        lo, hi = int(idx[:, 0].min()), int((idx[:, 0] + idx[:, 1]).max())
        blob = self._read(lo, hi - lo)
        ends = (idx[:, 0] + idx[:, 1] - lo).tolist()
        return ShardBinding(hashlib.sha256(body).hexdigest(),
                            tuple(int.from_bytes(blob[e - CRC_BYTES:e], "little") for e in ends))


def binding_difference(fast: ShardRows, want: ShardBinding) -> str | None:
    """How the shard as stored differs from the binding ``want`` of its commit (``None``: not)."""
    got = fast.stored_binding()
    if got.index_sha256 != want.index_sha256:
        return f"the shard index of {fast.key} is not the one its unit's commit records ({SWAPPED})"
    if len(got.chunk_crc32c) != len(want.chunk_crc32c):
        return f"has {len(got.chunk_crc32c)} chunks, its commit binds {len(want.chunk_crc32c)} ({SWAPPED})"
    bad = [k for k, (a, b) in enumerate(zip(got.chunk_crc32c, want.chunk_crc32c)) if a != b]
    if bad:
        return (f"chunk {bad[0]} of {fast.key} is not the one its unit's commit records "
                f"(re-encoded, or moved from another chunk or shard; {len(bad)} chunk(s) differ)")
    return None


def shard_rows(arr: zarr.Array, axis: int, where: str,
               binding: ShardBinding | None = None) -> ShardRows | None:
    """A :class:`ShardRows` for ``arr`` if its layout and codecs are the ones ldpipe writes
    (one shard; inner chunks split only the row axis; [Delta], Bytes, Zstd|Blosc, Crc32c;
    index at the end with Bytes, Crc32c), else ``None``.  ``binding``: what the unit's commit
    records of the shard, checked on every read."""
    codecs = arr.metadata.codecs
    if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return None
    sh = codecs[0]
    if sh.index_location != ShardingCodecIndexLocation.end or [type(c) for c in sh.index_codecs] != \
            [BytesCodec, Crc32cCodec]:
        return None
    shape, chunk = arr.shape, sh.chunk_shape
    shard = arr.shards
    if shard is None or any(s > b for s, b in zip(shape, shard)) or any(
            c != s for i, (c, s) in enumerate(zip(chunk, shard)) if i != axis) or shard[axis] % chunk[axis]:
        return None
    inner = list(sh.codecs)
    filters = []
    while inner and isinstance(inner[0], Delta):
        filters.append(numcodecs.get_codec(dict(inner.pop(0).codec_config, id="delta")))
    if len(inner) != 3 or not isinstance(inner[0], BytesCodec) or not isinstance(inner[2], Crc32cCodec):
        return None
    if np.dtype(arr.dtype).itemsize > 1 and inner[0].endian is not None and inner[0].endian.value != "little":
        return None
    comp = inner[1]
    if isinstance(comp, ZstdCodec):
        compressor = numcodecs.Zstd()
    elif isinstance(comp, BloscCodec):
        compressor = numcodecs.Blosc()
    else:
        return None
    return ShardRows(arr, axis, chunk[axis], filters, compressor, where, binding)
