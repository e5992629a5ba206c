"""``ldpipe cache verify``: check a cache end to end and report every problem.

Decodes every array shard by shard (a shard that is missing or fails its crc32c is named by
its store path), compares content with the commit's sha256 (and the shards with its shard
bindings, where it has them), checks the per-sample table (numbering, row ranges, image ids,
geometry), the anchor indices, that box/class rows are finite normalised log-probabilities,
the consolidated index and, in a CrossKD cache, each unit's ``featstats`` (like any unit array,
plus its shape and values) and the ``head_part/`` arrays against the manifest's
``head_part.sha256`` (:mod:`.headpart`).  Never raises for a damaged cache: problems go to ``errors``.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import zarr
from zarr.core.sync import sync

from ..config.sample import sample_pair
from ..errors import first_line
from . import geometry_check, headpart, value_check
from .views import stored_problems
from .codec import CODEC_TABLE, codec_for
from .info import is_listable, stored_objects
from .integrity import binding_problems
from .manifest import F, SAMPLE_FIELDS, CacheError, Manifest
from .store import (committed_units, content_sha, index_complete,
                    open_cache, unit_name)
from .upscale import Upscale

MAX_ERRORS = 200



def verify(url: str, workers: int | None = None) -> dict:
    """Check a cache end to end; ``{cache, ok, errors, warnings, checked}``.  Units are
    checked by ``workers`` threads (default: one per core, at least 2)."""
    root, m = open_cache(url)
    v = _Verifier(root, m, url, workers or max(2, os.cpu_count() or 1))
    try:
        v.run()
    except CacheError:
        raise
    except Exception as exc:  # anything unforeseen is a failed check, not a crash
        v.error(f"{url}: verification stopped: {first_line(exc)}")
    errors = v.errors + ([f"... and {v.dropped} more errors"] if v.dropped else [])
    return {"cache": url, "ok": not errors, "errors": errors, "warnings": v.warnings,
            "checked": v.checked}


def format_verify(d: dict) -> str:
    c = d["checked"]
    head = (f"{d['cache']}: checked {c.get('units', 0)} units, {c.get('arrays', 0)} arrays in "
            f"{c.get('shards', 0)} shards, {c.get('samples', 0)} samples, {c.get('rows', 0)} rows")
    lines = [head]
    lines += [f"warning: {w}" for w in d["warnings"]]
    if d["ok"]:
        lines.append("OK")
    else:
        lines += [f"error: {e}" for e in d["errors"]]
        lines.append(f"FAILED: {len(d['errors'])} error(s)")
    return "\n".join(lines)


class _Verifier:
    """One verification run: the cache, its manifest, and what was found so far."""

    def __init__(self, root: zarr.Group, m: Manifest, url: str, workers: int = 1) -> None:
        self.root, self.m, self.url, self.workers = root, m, url, workers
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.dropped = 0
        self.checked = {"units": 0, "arrays": 0, "shards": 0, "samples": 0, "rows": 0,
                        "bytes_decoded": 0}

    def error(self, msg: str) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(msg)
        else:
            self.dropped += 1

    def _unit_alone(self, u: int, g: zarr.Group, commit: dict):
        """Check one unit with a verifier of its own (run in a worker thread)."""
        sub = _Verifier(self.root, self.m, self.url)
        try:
            res = sub._unit(u, g, commit)
            if res is not None:
                sub._geometry(res[0], res[1], u)
        except Exception as exc:
            sub.error(f"units/{unit_name(u)}: verification stopped: {first_line(exc)}")
            res = None
        return sub, res

    def _merge(self, job):
        sub, res = job
        for e in sub.errors:
            self.error(e)
        self.dropped += sub.dropped
        self.warnings += sub.warnings
        for k, v in sub.checked.items():
            self.checked[k] = self.checked.get(k, 0) + v
        return res

    # ------------------------------------------------------------ whole cache
    def run(self) -> None:
        m, url = self.m, self.url
        if not self._manifest_consistent():
            return
        num_units, total = m.num_units, m.num_samples
        present: dict[int, zarr.Group] = {}
        if "units" in self.root:
            for name, g in self.root["units"].groups():
                if not name.isdigit() or int(name) >= num_units:
                    self.error(f"{url}: unexpected group units/{name} (planned units are "
                               f"{unit_name(0)}..{unit_name(num_units - 1)})")
                    continue
                present[int(name)] = g
        committed = committed_units(self.root)
        missing = [u for u in range(num_units) if u not in committed]
        if missing:
            names = ", ".join(f"units/{unit_name(u)}" for u in missing[:10])
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            self.error(f"{url}: {len(missing)} of {num_units} units have no commit: {names}{more} "
                       "(the dump did not finish; rerun the same command to complete it)")
        tables: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        todo = [u for u in sorted(committed) if u in present]
        # units are checked in parallel (decompression, crc32c, sha256 and the value checks
        # release the GIL); each unit's findings are merged in unit order, so the report is
        # the same as a sequential run's
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            jobs = [pool.submit(self._unit_alone, u, present[u], committed[u]) for u in todo]
            for u, job in zip(todo, jobs):
                res = self._merge(job.result())
                if res is not None:
                    tables[u] = res
        complete = self._index(tables, missing)
        for problem in headpart.head_part_problems(self.root, m, url):
            self.error(problem)
        for problem in stored_problems(self.root, m, url):  # a view cache's records
            self.error(problem)
        # only a local store writes temporary files (object stores replace objects whole);
        # on an object store this would list every object
        partial = (sorted(k for k in stored_objects(self.root) if k.endswith(".partial"))
                   if is_listable(self.root) else [])
        if partial:
            self.warnings.append(f"{url}: {len(partial)} temporary file(s) of writes cut short by a "
                                 f"kill (harmless, ignored by readers): {', '.join(partial[:5])}")
        leftovers = sorted(set(present) - set(committed))
        if leftovers and not missing:
            self.warnings.append(f"{url}: uncommitted leftover groups " +
                                 ", ".join(f"units/{unit_name(u)}" for u in leftovers[:10]))
        self.checked["complete"] = bool(complete and not missing)
        self.checked["units_planned"] = num_units
        self.checked["samples_planned"] = total

    def _manifest_consistent(self) -> bool:
        m, url = self.m, self.url
        if m.compute_id() != m.cache_id:
            self.error(f"{url}: manifest cache_id {m.cache_id} does not match its identity "
                       f"fields (expected {m.compute_id()}): the manifest was edited")
        if m.codec not in CODEC_TABLE:
            self.error(f"{url}: unknown codec {m.codec!r}")
            return False
        nv, variants = m.num_variants, m.geometry.variants
        if nv < 1 or len(variants) != nv or [v.get("key") for v in variants] != m.variants:
            self.error(f"{url}: manifest variants {m.variants} disagree with geometry.variants")
            return False
        per, total, num_images = m.samples_per_shard, m.num_samples, m.data.num_images
        if per < 1 or total != num_images * nv or m.num_units != math.ceil(total / per):
            self.error(f"{url}: manifest counts disagree: num_samples {total}, num_images "
                       f"{num_images}, {nv} variants, num_units {m.num_units}, samples_per_shard {per}")
            return False
        if len(m.data.image_ids) != num_images:
            self.error(f"{url}: manifest lists {len(m.data.image_ids)} image ids for {num_images} images")
            return False
        return True

    # ------------------------------------------------------------ arrays
    def _read_shards(self, z, where: str):
        """Read an array shard by shard; a shard that fails is reported by its store path."""
        base = self.url.rstrip("/")
        shape = tuple(z.shape)
        shard = tuple(z.shards or z.chunks)
        out = np.zeros(shape, dtype=z.dtype)
        ok = True
        grid = [max(1, -(-s // c)) if s else 0 for s, c in zip(shape, shard)]
        for idx in np.ndindex(*grid):
            self.checked["shards"] += 1
            key = f"{where}/{z.metadata.chunk_key_encoding.encode_chunk_key(idx)}"
            sl = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(idx, shard, shape))
            if not self._exists(key):
                self.error(f"{where}: shard {base}/{key} is missing")
                ok = False
                continue
            try:
                out[sl] = z[sl]
            except Exception as exc:
                self.error(f"{where}: shard {base}/{key} does not decode ({first_line(exc)}; "
                           "checksum mismatch or truncated file)")
                ok = False
        return out if ok else None

    def _exists(self, key: str) -> bool:
        prefix = self.root.store_path.path
        return bool(sync(self.root.store_path.store.exists(f"{prefix}/{key}" if prefix else key)))

    # ------------------------------------------------------------ one unit
    def _unit(self, u: int, g: zarr.Group, commit: dict):
        m, un = self.m, f"units/{unit_name(u)}"
        expected = ["samples", "scale", "anchor", "box"] + (["cls"] if m.store_cls else []) + (
            ["featstats"] if m.has_head_stats else [])
        self.checked["units"] += 1
        shas = commit.get("sha256") if isinstance(commit.get("sha256"), dict) else {}
        if sorted(shas) != sorted(expected):
            self.error(f"{un}: commit lists arrays {sorted(shas)}, expected {sorted(expected)}")
        data: dict[str, np.ndarray] = {}
        for name in expected:
            where = f"{un}/{name}"
            if name not in g:
                self.error(f"{where}: array is missing")
                continue
            arr = self._read_shards(g[name], where)
            self.checked["arrays"] += 1
            if arr is None:
                continue
            self.checked["bytes_decoded"] += int(arr.nbytes)
            got = content_sha(arr)
            if name in shas and got != shas[name]:
                self.error(f"{where}: content sha256 {got[:16]} != commit {str(shas[name])[:16]} "
                           "(the data changed after the commit)")
                continue
            data[name] = arr
        for problem in binding_problems(g, commit, self.url, u, list(data)):
            self.error(problem)
        if "samples" not in data:
            return None
        table = data["samples"]
        if table.ndim != 2 or table.shape[1] != len(SAMPLE_FIELDS):
            self.error(f"{un}/samples: shape {table.shape}, expected [n, {len(SAMPLE_FIELDS)}]")
            return None
        n = table.shape[0]
        self.checked["samples"] += n
        if n != commit.get("samples"):
            self.error(f"{un}: holds {n} samples, commit says {commit.get('samples')}")
        self._sample_numbers(u, table)
        scale = data.get("scale")
        if scale is not None and scale.shape != (n, 2):
            self.error(f"{un}/scale: shape {scale.shape}, expected ({n}, 2)")
            scale = None
        rows = int(commit.get("rows", -1))
        rows_ok = self._row_ranges(u, table, rows)
        self.checked["rows"] += max(rows, 0)
        if data.get("anchor") is not None:
            self._anchors(u, table, data["anchor"], rows, rows_ok)
        reg_bins, extra = m.geometry.reg_bins, codec_for(m.codec).trailer
        for name, want_shape in (("box", (4, reg_bins + extra, rows)),
                                 ("cls", (m.geometry.num_classes + extra, rows))):
            if data.get(name) is not None:
                self._values(u, name, data[name], want_shape, table, rows, rows_ok)
        if data.get("featstats") is not None:
            problem = headpart.featstats_problem(m, f"{un}/featstats", data["featstats"], n)
            if problem:
                self.error(problem)
        return table, (scale if scale is not None else np.ones((n, 2)))

    def _sample_numbers(self, u: int, table: np.ndarray) -> None:
        m, un = self.m, f"units/{unit_name(u)}"
        per, total, nv, image_ids = m.samples_per_shard, m.num_samples, m.num_variants, m.data.image_ids
        lo, hi = u * per, min((u + 1) * per, total)
        s = table[:, F["sample"]]
        if not np.array_equal(s, np.arange(lo, hi)):
            self.error(f"{un}/samples: sample numbers {s[:8].tolist()}... are not {lo}..{hi - 1}")
        ii, vi = table[:, F["image_index"]], table[:, F["variant"]]
        want_ii, want_vi = sample_pair(s, nv)
        numbering = (ii != want_ii) | (vi != want_vi)
        inside = (ii >= 0) & (ii < len(image_ids))
        ids = self._image_ids()
        wrong_id = ~numbering & (~inside | (table[:, F["image_id"]] != ids[np.where(inside, ii, 0)]))
        for k in np.nonzero(numbering | wrong_id)[0]:  # only the bad rows go through Python
            rec = table[k]
            if numbering[k]:
                self.error(f"{un}: {m.sample_label(rec)}: sample != image_index*{nv}+variant "
                           f"(image_index {int(ii[k])}, variant {int(vi[k])})")
            else:
                self.error(f"{un}: {m.sample_label(rec)}: image_id does not match the manifest's "
                           f"image {int(ii[k])}")

    def _image_ids(self) -> np.ndarray:
        ids = getattr(self.m, "_image_id_array", None)
        if ids is None:
            ids = np.asarray(self.m.data.image_ids, dtype=np.int64)
            if not ids.size:
                ids = np.zeros(1, np.int64)
            self.m._image_id_array = ids
        return ids

    def _row_ranges(self, u: int, table: np.ndarray, rows: int) -> bool:
        """Row ranges contiguous, in order and summing to the unit's rows."""
        n = table.shape[0]
        starts, counts = table[:, F["row_start"]], table[:, F["row_count"]]
        expect = np.concatenate([[0], np.cumsum(counts)[:-1]]) if n else np.zeros(0, np.int64)
        if (counts < 0).any() or not np.array_equal(starts, expect) or int(counts.sum()) != rows:
            bad = next((i for i in range(n) if counts[i] < 0 or starts[i] != expect[i]), n - 1)
            self.error(f"units/{unit_name(u)}: row ranges are not contiguous or out of bounds at "
                       f"{self.m.sample_label(table[bad]) if n else 'unit'} (row_start "
                       f"{starts[bad] if n else '-'}, row_count {counts[bad] if n else '-'}, "
                       f"unit rows {rows})")
            return False
        return True

    def _anchors(self, u: int, table: np.ndarray, anchor: np.ndarray, rows: int, rows_ok: bool) -> None:
        m, un = self.m, f"units/{unit_name(u)}/anchor"
        if anchor.shape != (rows,) or anchor.dtype != np.int32:
            self.error(f"{un}: shape {anchor.shape} dtype {anchor.dtype}, expected ({rows},) int32")
            return
        if not rows_ok:
            return
        starts, counts = table[:, F["row_start"]], table[:, F["row_count"]]
        up = m.teacher_upscale and Upscale.of_entry(m.teacher_upscale, m.geometry.strides, m.geometry.anchor_scale)
        for i, rec in enumerate(table):
            a = anchor[starts[i]:starts[i] + counts[i]]
            grid_n = geometry_check.num_anchors(m.geometry, int(rec[F["pad_h"]]), int(rec[F["pad_w"]]))
            if up:  # a teacher at 2^k x: the student's levels without a counterpart hold no rows
                grid_n = up.served_count((int(rec[F["pad_h"]]), int(rec[F["pad_w"]])))
            if a.size and ((np.diff(a) <= 0).any() or a[0] < 0 or a[-1] >= grid_n):
                self.error(f"{un}: {m.sample_label(rec)}: anchor indices are not sorted, unique "
                           f"and within the grid of {grid_n} anchors")
            elif m.region.policy == "dense" and a.size != grid_n:
                self.error(f"{un}: {m.sample_label(rec)}: dense policy but {a.size} of "
                           f"{grid_n} anchors stored")

    def _values(self, u: int, name: str, arr: np.ndarray, want_shape: tuple, table: np.ndarray,
                rows: int, rows_ok: bool) -> None:
        problem = value_check.row_problem(self.m, f"units/{unit_name(u)}/{name}", name, arr,
                                          want_shape, table, rows, rows_ok)
        if problem:
            self.error(problem)

    def _geometry(self, table: np.ndarray, scale: np.ndarray, u: int) -> None:
        for k in geometry_check.suspect_rows(self.m.geometry, table, scale):
            found = geometry_check.problems(self.m.geometry, table[k], scale[k])
            if found:
                self.error(f"units/{unit_name(u)}/samples: {self.m.sample_label(table[k])}: "
                           + "; ".join(found))

    # ------------------------------------------------------------ the index
    def _index(self, tables: dict, missing: list[int]) -> bool:
        m, url = self.m, self.url
        total, per, num_units = m.num_samples, m.samples_per_shard, m.num_units
        complete = index_complete(self.root)
        if "index" not in self.root:
            if not missing:
                self.error(f"{url}: every unit is committed but the consolidated index/ is missing "
                           "(the dump was interrupted at the end; rerun it)")
            return complete
        ix = self.root["index"]
        arrays = {}
        for name in ("samples", "scale", "unit"):
            if name not in ix:
                self.error(f"{url}: index/{name} is missing")
                continue
            data = self._read_shards(ix[name], f"index/{name}")
            if data is not None:
                arrays[name] = data
        if complete and len(arrays) == 3:
            t, s, un = arrays["samples"], arrays["scale"], arrays["unit"]
            if t.shape != (total, len(SAMPLE_FIELDS)):
                self.error(f"{url}: the index claims complete but holds {t.shape[0]} samples of "
                           f"{total} planned")
            elif not np.array_equal(t[:, F["sample"]], np.arange(total)):
                seen = set(t[:, F["sample"]].tolist())
                gone = [x for x in range(total) if x not in seen][:10]
                self.error(f"{url}: the index claims complete but sample numbers are not "
                           f"0..{total - 1} (missing e.g. {gone})")
            else:
                if not np.array_equal(un, np.arange(total) // per):
                    self.error(f"{url}: index/unit does not map samples to their units")
                if len(tables) == num_units:
                    want_t = np.concatenate([tables[u][0] for u in range(num_units)])
                    want_s = np.concatenate([tables[u][1] for u in range(num_units)])
                    bad = np.nonzero((t != want_t).any(axis=1) | (s != want_s).any(axis=1))[0]
                    for i in bad[:10]:
                        self.error(f"{url}: index row {i} ({m.sample_label(t[i])}) differs from "
                                   f"units/{unit_name(int(i) // per)}/samples")
        elif not complete:
            self.error(f"{url}: index/ exists but is not marked complete (interrupted at the end; "
                       "rerun the dump)")
        return complete
