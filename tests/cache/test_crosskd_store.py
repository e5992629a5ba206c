"""The CrossKD additions to the cache format (docs/cache-format.md, section 10): per-sample
feature statistics (the unit array ``featstats``), the teacher head part (``head_part/``) and the
manifest's ``head_part`` entry - written, read back exactly, checked, and refused when damaged.

Caches here are built by hand (a synthetic manifest and units through ``store``'s own writer):
no model runs, each cache takes milliseconds."""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ldpipe.cache import CacheError, CacheReader, Manifest
from ldpipe.cache.codec import codec_for
from ldpipe.cache.geometry_check import num_anchors
from ldpipe.cache.info import format_info, info
from ldpipe.cache.manifest import (FORMAT, FORMAT_VERSION, IDENTITY, DataInfo, Geometry,
                                   RegionInfo, TeacherInfo)
from ldpipe.cache.merge import merge
from ldpipe.cache.store import (SampleRows, assemble_unit, create_or_resume, head_part_shas,
                                open_cache, open_root, read_head_part, write_head_part,
                                write_index, write_unit)
from ldpipe.cache.verify import verify

LEVELS, CHANNELS, PER_UNIT, IMAGES = 5, 6, 4, 6  # two units: 4 + 2 samples
GEOMETRY = dict(strides=[8, 16, 32, 64, 128], anchor_scale=8.0, reg_max=4, num_classes=3,
                classes=["a", "b", "c"], input_scales=[[64, 64]], pad_divisor=32,
                variants=[{"key": "s0n", "scale_idx": 0, "flip": False}])


def head_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"cls_convs.1.conv.weight": torch.randn(CHANNELS, CHANNELS, 3, 3, generator=g),
            "cls_convs.1.gn.bias": torch.randn(CHANNELS, generator=g),
            "gfl_cls.weight": torch.randn(3, CHANNELS, 3, 3, generator=g),
            "scales.0.scale": torch.tensor(1.25)}  # a 0-d parameter


def head_entry(tensors=None, **changes) -> dict:
    entry = {"idx": 1, "channels": CHANNELS, "levels": LEVELS, "stacked_convs": 3, "norm_groups": 32,
             "sha256": head_part_shas(tensors or head_tensors())}
    return {**entry, **changes}


def manifest(codec: str = "fp32", head_part: dict | None = None) -> Manifest:
    m = Manifest(format=FORMAT, format_version=FORMAT_VERSION,
                 teacher=TeacherInfo("teacher", {"type": "GFL", "backbone": "ResNet-18",
                                                 "channels": CHANNELS, "reg_max": 4}, "0" * 64),
                 geometry=Geometry(**GEOMETRY),
                 data=DataInfo("coco", "train", "f" * 16, IMAGES, list(range(100, 100 + IMAGES))),
                 region=RegionInfo("overlap", []), codec=codec, compressor="zstd", store_cls=True,
                 samples_per_shard=PER_UNIT, chunk_rows=8, variants=["s0n"], num_samples=IMAGES,
                 num_units=math.ceil(IMAGES / PER_UNIT), created="", command="", pipeline={},
                 checkpoint_path="", versions={}, codec_clip=codec_for(codec).clip,
                 head_part=head_part)
    m.cache_id = m.compute_id()
    return m


def featstats(s: int) -> torch.Tensor:
    """Sample ``s``'s statistics: float64 values no float32 holds (exactness is tested)."""
    g = torch.Generator().manual_seed(100 + s)
    t = torch.randn(LEVELS, 2, 2, CHANNELS, generator=g, dtype=torch.float64) * 1e3
    t[:, :, 1] = t[:, :, 1].abs()  # sums of squares
    return t


def items(u: int, with_stats: bool) -> list[SampleRows]:
    grid_n = num_anchors(Geometry(**GEOMETRY), 64, 64)
    out = []
    for s in range(u * PER_UNIT, min((u + 1) * PER_UNIT, IMAGES)):
        g = torch.Generator().manual_seed(s)
        n = 3 + s
        anchor = torch.sort(torch.randperm(grid_n, generator=g)[:n]).values
        box = torch.log_softmax(torch.randn(n, 4, 5, generator=g), dim=-1)
        cls = torch.log_softmax(torch.randn(n, 3, generator=g), dim=-1)
        meta = {"index": s, "image_id": 100 + s, "img_shape": (64, 64), "pad_shape": (64, 64),
                "ori_shape": (32, 32), "flip": False, "scale_factor": (2.0, 2.0)}
        out.append(SampleRows(s, meta, anchor, box, cls, featstats(s) if with_stats else None))
    return out[::-1]  # assemble_unit sorts them


