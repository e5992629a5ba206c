"""Checks a reader runs before it trusts what it reads (a missing shard reads as zeros).

Zarr reads an absent chunk or shard object as fill values without complaint, so a
deleted ``box`` shard, a 0-byte one or a unit whose ``anchor`` array lost its data
would otherwise decode to uniform targets or to anchor 0.  These checks are cheap
(metadata, object listing, the per-sample table's arithmetic; a sha256 for units read
whole) and each failure is one :class:`CacheError` line naming the unit and the array,
with the ``verify`` command to run.  ``ldpipe cache verify`` does the exhaustive job.

What binds the rows read to a unit's commit: the index entries of the unit's samples equal
its committed table (:func:`check_unit_entries`, a sha256 of a few KB per unit opened, on
every cache), and, for units committed with shard bindings (:func:`commit_bindings`), every
shard index and chunk the direct reader reads (``ldpipe.cache.shards``).
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import zarr

from ..config.sample import sample_number
from ..errors import first_line
from .codec import codec_for
from .manifest import F, SAMPLE_FIELDS, CacheError, Manifest
from .shards import ShardBinding, binding_difference, shard_rows
from .headpart import featstats_shape
from .headspec import FEATSTATS
from .store import PER_SAMPLE, ROWS_LAST, content_sha, unit_name

def _hint(url: str) -> str:
    return f"run `ldpipe cache verify {url}`"


def shard_keys(arr: zarr.Array) -> list[str]:
    """Store keys (relative to the array) of every shard (or chunk, if unsharded) it must have."""
    block = arr.shards or arr.chunks
    grid = [math.ceil(s / b) if b else 0 for s, b in zip(arr.shape, block)]
    return [arr.metadata.encode_chunk_key(c) for c in itertools.product(*(range(n) for n in grid))]


def missing_objects(arr: zarr.Array, sizes: dict[str, int] | None = None) -> list[str]:
    """Shard keys of ``arr`` that are absent or empty (``sizes``: key -> bytes of the array's
    objects, relative to the array; read from the store when not given)."""
    store, base = arr.store_path.store, arr.store_path.path
    from zarr.core.sync import sync
    out = []
    for key in shard_keys(arr):
        if sizes is not None:
            size = sizes.get(key)
        else:
            full = f"{base}/{key}" if base else key
            try:
                size = sync(store.getsize(full)) if sync(store.exists(full)) else None
            except (FileNotFoundError, OSError):
                size = None
        if not size:
            out.append(key)
    return out


def check_index(table: np.ndarray, scale: np.ndarray, unit_of: np.ndarray, m: Manifest,
                url: str, where: str = "index") -> None:
    """The per-sample table obeys the format's arithmetic (a lost shard reads as zeros)."""
    n = table.shape[0]
    if table.ndim != 2 or table.shape[1] != len(SAMPLE_FIELDS) or scale.shape != (n, 2) or \
            unit_of.shape != (n,):
        raise CacheError(f"{url}: {where} arrays have shapes {table.shape}, {scale.shape}, "
                         f"{unit_of.shape} (damaged); {_hint(url)}")
    if not n:
        return
    s = table[:, F["sample"]]
    nv = m.num_variants
    expect = sample_number(table[:, F["image_index"]], table[:, F["variant"]], nv)
    problems = []
    if (s < 0).any() or (s >= m.num_samples).any() or len(np.unique(s)) != n:
        problems.append(f"{where}/samples: sample numbers are not unique within 0..{m.num_samples - 1}")
    elif (expect != s).any():
        problems.append(f"{where}/samples: sample {int(s[expect != s][0])} has another image/variant")
    elif (unit_of != s // m.samples_per_shard).any():
        bad = int(np.nonzero(unit_of != s // m.samples_per_shard)[0][0])
        problems.append(f"{where}/unit: sample {int(s[bad])} is listed in unit {int(unit_of[bad])}, "
                        f"the format puts it in unit {int(s[bad] // m.samples_per_shard)}")
    elif (table[:, F["row_count"]] < 0).any() or (table[:, F["row_start"]] < 0).any():
        problems.append(f"{where}/samples: negative row ranges")
    elif not np.isfinite(scale).all() or (scale <= 0).any():
        problems.append(f"{where}/scale: non-positive or non-finite scale factors")
    if problems:
        raise CacheError(f"{url}: {problems[0]} (a missing or damaged shard); {_hint(url)}")


def check_unit(g: zarr.Group, url: str, u: int, m: Manifest | None = None,
               sizes: dict[str, int] | None = None) -> dict:
    """The commit of unit ``u`` (group ``g``), after checking that every array it committed
    exists with the committed row count (and, given the manifest ``m``, the widths it implies)
    and all its shard objects present and non-empty.

    ``sizes``: key -> bytes of the unit's stored objects (relative to the unit group), e.g.
    from a listing already made; read from the store when not given.
    """
    where = f"units/{unit_name(u)}"
    try:
        commit = g.attrs.get("commit")
    except Exception as exc:
        raise CacheError(f"{url}: {where} metadata cannot be read ({first_line(exc)}); "
                         f"{_hint(url)}") from None
    if not isinstance(commit, dict) or not isinstance(commit.get("sha256"), dict):
        raise CacheError(f"{url}: {where} has no commit record (a deleted or unfinished unit); "
                         f"rerun the dump to rewrite it")
    rows = commit.get("rows")
    for name in commit["sha256"]:
        try:
            arr = g[name]
        except Exception:
            raise CacheError(f"{url}: {where}/{name} is missing (deleted?); {_hint(url)}") from None
        length = arr.shape[-1] if name in ("box", "cls") else arr.shape[0]
        want = commit.get("samples") if name in PER_SAMPLE else rows
        if length != want:
            raise CacheError(f"{url}: {where}/{name} has {length} rows, its commit says {want} "
                             f"(damaged array metadata); {_hint(url)}")
        lead = _widths(m).get(name) if m is not None else None
        if lead is not None and tuple(arr.shape[:-1]) != lead:
            raise CacheError(f"{url}: {where}/{name} has shape {tuple(arr.shape)}, the manifest "
                             f"implies {(*lead, 'rows')}; {_hint(url)}")
        if name == FEATSTATS and m is not None and tuple(arr.shape) != featstats_shape(m, length):
            raise CacheError(f"{url}: {where}/{name} has shape {tuple(arr.shape)}, the manifest "
                             f"implies {featstats_shape(m, length) or 'none (no head_part)'}; {_hint(url)}")
        sub = None if sizes is None else {k[len(name) + 1:]: v for k, v in sizes.items()
                                          if k.startswith(f"{name}/")}
        lost = missing_objects(arr, sub)
        if lost:
            raise CacheError(f"{url}: {where}/{name}: shard {lost[0]} is missing or empty "
                             f"(deleted, truncated or not copied); {_hint(url)}")
    return commit


def check_unit_arrays(arrays: dict, commit: dict, url: str, u: int) -> None:
    """Arrays of a unit read whole equal what was committed (sha256 of the stored bytes)."""
    where = f"units/{unit_name(u)}"
    for name, arr in arrays.items():
        want = commit["sha256"].get(name)
        if isinstance(arr, np.ndarray) and want is not None and content_sha(arr) != want:
            raise CacheError(f"{url}: {where}/{name} does not match its commit checksum "
                             f"(damaged or edited shard); {_hint(url)}")


def commit_bindings(commit: dict, url: str, u: int) -> dict[str, ShardBinding] | None:
    """Array name -> the shard binding the commit records (``None``: a unit committed without
    bindings, by a writer before them); a binding that is partial or malformed is refused."""
    raw = commit.get("shards")
    if raw is None:
        return None
    where = f"{url}: units/{unit_name(u)}"
    if not isinstance(raw, dict) or sorted(raw) != sorted(commit["sha256"]):
        raise CacheError(f"{where}: its commit binds the shards of "
                         f"{sorted(raw) if isinstance(raw, dict) else raw!r}, not of its arrays "
                         f"{sorted(commit['sha256'])} (an edited commit record); {_hint(url)}")
    return {name: ShardBinding.parse(b, f"{where}/{name}") for name, b in raw.items()}


def binding_problems(g: zarr.Group, commit: dict, url: str, u: int, names) -> list[str]:
    """How the shards of arrays ``names`` of unit ``u`` (group ``g``) differ from the bindings
    its commit records, one line each (none for a unit committed without bindings)."""
    try:
        bindings = commit_bindings(commit, url, u)
    except CacheError as exc:
        return [str(exc)]
    out = []
    for name in names if bindings else ():
        where, z = f"units/{unit_name(u)}/{name}", g[name]
        fast = shard_rows(z, z.ndim - 1 if name in ROWS_LAST else 0, where)
        try:
            diff = binding_difference(fast, bindings[name]) if fast is not None else \
                "its layout is not the one its unit's commit binds (edited array metadata)"
        except CacheError as exc:
            diff = first_line(exc)
        if diff:
            out.append(f"{where}: {diff}")
    return out


def check_unit_entries(table: np.ndarray, scale: np.ndarray, commit: dict, url: str, u: int) -> None:
    """The index entries of unit ``u``'s samples (rows of the cache's table, any order) are the
    ones its commit records: sorted by sample, their sha256 equals the commit's ``samples`` /
    ``scale`` sha256 (two entries' row ranges swapped, an entry edited, or a unit group put in
    another's place would otherwise read other rows)."""
    order = np.argsort(table[:, F["sample"]], kind="stable")
    for name, arr in (("samples", table), ("scale", scale)):
        want = commit["sha256"].get(name)
        if want is not None and content_sha(arr[order]) != want:
            raise CacheError(f"{url}: index/{name}: the entries of units/{unit_name(u)} are not the "
                             f"ones its commit records (entries swapped or edited, or the unit "
                             f"replaced by another); {_hint(url)}")


def _widths(m: Manifest) -> dict[str, tuple[int, ...]]:
    """The stored leading dimensions of ``box`` and ``cls`` (rows last)."""
    extra = codec_for(m.codec).trailer
    return {"box": (4, m.geometry.reg_bins + extra), "cls": (m.geometry.num_classes + extra,)}
