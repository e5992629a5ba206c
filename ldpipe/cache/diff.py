"""``ldpipe cache diff``: compare two caches over the samples they share (a report).

Samples are matched by image id and variant key; for each common sample the anchor
sets are compared and, over the common anchors, the box / class log-probabilities
(max abs difference) and the edge distributions' KL at temperature ``T``.  CrossKD feature
statistics (``featstats``) and head parts are not compared.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as Fn

from .manifest import F, CacheError
from .reader import UnitArrays, geometry_of, read_checked_index, sample_rows
from .store import open_cache


# what makes two caches' samples different inputs (not the source image's size or the scale)
INPUT_FIELDS = ("img_shape", "pad_shape", "flip")


def diff(a: str, b: str, T: float = 10.0) -> dict:
    """Compare two caches sample by sample (matched by image id and variant key)."""
    if not T > 0:
        raise CacheError(f"temperature must be > 0, got {T}")
    ra, ma = open_cache(a)
    rb, mb = open_cache(b)
    bins_a, bins_b = ma.geometry.reg_max, mb.geometry.reg_max
    if bins_a != bins_b:
        raise CacheError(f"cannot compare {a} (reg_max {bins_a}) with {b} (reg_max {bins_b})")
    views_a, views_b = (ma.views or {}).get("sha256"), (mb.views or {}).get("sha256")
    if views_a != views_b:  # a view key names another input in each (or a fixed variant in one)
        raise CacheError(f"cannot compare {a} with {b}: their samples are other views "
                         f"(views.sha256 {views_a} vs {views_b}; None: fixed variants)")
    same_classes = ma.geometry.num_classes == mb.geometry.num_classes
    ta, sa, ua = read_checked_index(ra, a, ma)
    tb, sb, ub = read_checked_index(rb, b, mb)
    ka, kb = list(ma.variants), list(mb.variants)

    def keys(table, vkeys):
        return {(int(r[F["image_id"]]), vkeys[int(r[F["variant"]])] if int(r[F["variant"]]) < len(vkeys)
                 else f"#{int(r[F['variant']])}"): i for i, r in enumerate(table)}

    index_a, index_b = keys(ta, ka), keys(tb, kb)
    common = [k for k in index_a if k in index_b]
    only_a = [k for k in index_a if k not in index_b]
    only_b = [k for k in index_b if k not in index_a]
    units_a = UnitArrays(ra, a, decoded=True, keep=4, manifest=ma)
    units_b = UnitArrays(rb, b, decoded=True, keep=4, manifest=mb)
    mismatches, mismatch_examples, geometry_mismatches = 0, [], 0
    max_box, max_cls = 0.0, 0.0
    have_cls = same_classes and ma.store_cls and mb.store_cls
    kl_sum, kl_count, common_anchors = 0.0, 0, 0
    common.sort(key=lambda k: (int(ua[index_a[k]]), index_a[k]))
    for key in common:
        i, j = index_a[key], index_b[key]
        reca, recb = ta[i], tb[j]
        if geometry_of(reca, sa[i]).differences(geometry_of(recb, sb[j]), INPUT_FIELDS):
            geometry_mismatches += 1
        da = sample_rows(units_a.get(int(ua[i])), reca, ma.codec, have_cls, a, int(ua[i]))
        db = sample_rows(units_b.get(int(ub[j])), recb, mb.codec, have_cls, b, int(ub[j]))
        anc_a, anc_b = da["anchor"].numpy(), db["anchor"].numpy()
        if not np.array_equal(anc_a, anc_b):
            mismatches += 1
            if len(mismatch_examples) < 10:
                mismatch_examples.append({"image_id": key[0], "variant": key[1],
                                          "anchors_a": int(anc_a.size), "anchors_b": int(anc_b.size),
                                          "common": int(np.intersect1d(anc_a, anc_b).size)})
        _, ia, ib = np.intersect1d(anc_a, anc_b, assume_unique=True, return_indices=True)
        if not ia.size:
            continue
        common_anchors += int(ia.size)
        ia_t, ib_t = torch.from_numpy(ia), torch.from_numpy(ib)
        box_a = da["box"][ia_t].double()
        box_b = db["box"][ib_t].double()
        max_box = max(max_box, float((box_a - box_b).abs().max()))
        lpa = Fn.log_softmax(box_a / T, dim=-1)
        lpb = Fn.log_softmax(box_b / T, dim=-1)
        kl = (lpa.exp() * (lpa - lpb)).sum(-1)
        kl_sum += float(kl.sum())
        kl_count += int(kl.numel())
        if have_cls and da["cls"] is not None and db["cls"] is not None:
            ca, cb = da["cls"][ia_t].double(), db["cls"][ib_t].double()
            max_cls = max(max_cls, float((ca - cb).abs().max()))
    return {
        "a": a, "b": b,
        "cache_id_a": ma.cache_id, "cache_id_b": mb.cache_id,
        "codec_a": ma.codec, "codec_b": mb.codec,
        "samples_a": len(index_a), "samples_b": len(index_b),
        "common": len(common), "only_a": len(only_a), "only_b": len(only_b),
        "only_a_examples": [list(k) for k in only_a[:10]],
        "only_b_examples": [list(k) for k in only_b[:10]],
        "anchor_set_mismatches": mismatches,
        "anchor_set_mismatch_examples": mismatch_examples,
        "geometry_mismatches": geometry_mismatches,
        "common_anchors": common_anchors,
        "max_abs_box": max_box if common_anchors else None,
        "max_abs_cls": (max_cls if common_anchors else None) if have_cls else None,
        "T": float(T),
        "mean_kl": kl_sum / kl_count if kl_count else None,
    }


def format_diff(d: dict) -> str:
    def num(x, fmt):
        return "n/a" if x is None else format(x, fmt)

    lines = [
        f"a             {d['a']}  ({d['cache_id_a']}, {d['codec_a']})",
        f"b             {d['b']}  ({d['cache_id_b']}, {d['codec_b']})",
        f"samples       a {d['samples_a']}, b {d['samples_b']}, common {d['common']}, "
        f"only a {d['only_a']}, only b {d['only_b']}",
        f"anchor sets   {d['anchor_set_mismatches']} of {d['common']} common samples differ; "
        f"{d['common_anchors']} common anchors compared",
        f"max |a-b|     box log-probs {num(d['max_abs_box'], '.6g')}, "
        f"class log-probs {num(d['max_abs_cls'], '.6g')}",
        f"mean KL       {num(d['mean_kl'], '.6g')} nats per edge at T={d['T']:g} "
        "(KL(softmax(a/T) || softmax(b/T)))",
    ]
    if d["geometry_mismatches"]:
        lines.append(f"geometry      {d['geometry_mismatches']} common samples have different input "
                     "geometry")
    return "\n".join(lines)