def build(path: str, codec: str = "fp32", crosskd: bool = True, entry: dict | None = None) -> str:
    """A complete synthetic cache at ``path`` (with feature statistics and a head part when
    ``crosskd``; ``entry``: the manifest's head_part, default the one of :func:`head_tensors`)."""
    m = manifest(codec, (entry or head_entry()) if crosskd else None)
    create_or_resume(path, m, overwrite=False)
    root = open_root(path, "a")
    for u in range(m.num_units):
        write_unit(root, u, assemble_unit(items(u, crosskd), codec, 1), "zstd", m.chunk_rows, bind=True)
    write_index(root, "zstd")
    if crosskd:
        write_head_part(root, head_tensors())
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return build(str(tmp_path_factory.mktemp("crosskd") / "c"))


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> str:
    return build(str(tmp_path_factory.mktemp("plain") / "c"), crosskd=False)


def _copy(src: str, tmp_path: Path) -> str:
    shutil.copytree(src, tmp_path / "c")
    return str(tmp_path / "c")


# ------------------------------------------------------------------ feature statistics
@pytest.mark.parametrize("codec", ["fp32", "int8"])
def test_featstats_round_trip_exactly_through_the_reader(tmp_path, codec):
    path = build(str(tmp_path / "c"), codec)
    root, m = open_cache(path)
    assert m.has_head_stats and verify(path)["ok"], verify(path)["errors"]
    commit = root["units/000000"].attrs["commit"]
    assert "featstats" in commit["sha256"] and "featstats" in commit["shards"]
    z = root["units/000000/featstats"]
    assert z.shape == (PER_UNIT, LEVELS, 2, 2, CHANNELS) and z.dtype == np.float64
    assert z.chunks == (1, LEVELS, 2, 2, CHANNELS)  # one chunk per sample
    for preload in (128 << 20, 0):  # units read whole (sha256-checked) and shard by shard
        reader = CacheReader(path, preload_bytes=preload)
        for s in (5, 0, 3, 4):  # across both units, out of order
            for decode in (True, False):
                got = reader.read(s, 0, decode=decode)
                assert got["featstats"].dtype == torch.float64
                assert torch.equal(got["featstats"], featstats(s)), (s, preload, decode)
        got = reader.read(2, 0)
        got["featstats"][0, 0, 0, 0] = 0.0  # a writable copy, not the reader's buffer
        assert torch.equal(reader.read(2, 0)["featstats"], featstats(2))


def test_a_unit_without_featstats_reads_as_before(plain):
    root, m = open_cache(plain)
    assert not m.has_head_stats and "head_part" not in root.attrs["ldpipe_cache"]
    assert sorted(root["units/000000"].attrs["commit"]["sha256"]) == ["anchor", "box", "cls",
                                                                       "samples", "scale"]
    assert "head_part" not in root and verify(plain)["ok"]
    for preload in (128 << 20, 0):
        for decode in (True, False):
            got = CacheReader(plain, preload_bytes=preload).read(1, 0, decode=decode)
            assert "featstats" not in got and got.get("featstats") is None
    assert "CrossKD" not in format_info(info(plain))


def test_assemble_unit_takes_statistics_for_all_samples_or_none():
    mixed = items(0, True)
    mixed[1].featstats = None
    with pytest.raises(ValueError, match="all or none"):
        assemble_unit(mixed, "fp32", 1)
    data = assemble_unit(items(0, True), "fp32", 1)
    assert data.featstats.shape == (PER_UNIT, LEVELS, 2, 2, CHANNELS)
    assert np.array_equal(data.featstats[2], featstats(2).numpy())  # sorted sample order
    assert assemble_unit(items(0, False), "fp32", 1).featstats is None


def _flip_featstats(path: str, unit: str = "000001") -> Path:
    shard = next(p for p in (Path(path) / "units" / unit / "featstats").rglob("*")
                 if p.is_file() and p.name != "zarr.json")
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF
    shard.write_bytes(bytes(data))
    return shard


