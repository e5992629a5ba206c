"""The row-value check of ``ldpipe cache verify``: a unit's stored box / class rows decode to
finite normalised log-probabilities within their codec's tolerance."""
from __future__ import annotations

import numpy as np
import torch

from .codec import codec_for
from .manifest import F, Manifest
from .store import from_disk

# |logsumexp(row)| allowed for decoded log-probabilities: the codec's ``norm_tol``, plus, for a
# codec with per-row scales (int8, which rounds every value by at most half its row's step and so
# moves logsumexp by at most that much), 0.51 x the row's stored scale


def row_problem(m: Manifest, un: str, name: str, arr: np.ndarray, want_shape: tuple,
                table: np.ndarray, rows: int, rows_ok: bool) -> str | None:
    """What is wrong with the stored ``box`` / ``cls`` array ``arr`` of a unit (``un``: its
    store path), or None: its shape and dtype, and that its decoded rows are finite normalised
    log-probabilities (raw class logits, ``cls_values = "logits"``: finite) within the codec's
    tolerance; the first bad row is named with its sample when the row ranges are sound."""
    coder = codec_for(m.codec)
    want_dtype = coder.dtype
    if arr.shape != want_shape or arr.dtype != want_dtype:
        return f"{un}: shape {arr.shape} dtype {arr.dtype}, expected {want_shape} {want_dtype}"
    if not rows:
        return None
    rows_first = from_disk(name, arr)
    dec = coder.unpack(rows_first)
    finite = torch.isfinite(dec).reshape(dec.shape[0], -1).all(dim=1)
    lse = torch.logsumexp(dec.double(), dim=-1).abs()
    if name == "cls" and m.cls_values == "logits":  # raw logits: finite, not normalised
        lse = torch.zeros_like(lse)
    tol = torch.full_like(lse, coder.norm_tol)
    step = coder.stored_scale(rows_first)
    if step is not None:
        tol = tol + 0.51 * torch.from_numpy(step.astype(np.float64))
    excess = (lse - tol).reshape(dec.shape[0], -1).amax(dim=1)
    lse = lse.reshape(dec.shape[0], -1).amax(dim=1)
    bad_rows = torch.nonzero(~finite | (excess > 0)).squeeze(1)
    if bad_rows.numel() and rows_ok:
        r = int(bad_rows[0])
        starts, counts = table[:, F["row_start"]], table[:, F["row_count"]]
        i = int(np.searchsorted(starts + counts, r, side="right"))
        rec = table[min(i, table.shape[0] - 1)]
        return (f"{un}: {bad_rows.numel()} rows are not finite normalised "
                f"log-probabilities (first: row {r}, {m.sample_label(rec)}; "
                f"|logsumexp| {float(lse[r]):.3g})")
    return None
