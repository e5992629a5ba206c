"""``ldpipe cache merge A B [C ...] --out M``: the cache of an ensemble of teachers.

Per stored row the merged cache holds the log of the teachers' *averaged probabilities*::

    merged = log( (1/K) * sum_k softmax(row_k) )        (each edge over its bins; classes)

computed as ``logsumexp_k(log_softmax(row_k)) - log K`` in float64 (each source row is
renormalised first: int8 rows are log-probabilities only up to rounding), then encoded with the
sources' codec.  The LD, VLR and KD terms read ``softmax(stored / T)``, i.e. the temperature-
softened *average* ``p_avg^(1/T) / Z`` - not the average of the teachers' softened targets
(``docs/cache-format.md``).

The sources must be complete caches made the same way except for the teacher: every identity
field of the manifest but ``teacher`` (data set and its image ids, geometry and variants,
region policy and its assigners, codec and its clip, compressor, class storage, unit and chunk
sizes, the teacher's input factor ``teacher_upscale``) and, per sample, the same geometry and
the same stored anchors.  Anything else is
refused with the first difference named, and so is a CrossKD cache (a teacher head part and
feature statistics are one teacher's: there is no ensemble of them).  The result is an ordinary format-version-2 cache
(written unit by unit through :mod:`.store`'s commit protocol, so a killed merge resumes),
whose ``teacher`` describes the ensemble and whose ``lineage.ensemble`` lists each source
cache's lineage entry.

Each source is read through the checks of the student's reader (:mod:`.integrity`: its index
table, and per unit the commit, every committed shard present and non-empty, the crc32c of
every chunk and the sha256 of every array), so a damaged source is an error naming it, the
unit and the array, never zeros averaged into the ensemble.  ``--out`` may not be, enclose or
lie inside a source, however either is spelled (:mod:`.places`).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import math
import sys

import numpy as np
import torch

from ..errors import first_line
from ..provenance import versions
from . import codec as C
from .integrity import check_unit, check_unit_arrays
from .manifest import MANIFEST_LIBRARIES, F, CacheError, Manifest, TeacherInfo, _short
from .places import Input, check_cache_out
from .reader import geometry_of, read_checked_index
from .store import (UnitData, committed_units, create_or_resume, from_disk, index_complete,
                    open_cache, open_root, unit_name, write_index, write_unit)

# identity fields the sources must share (everything but the teacher)
SHARED = ("geometry", "data", "region", "codec", "codec_clip", "codec_step", "compressor", "store_cls",
          "samples_per_shard", "chunk_rows", "teacher_upscale")


# per-sample table columns two sources must share besides the geometry (reader.geometry_of)
ROW_IDENTITY = ("sample", "image_index", "image_id", "variant", "row_start", "row_count")


def average_log_probs(rows: list[torch.Tensor]) -> torch.Tensor:
    """``log(mean_k softmax(rows_k))`` over the last axis, float32 (computed in float64)."""
    lp = torch.stack([torch.log_softmax(r.double(), dim=-1) for r in rows])
    return (torch.logsumexp(lp, dim=0) - math.log(len(rows))).float()


def shared_differences(a: Manifest, b: Manifest, name_a: str, name_b: str) -> list[str]:
    """Human lines for each shared identity field in which ``b`` differs from ``a``."""
    ia, ib = a.identity(), b.identity()
    out = []
    for key in SHARED:
        va, vb = ia.get(key), ib.get(key)
        if va == vb:
            continue
        subs = sorted(set(va) | set(vb)) if isinstance(va, dict) and isinstance(vb, dict) else [None]
        for sub in subs:
            x, y = (va, vb) if sub is None else (va.get(sub), vb.get(sub))
            if x != y:
                where = key if sub is None else f"{key}.{sub}"
                out.append(f"{where}: {name_a} has {_short(x)}, {name_b} has {_short(y)}")
    return out


def ensemble_manifest(sources: list[tuple[str, Manifest]]) -> Manifest:
    """The manifest of the merge: the first source's with the ensemble as teacher and lineage."""
    first = sources[0][1]
    d = first.to_dict()
    m = Manifest.parse(d, sources[0][0])  # a copy
    members = [{"url": url, "cache_id": s.cache_id, "model": s.teacher.model,
                "architecture": s.teacher.architecture, "checkpoint_sha256": s.teacher.checkpoint_sha256}
               for url, s in sources]
    backbones = " + ".join(str(s.teacher.architecture.get("backbone")) for _, s in sources)
    sha = hashlib.sha256("\n".join(f"{s.cache_id} {s.teacher.checkpoint_sha256}"
                                   for _, s in sources).encode()).hexdigest()
    m.teacher = TeacherInfo(
        model="ensemble(" + "+".join(s.teacher.model for _, s in sources) + ")",
        architecture={"type": "ensemble", "backbone": f"ensemble of {len(sources)} ({backbones})",
                      "reg_max": first.geometry.reg_max, "average": "probabilities",
                      "members": members},
        checkpoint_sha256=sha)
    m.lineage = {"ensemble": [s.lineage_entry(url)["cache"] for url, s in sources]}
    m.created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    m.command = " ".join(sys.argv)
    m.pipeline = {"source": "", "name": "cache merge"}
    m.checkpoint_path = ""
    m.versions = versions(MANIFEST_LIBRARIES)
    m.cache_id = m.compute_id()
    return m