def test_a_damaged_featstats_shard_is_reported_by_verify_and_refused_by_the_reader(cache, tmp_path):
    path = _copy(cache, tmp_path)
    shard = _flip_featstats(path)
    errors = verify(path)["errors"]
    assert errors and all("units/000001/featstats" in e for e in errors), errors
    assert any(str(shard) in e for e in errors), errors
    for preload in (128 << 20, 0):
        with pytest.raises(CacheError, match="units/000001/featstats") as err:
            CacheReader(path, preload_bytes=preload).read(4, 0)
        assert "\n" not in str(err.value) and ("ldpipe cache verify" in str(err.value) or preload)
        CacheReader(path, preload_bytes=preload).read(1, 0)  # the other unit still reads


def test_an_edited_or_missing_featstats_array_is_reported(cache, tmp_path):
    path = _copy(cache, tmp_path)
    z = open_root(path, "a")["units/000000/featstats"]
    z[1] = z[1] + 1.0  # valid chunks, other content
    errors = verify(path)["errors"]
    assert any("units/000000/featstats" in e and "sha256" in e for e in errors), errors
    with pytest.raises(CacheError, match="units/000000/featstats"):
        CacheReader(path).read(1, 0)
    shutil.rmtree(Path(path) / "units" / "000001" / "featstats")
    errors = verify(path)["errors"]
    assert any("units/000001/featstats" in e and "missing" in e for e in errors), errors
    with pytest.raises(CacheError, match="units/000001/featstats"):
        CacheReader(path, preload_bytes=0).read(5, 0)


def test_featstats_of_another_width_than_the_manifest_says_are_refused(tmp_path):
    path = build(str(tmp_path / "c"), entry=head_entry(channels=CHANNELS + 1))
    with pytest.raises(CacheError, match="units/000000/featstats has shape"):
        CacheReader(path).read(0, 0)
    assert any("featstats" in e for e in verify(path)["errors"])


# ------------------------------------------------------------------ head part
@pytest.mark.parametrize("where", ["local", "memory"])
def test_head_part_round_trips(tmp_path, where):
    url = str(tmp_path / "h") if where == "local" else "memory://crosskd-head"
    root = open_root(url, "w")
    tensors = head_tensors()
    shas = write_head_part(root, tensors)
    assert shas == head_part_shas(tensors)
    assert shas["gfl_cls.weight"] == hashlib.sha256(tensors["gfl_cls.weight"].numpy().tobytes()).hexdigest()
    assert sorted(n for n, _ in root["head_part"].arrays()) == [
        "cls_convs-1-conv-weight", "cls_convs-1-gn-bias", "gfl_cls-weight", "scales-0-scale"]
    got = read_head_part(open_root(url, "r"), url, shas,
                         shapes={k: tuple(v.shape) for k, v in tensors.items()})
    assert sorted(got) == sorted(tensors)
    for name, t in tensors.items():
        assert got[name].dtype == torch.float32 and torch.equal(got[name], t), name


def test_head_part_names_outside_the_alphabet_are_refused(tmp_path):
    with pytest.raises(CacheError, match="'a-b.weight'"):
        write_head_part(open_root(str(tmp_path / "h"), "w"), {"a-b.weight": torch.zeros(2)})


def test_a_mismatching_missing_or_extra_head_part_array_is_refused(cache, tmp_path):
    path = _copy(cache, tmp_path)
    root, m = open_cache(path)
    shas = m.head_part["sha256"]
    assert sorted(read_head_part(root, path, shas)) == sorted(head_tensors())
    wrong = dict(shas, **{"gfl_cls.weight": "0" * 64})
    with pytest.raises(CacheError, match=r"head_part/gfl_cls-weight \(parameter gfl_cls.weight\) "
                                         r"does not match.*ldpipe cache verify"):
        read_head_part(root, path, wrong)
    with pytest.raises(CacheError, match="head_part/cls_convs-1-gn-bias .* has shape"):
        read_head_part(root, path, shas, shapes={"cls_convs.1.gn.bias": (CHANNELS, 1)})
    with pytest.raises(CacheError, match="head_part/gfl_cls-weight is not listed"):
        read_head_part(root, path, {k: v for k, v in shas.items() if k != "gfl_cls.weight"})
    assert verify(path)["ok"]

    z = open_root(path, "a")["head_part/cls_convs-1-conv-weight"]
    z[0, 0, 0, 0] = z[0, 0, 0, 0] + 1.0  # edited in place
    shutil.rmtree(Path(path) / "head_part" / "gfl_cls-weight")
    root = open_root(path, "r")
    with pytest.raises(CacheError, match=r"head_part/cls_convs-1-conv-weight .*does not match"):
        read_head_part(root, path, shas)
    with pytest.raises(CacheError, match=r"head_part/gfl_cls-weight .*is missing.*ldpipe cache verify"):
        read_head_part(root, path, {"gfl_cls.weight": shas["gfl_cls.weight"]})
    errors = verify(path)["errors"]
    assert len(errors) == 2, errors
    assert "cls_convs-1-conv-weight" in errors[0] and "gfl_cls-weight" in errors[1], errors
    shutil.rmtree(Path(path) / "head_part")
    errors = verify(path)["errors"]
    assert errors == [f"{path}: head_part/ is missing or unreadable, but the manifest records a "
                      f"teacher head part (deleted or not copied); run `ldpipe cache verify {path}`"]


