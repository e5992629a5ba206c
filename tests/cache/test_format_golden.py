"""The cache format, byte for byte: a fixed unit written now equals what format version 2's
writer produced before the package redesign (tests/data/cache_format_v2_golden.json holds the
sha256 of every stored object, made with commit 740d663's ``assemble`` + ``write_unit`` +
``write_index`` on the same inputs).  Inputs are multiples of 1/8 in (-40, 0] (above both the
old and the current int8 clip), so every host encodes them
identically; a change to layout, filters, chunking, codecs or commit records fails here."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from ldpipe.cache.manifest import FORMAT_VERSION
from ldpipe.cache.store import SampleRows, assemble_unit, open_root, write_index, write_unit

GOLDEN = Path(__file__).parent / "data" / "cache_format_v2_golden.json"


def _items() -> list[SampleRows]:
    rng = np.random.RandomState(7)
    out = []
    for s in range(5):
        n = 3 + 4 * s
        anchor = torch.tensor(np.sort(rng.choice(400, n, replace=False)), dtype=torch.int32)
        box = torch.tensor(-rng.randint(0, 320, size=(n, 4, 17)) / 8.0, dtype=torch.float32)
        cls = torch.tensor(-rng.randint(0, 320, size=(n, 3)) / 8.0, dtype=torch.float32)
        meta = {"index": s // 2, "image_id": 100 + s // 2, "img_shape": (96, 128),
                "pad_shape": (96, 128), "ori_shape": (48, 64), "flip": bool(s % 2),
                "scale_factor": (2.0, 2.0)}
        out.append(SampleRows(s, meta, anchor, box, cls))
    return out[::-1]  # assemble_unit sorts by sample number


def _object_hashes(root) -> dict[str, str]:
    store = root.store_path.store

    async def collect():
        out = {}
        async for key in store.list_prefix(""):
            data = await store.get(key, prototype=default_buffer_prototype())
            out[key] = hashlib.sha256(data.to_bytes()).hexdigest()
        return out

    return {k: v for k, v in sync(collect()).items() if k != "zarr.json"}


@pytest.mark.parametrize("codec", ["fp32", "fp16", "int8"])
def test_stored_bytes_equal_format_v2(codec):
    assert FORMAT_VERSION == 2  # a new version needs a new golden file (and a reader for this one)
    root = open_root(f"memory://golden_{codec}", "w")
    write_unit(root, 0, assemble_unit(_items(), codec, num_variants=2), "zstd", 1024)
    write_index(root, "zstd")
    got = _object_hashes(root)
    want = json.loads(GOLDEN.read_text())[codec]
    assert sorted(got) == sorted(want)
    assert {k: v for k, v in got.items() if want[k] != v} == {}


def test_manifest_round_trips_unchanged(make_tiny_pipe, tiny_teacher_ckpt, tmp_path):
    """The typed manifest writes exactly the dict it parses (nothing dropped, same key order)."""
    from ldpipe.cache import Manifest, open_cache
    from ldpipe.engine.dump import dump_teacher
    path = str(tmp_path / "m.zarr")
    dump_teacher(make_tiny_pipe(), "teacher", tiny_teacher_ckpt, path, progress=False)
    root, m = open_cache(path)
    raw = root.attrs["ldpipe_cache"]
    assert json.dumps(m.to_dict()) == json.dumps(raw)
    assert m.compute_id() == raw["cache_id"]
    assert raw["codec_clip"] == 250.0 and m.clip() == 250.0  # int8 (the demo default)
    assert Manifest.parse(json.loads(json.dumps(raw)), path) == m


def test_codec_constants_and_errors():
    """What the manifest and readers derive from a codec's name (from mutation survivors)."""
    from ldpipe.cache import codec as C
    assert [C.clip_of(c) for c in ("fp32", "fp16", "int8")] == [None, 60000.0, 250.0]
    assert [C.row_extra(c) for c in ("fp32", "fp16", "int8")] == [0, 0, 2]
    assert [C.bytes_per_value(c) for c in ("fp32", "fp16", "int8")] == [4, 2, 1]
    lp = torch.log_softmax(torch.randn(3, 4, 5), dim=-1)
    assert torch.allclose(C.log_probs(lp * 7).exp().sum(-1), torch.ones(3, 4))  # per last axis
    with pytest.raises(ValueError, match="unknown codec 'int4'"):
        C.encode(lp, "int4")
    with pytest.raises(ValueError, match="int8 values need their scales"):
        C.decode(np.zeros((2, 5), np.uint8), None, "int8")
