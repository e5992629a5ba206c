"""Per-sample geometry checks of ``ldpipe cache verify``, vectorised over a unit's table.

:func:`suspect_rows` evaluates every condition of :func:`problems` on whole columns at once
(a COCO-sized cache has 236k samples: a Python loop over all of them would dominate
verification); only the rows it flags go through :func:`problems`, which words the message.
"""
from __future__ import annotations

import functools

import numpy as np

from ..models.anchors import make_grid
from .manifest import F, Geometry


def num_anchors(geo, pad_h: int, pad_w: int) -> int:
    """Anchors of the grid of one padded shape (computed once per shape)."""
    key = (tuple(geo.strides), float(geo.anchor_scale), pad_h, pad_w)
    return _grid_anchors(key)


@functools.lru_cache(maxsize=4096)
def _grid_anchors(key) -> int:
    strides, anchor_scale, pad_h, pad_w = key
    return make_grid((pad_h, pad_w), strides, anchor_scale).num_anchors


def problems(geo: Geometry, rec: np.ndarray, sc: np.ndarray) -> list[str]:
    """What is wrong with one sample's geometry (empty: nothing)."""
    ih, iw, ph, pw = (int(rec[F[k]]) for k in ("img_h", "img_w", "pad_h", "pad_w"))
    oh, ow = int(rec[F["ori_h"]]), int(rec[F["ori_w"]])
    div = int(geo.pad_divisor) or 1
    out = []
    if oh < 1 or ow < 1 or ih < 1 or iw < 1:
        out.append(f"empty shape (ori {oh}x{ow}, img {ih}x{iw})")
    if ih > ph or iw > pw or ph % div or pw % div or ph - ih >= div or pw - iw >= div:
        out.append(f"pad {ph}x{pw} is not img {ih}x{iw} padded to a multiple of {div}")
    v = int(rec[F["variant"]])
    view = 0 <= v < len(geo.variants) and bool(geo.variants[v].get("view"))  # a crop / mosaic: no map
    if 0 <= v < len(geo.variants) and not view:
        var = geo.variants[v]
        if bool(rec[F["flip"]]) != bool(var.get("flip")):
            out.append(f"flip {bool(rec[F['flip']])} but variant {var.get('key')} has "
                       f"flip {var.get('flip')}")
        si = var.get("scale_idx", -1)
        if 0 <= si < len(geo.input_scales):
            target = geo.input_scales[si]
            if max(ih, iw) > max(target) or min(ih, iw) > min(target):
                out.append(f"img {ih}x{iw} exceeds the input scale {target}")
    if not (np.isfinite(sc).all() and (sc > 0).all()):
        out.append(f"bad scale factor {sc.tolist()}")
    elif not view and oh >= 1 and ow >= 1 and (abs(sc[0] * ow - iw) > 1e-3 or abs(sc[1] * oh - ih) > 1e-3):
        out.append(f"scale factor {sc.tolist()} does not map ori {oh}x{ow} to img {ih}x{iw}")
    return out


def suspect_rows(geo: Geometry, table: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Indices of the rows for which :func:`problems` may be non-empty (the same conditions,
    column-wise; a superset is allowed, a miss is not)."""
    if not len(table):
        return np.zeros(0, np.int64)
    col = {k: table[:, F[k]] for k in ("img_h", "img_w", "pad_h", "pad_w", "ori_h", "ori_w",
                                        "variant", "flip")}
    ih, iw, ph, pw, oh, ow = (col[k] for k in ("img_h", "img_w", "pad_h", "pad_w", "ori_h", "ori_w"))
    div = int(geo.pad_divisor) or 1
    bad = (oh < 1) | (ow < 1) | (ih < 1) | (iw < 1)
    bad |= (ih > ph) | (iw > pw) | (ph % div != 0) | (pw % div != 0) | (ph - ih >= div) | (pw - iw >= div)
    v = col["variant"]
    views = np.zeros(len(table), dtype=bool)
    for k, var in enumerate(geo.variants):
        rows = v == k
        if var.get("view"):  # a view's shape follows its draws, not a variant's scale and flip
            views |= rows
            continue
        bad |= rows & ((col["flip"] != 0) != bool(var.get("flip")))
        si = var.get("scale_idx", -1)
        if 0 <= si < len(geo.input_scales):
            target = geo.input_scales[si]
            bad |= rows & ((np.maximum(ih, iw) > max(target)) | (np.minimum(ih, iw) > min(target)))
    finite = np.isfinite(scale).all(axis=1) & (scale > 0).all(axis=1)
    with np.errstate(invalid="ignore", over="ignore"):
        maps = (np.abs(scale[:, 0] * ow - iw) > 1e-3) | (np.abs(scale[:, 1] * oh - ih) > 1e-3)
    bad |= ~finite | ((oh >= 1) & (ow >= 1) & maps & ~views)
    return np.nonzero(bad)[0]