# ------------------------------------------------------------------ manifest, merge, info
def test_manifest_head_part_round_trip_and_identity():
    old = manifest()
    d = old.to_dict()
    assert "head_part" not in d
    # the id of a manifest without the entry is the one ldpipe computed before it existed
    before = {k: d[k] for k in IDENTITY + ("codec_clip", "codec_step", "cls_values") if k in d}
    assert old.cache_id == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
    assert Manifest.parse(json.loads(json.dumps(d)), "x") == old and not old.has_head_stats
    new = manifest(head_part=head_entry())
    raw = json.loads(json.dumps(new.to_dict()))
    assert raw["head_part"] == head_entry()
    back = Manifest.parse(raw, "x")
    assert back == new and back.has_head_stats and back.compute_id() == new.cache_id != old.cache_id
    assert "head_part" in new.identity()
    assert any(line.startswith("head_part.idx: cache has 1, this run has 2")
               for line in new.identity_diff(manifest(head_part=head_entry(idx=2))))


@pytest.mark.parametrize("change, field", [
    ({"idx": -1}, "head_part.idx"), ({"idx": "1"}, "head_part.idx"),
    ({"channels": True}, "head_part.channels"), ({"levels": 1000}, "head_part.levels"),
    ({"stacked_convs": 1.5}, "head_part.stacked_convs"), ({"sha256": ["x"]}, "head_part.sha256"),
    ({"norm_groups": 0}, "head_part.norm_groups"), ({"idx": 3}, "head_part.idx"),
    ({"sha256": {"w": "A" * 64}}, "head_part.sha256['w']"),
    ({"sha256": {"a/b": "0" * 64}}, "head_part.sha256 parameter name"),
    (None, "head_part"),
])
def test_a_malformed_head_part_entry_is_refused(change, field):
    raw = json.loads(json.dumps(manifest(head_part=head_entry()).to_dict()))
    if change is None:
        raw["head_part"] = [1, 2]
    else:
        raw["head_part"].update(change)
    with pytest.raises(CacheError) as err:
        Manifest.parse(raw, "cachex")
    assert f"the manifest's {field} is" in str(err.value) and "cachex" in str(err.value)


def test_merge_refuses_crosskd_caches(cache, plain, tmp_path):
    for urls in ([cache, cache], [plain, cache]):
        with pytest.raises(CacheError, match=f"cannot merge {cache}: it holds a CrossKD teacher "
                                             "head part"):
            merge(urls, str(tmp_path / "m"))
        assert not (tmp_path / "m").exists()


def test_info_names_the_head_part(cache):
    d = info(cache)
    assert d["head_part"]["idx"] == 1 and d["stored_bytes_by_part"]["head_part"] > 0
    assert "featstats" in d["stored_bytes_by_part"]
    line = next(x for x in format_info(d).splitlines() if x.startswith("CrossKD"))
    assert line == ("CrossKD       teacher head part after conv 1 (4 parameters) and per-sample "
                    "feature statistics")


def test_write_unit_refuses_featstats_of_another_shape(tmp_path):
    data = assemble_unit(items(0, True), "fp32", 1)
    data.featstats = data.featstats[:, :, 0]
    with pytest.raises(ValueError, match=r"expected \[n, L, 2, 2, C\]"):
        write_unit(open_root(str(tmp_path / "c"), "w"), 0, data, "zstd", 8)


def test_info_sizes_the_head_part_on_a_store_it_does_not_list(tmp_path):
    url = build("memory://crosskd-info")  # fsspec's memory store: sized from a sample of units
    d = info(url, size_units=1)
    assert not d["stored_bytes_exact"] and d["stored_bytes_by_part"]["head_part"] > 0
    assert verify(url)["ok"] and torch.equal(CacheReader(url).read(5, 0)["featstats"], featstats(5))