def _read_unit(root, url: str, u: int, m: Manifest, names) -> dict[str, np.ndarray]:
    """Arrays ``names`` of unit ``u`` of the source ``url``, read whole through the checks the
    student's reader runs (:mod:`.integrity`: the commit lists them, every array it committed
    exists with its row count and all its shards present and non-empty, each chunk's crc32c,
    the content equals the commit's sha256); a :class:`CacheError` naming the source, unit and
    array otherwise (zarr alone reads a missing shard as zeros, which would be averaged in)."""
    where, name = f"units/{unit_name(u)}", "group"
    try:
        g = root[where]
    except Exception:
        raise CacheError(f"{url}: {where} is missing (a deleted unit); run `ldpipe cache verify "
                         f"{url}`") from None
    commit = check_unit(g, url, u, m)
    absent = [n for n in names if n not in commit["sha256"]]
    if absent:
        raise CacheError(f"{url}: {where} has no {', '.join(absent)} in its commit; run "
                         f"`ldpipe cache verify {url}`")
    try:
        out = {}
        for name in names:
            out[name] = g[name][...]
    except Exception as exc:
        raise CacheError(f"{url}: {where}/{name} cannot be read ({first_line(exc)}); "
                         f"run `ldpipe cache verify {url}`") from None
    check_unit_arrays(out, commit, url, u)
    return out


def _check_same_rows(ref: dict, other: dict, m: Manifest, name_a: str, name_b: str, u: int) -> None:
    """Refuse, naming the first sample, when two units' per-sample tables or anchors differ."""
    ta, tb = ref["samples"], other["samples"]
    if ta.shape != tb.shape:
        raise CacheError(f"units/{unit_name(u)}: {name_a} has {len(ta)} samples, {name_b} {len(tb)}")
    for ra, rb, sa, sb in zip(ta, tb, ref["scale"], other["scale"]):
        label = m.sample_label(ra)
        bad = [(f, int(ra[F[f]]), int(rb[F[f]])) for f in ROW_IDENTITY if ra[F[f]] != rb[F[f]]]
        bad += geometry_of(ra, sa).differences(geometry_of(rb, sb), rel_tol=0.0)
        if bad:
            f, x, y = bad[0]
            what = "stored anchors" if f == "row_count" else f
            raise CacheError(f"{label}: {what} differ ({name_a}: {x}, {name_b}: {y}); merging needs "
                             "the same samples and the same region rows in every cache")
        sl = slice(int(ra[F["row_start"]]), int(ra[F["row_start"]] + ra[F["row_count"]]))
        if not np.array_equal(ref["anchor"][sl], other["anchor"][sl]):
            raise CacheError(f"{label}: the stored anchors differ between {name_a} and {name_b} (same "
                             "count, other anchors): the regions differ; dump both with the same "
                             "cache.region and cache.readers")


