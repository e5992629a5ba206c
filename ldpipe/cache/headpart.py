"""The teacher head part of a CrossKD cache (``head_part/``) and the checks of its per-sample
feature statistics (``featstats``); ``docs/cache-format.md``, section 10.

CrossKD passes a student's head features through the teacher's last head convs.  Offline this
needs the weights of that part of the teacher's head, stored once per cache as float32 arrays
``head_part/<name>`` (one per parameter; :func:`.headspec.array_name`), and per sample the
teacher's per-channel feature sums and squared sums (the unit array ``featstats``, written by
:func:`.store.write_unit`).  The manifest's ``head_part.sha256`` binds each array: a reader
refuses a missing array, one the manifest does not list, or one whose bytes differ.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from ..errors import first_line
from .headspec import HEAD_PART, array_name
from .manifest import CacheError, Manifest


def _float32(t: torch.Tensor) -> np.ndarray:
    # (np.array, not np.ascontiguousarray: that makes a 0-d parameter 1-d)
    return np.array(t.detach().cpu().to(torch.float32).numpy(), dtype=np.float32, order="C")


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.array(a, dtype=np.float32, order="C").tobytes()).hexdigest()


def head_part_shas(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Parameter name -> sha256 of the tensor's float32 contiguous bytes (the manifest's
    ``head_part.sha256``)."""
    return {name: _sha(_float32(t)) for name, t in tensors.items()}


def _names(tensors) -> dict[str, str]:
    out = {}
    for name in tensors:
        a = array_name(name)
        if a is None:
            raise CacheError(f"head part parameter {name!r}: names must be dot-joined letters, "
                             "digits and underscores")
        out[name] = a
    return out


def write_head_part(root: zarr.Group, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Write each tensor as a float32 array ``head_part/<array_name(name)>`` (one chunk, Zstd
    and crc32c; any earlier ``head_part/`` is replaced); returns :func:`head_part_shas`."""
    names = _names(tensors)
    if HEAD_PART in root:
        del root[HEAD_PART]
    g = root.create_group(HEAD_PART)
    for name, t in tensors.items():
        arr = _float32(t)
        z = g.create_array(names[name], shape=arr.shape, dtype=np.float32,
                           chunks=tuple(max(1, s) for s in arr.shape),
                           compressors=[ZstdCodec(level=3), Crc32cCodec()], fill_value=0,
                           config={"write_empty_chunks": True})
        if arr.size:
            z[...] = arr
    return head_part_shas(tensors)


def _hint(url: str) -> str:
    return f"run `ldpipe cache verify {url}`"


def _group(root: zarr.Group, url: str) -> tuple[zarr.Group, set[str]]:
    """The ``head_part/`` group and the names of its arrays."""
    try:
        g = root[HEAD_PART]
        if not isinstance(g, zarr.Group):
            raise KeyError(HEAD_PART)
        return g, {name for name, _ in g.arrays()}
    except Exception:
        raise CacheError(f"{url}: {HEAD_PART}/ is missing or unreadable, but the manifest records "
                         f"a teacher head part (deleted or not copied); {_hint(url)}") from None


def _read_one(g: zarr.Group, stored: set[str], url: str, name: str, want: str,
              shape: tuple | None = None) -> torch.Tensor:
    a = array_name(name)
    where = f"{url}: {HEAD_PART}/{a} (parameter {name})"
    if a is None or a not in stored:
        raise CacheError(f"{where} is missing (deleted or not copied); {_hint(url)}")
    try:
        arr = np.asarray(g[a][...])
    except Exception as exc:
        raise CacheError(f"{where} cannot be read ({first_line(exc)}); {_hint(url)}") from None
    if arr.dtype != np.float32:
        raise CacheError(f"{where} is {arr.dtype}, not float32 (edited); {_hint(url)}")
    if shape is not None and tuple(arr.shape) != tuple(shape):
        raise CacheError(f"{where} has shape {tuple(arr.shape)}, expected {tuple(shape)}; "
                         f"{_hint(url)}")
    if _sha(arr) != want:
        raise CacheError(f"{where} does not match the manifest's head_part.sha256 (damaged or "
                         f"edited); {_hint(url)}")
    return torch.from_numpy(np.array(arr, order="C"))  # own, writable copy


def _extra(stored: set[str], shas: dict[str, str], url: str) -> str | None:
    extra = sorted(stored - {array_name(n) for n in shas})
    if not extra:
        return None
    return (f"{url}: {HEAD_PART}/{extra[0]} is not listed in the manifest's head_part.sha256 "
            f"({len(extra)} such array(s): added or renamed); {_hint(url)}")


def read_head_part(root: zarr.Group, url: str, shas: dict[str, str],
                   shapes: dict[str, tuple] | None = None) -> dict[str, torch.Tensor]:
    """Parameter name -> float32 tensor of every parameter ``shas`` lists (the manifest's
    ``head_part.sha256``), each checked against its sha256 (and, given ``shapes``, its shape);
    a :class:`CacheError` naming the array for one that is missing, unreadable, not float32,
    of another shape or other bytes, or for an array ``head_part/`` holds that ``shas`` lacks."""
    g, stored = _group(root, url)
    out = {name: _read_one(g, stored, url, name, want, (shapes or {}).get(name))
           for name, want in shas.items()}
    extra = _extra(stored, shas, url)
    if extra:
        raise CacheError(extra)
    return out


def head_part_problems(root: zarr.Group, m: Manifest, url: str) -> list[str]:
    """What ``ldpipe cache verify`` finds wrong with the head part (one line each)."""
    hp = m.head_part
    if hp is None:
        return [f"{url}: {HEAD_PART}/ exists but the manifest records no head part"] \
            if HEAD_PART in root else []
    out = []
    if hp["levels"] != len(m.geometry.strides):
        out.append(f"{url}: the manifest's head_part.levels is {hp['levels']}, its geometry has "
                   f"{len(m.geometry.strides)} levels")
    try:
        g, stored = _group(root, url)
    except CacheError as exc:
        return out + [str(exc)]
    for name, want in hp["sha256"].items():
        try:
            _read_one(g, stored, url, name, want)
        except CacheError as exc:
            out.append(str(exc))
    extra = _extra(stored, hp["sha256"], url)
    return out + ([extra] if extra else [])


def featstats_shape(m: Manifest, n: int) -> tuple[int, ...] | None:
    """The shape a unit of ``n`` samples' ``featstats`` has under manifest ``m`` (None: none)."""
    hp = m.head_part
    return None if hp is None else (n, hp["levels"], 2, 2, hp["channels"])


def featstats_problem(m: Manifest, where: str, arr: np.ndarray, n: int) -> str | None:
    """What is wrong with a unit's decoded ``featstats`` (``where``: its store path), or None:
    shape ``[n, levels, 2, 2, channels]`` float64, finite, sums of squares not negative."""
    want = featstats_shape(m, n)
    if tuple(arr.shape) != want or arr.dtype != np.float64:
        return f"{where}: shape {tuple(arr.shape)} dtype {arr.dtype}, expected {want} float64"
    if not np.isfinite(arr).all():
        return f"{where}: non-finite feature statistics"
    if (arr[:, :, :, 1] < 0).any():
        return f"{where}: negative sums of squares"
    return None