def merge_unit(units: list[dict], codec: str, store_cls: bool, box_step: float = 0.0) -> UnitData:
    """The merged arrays of one unit from the sources' (rows already checked to align;
    ``box_step``: the sources' int8 box step, kept by the output)."""
    ref, coder = units[0], C.codec_for(codec)
    out = {}
    for name in ("box", "cls") if store_cls else ("box",):
        rows = [coder.unpack(np.ascontiguousarray(from_disk(name, u[name]))) for u in units]
        step = box_step if name == "box" else 0.0
        out[name] = coder.pack(coder.encode(average_log_probs(rows), step)) if rows[0].shape[0] else \
            np.ascontiguousarray(from_disk(name, ref[name]))
    return UnitData(ref["samples"], ref["scale"], ref["anchor"], out["box"], out.get("cls"))


def merge(urls: list[str], out: str, overwrite: bool = False) -> dict:
    """Write the ensemble cache of ``urls`` to ``out`` (resumes a merge of the same sources)."""
    if len(urls) < 2:
        raise CacheError(f"cache merge needs at least two caches, got {len(urls)}")
    # the output may not be, enclose or nest into a source (--overwrite would delete it)
    check_cache_out(out, overwrite, [Input("one of the caches to merge", url) for url in urls])
    sources = [(url, *open_cache(url)) for url in urls]
    names = [f"cache {i + 1} ({url})" for i, url in enumerate(urls)]
    for (url, root, m), name in zip(sources, names):
        committed = committed_units(root)
        if not index_complete(root, m.num_samples) or any(u not in committed for u in range(m.num_units)):
            raise CacheError(f"{url} is incomplete ({len(committed)} of {m.num_units} units committed); "
                             "finish its dump-teacher first")
        read_checked_index(root, url, m)  # the table's arithmetic (a lost index shard reads as zeros)
    base = sources[0][2]
    for url, _, m in sources:  # the merge averages probabilities: raw class logits have none
        if m.store_cls and m.cls_values == "logits":
            raise CacheError(f"cannot merge {url}: its class rows are raw logits "
                             "(cache.cls_values='logits'); merge caches of log-probabilities")
        if m.has_head_stats:  # CrossKD: one teacher's head weights and feature statistics
            raise CacheError(f"cannot merge {url}: it holds a CrossKD teacher head part and feature "
                             "statistics, which are one teacher's (merging would mix teachers); "
                             "merge caches dumped without them")
        if m.views is not None:  # its samples are views whose records live in the cache
            raise CacheError(f"cannot merge {url}: it is a cache of views ([[data.augment]]); "
                             "merge caches of the fixed variants")
    for (url, _, m), name in zip(sources[1:], names[1:]):
        diff = shared_differences(base, m, names[0], name)
        if diff:
            raise CacheError(f"cannot merge {url}: it was made differently from {urls[0]}:\n  "
                             + "\n  ".join(diff))
    layout = ["samples", "scale", "anchor"]
    for u in range(base.num_units):  # every sample's rows align, before anything is written
        units = [_read_unit(r, url, u, m, layout) for url, r, m in sources]
        for other, name in zip(units[1:], names[1:]):
            _check_same_rows(units[0], other, base, names[0], name, u)
    manifest = ensemble_manifest([(url, m) for url, _, m in sources])
    create_or_resume(out, manifest, overwrite)
    root = open_root(out, "a")
    done = committed_units(root)
    arrays = layout + ["box"] + (["cls"] if base.store_cls else [])
    for u in range(base.num_units):
        if u in done:
            continue
        units = [_read_unit(r, url, u, m, arrays) for url, r, m in sources]
        write_unit(root, u, merge_unit(units, base.codec, base.store_cls, base.box_step), base.compressor,
                   base.chunk_rows, bind=True)
    if not (len(done) == base.num_units and index_complete(root, base.num_samples)):
        write_index(root, base.compressor)
    return {"cache": out, "cache_id": manifest.cache_id, "teachers": len(urls),
            "samples": base.num_samples, "units": base.num_units, "units_reused": len(done),
            "sources": [m.cache_id for _, _, m in sources]}
