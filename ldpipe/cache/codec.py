"""Value codecs for cached teacher logits.

The cache stores ``log_softmax`` of the teacher's logits (per box edge over the
reg_max+1 bins; per anchor over the classes).  A temperature KL only sees
``softmax(x / T)``, which is unchanged by adding a constant to ``x``, so this
loses nothing the LD losses read, and it bounds the values to ``(-inf, 0]``.

* ``fp32`` - exact.
* ``fp16`` - half precision (values clipped at -60000).
* ``int8`` - 8 bits per value plus one float16 scale per row (per box edge;
  per anchor for classes): ``x ~= -q * scale`` with ``q`` in 0..255 and
  ``scale = max(-min(row) / 255, min_step)`` after clipping rows at ``-CLIP``.

``min_step`` (``cache.int8_box_step`` for box rows, recorded as the manifest's
``codec_step``; 0 for class rows): with a common step, the rows of neighbouring anchors
share one grid, so the delta filter along the rows leaves small differences and the
compressor stores a trained teacher's box rows in ~27% fewer bytes at 1/8 nat
(docs/benchmarks.md).  A row deeper than ``255 * min_step`` keeps its own, coarser step.
At T = 10 a step of 1/8 nat moves a value by at most 1/16 nat, i.e. a bin's weight in
``softmax(x / T)`` by at most 0.6%.  Decoding is the same for every step.

A temperature KL reads ``softmax(x / T)``: a value clipped at ``-CLIP`` still weighs
``exp(-CLIP / T)`` of the row's peak.  ``CLIP = 250`` keeps that below 1.4e-11 at the LD
temperature (T = 10) and 4e-6 at T = 20, so a converged (sharp) teacher's deep tails are
not distorted; rows shallower than that are quantised over their own range, so the step is
no coarser than before for them.  (Caches written with the old ``CLIP = 40`` carry no
``codec_clip`` in their manifest; at T = 10 a value clipped there kept exp(-4) = 1.8% of the
peak's weight, which changed the LD loss of sharp teachers by up to tens of percent.)
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..config import CODECS, INT8_BOX_STEP

CLIP = 250.0
FP16_CLIP = 60000.0
LEGACY_CLIP = {"fp32": None, "fp16": FP16_CLIP, "int8": 40.0}  # caches without codec_clip
BOX_STEP = INT8_BOX_STEP  # default cache.int8_box_step (nats); caches without codec_step used 0


@dataclass
class Encoded:
    values: np.ndarray  # float32 / float16 / uint8, shape [..., K]
    scale: np.ndarray | None  # float16 [...] for int8, else None


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise ``log_softmax`` over the last axis in float32."""
    return F.log_softmax(logits.float(), dim=-1)


def encode(lp: torch.Tensor | np.ndarray, codec: str, min_step: float = 0.0) -> Encoded:
    """Encode log-probabilities ``[..., K]`` (the last axis is one distribution).

    ``min_step``: int8 only, the smallest quantisation step in nats (0: each row over its
    own range)."""
    x = torch.as_tensor(lp, dtype=torch.float32)
    if codec == "fp32":
        return Encoded(x.numpy().astype(np.float32, copy=False), None)
    if codec == "fp16":
        return Encoded(x.clamp(min=-FP16_CLIP).numpy().astype(np.float16), None)
    if codec == "int8":
        x = x.clamp(min=-CLIP)
        scale = ((-x.min(dim=-1).values).clamp(min=1e-6) / 255.0).clamp(min=float(min_step))
        scale16 = scale.to(torch.float16)
        # quantise against the scale that will be stored, so decode is consistent
        s = scale16.float().clamp(min=1e-8)
        q = torch.round(-x / s[..., None]).clamp(0, 255).to(torch.uint8)
        return Encoded(q.numpy(), scale16.numpy())
    raise ValueError(f"unknown codec {codec!r} (choose from {', '.join(CODECS)})")


def decode(values: np.ndarray, scale: np.ndarray | None, codec: str) -> torch.Tensor:
    """Back to float32 log-probabilities (up to a per-row constant for int8).

    In numpy, one thread: a sample's rows are too few for torch's intra-op threads, which
    cost more than they save there (in a 2-thread process, 3-4x the CPU of one thread).
    """
    if codec in ("fp32", "fp16"):
        return torch.from_numpy(np.asarray(values).astype(np.float32))  # always a fresh copy
    if codec == "int8":
        if scale is None:
            raise ValueError("int8 values need their scales")
        out = np.asarray(values).astype(np.float32)
        out *= -np.asarray(scale, dtype=np.float32)[..., None]
        return torch.from_numpy(out)
    raise ValueError(f"unknown codec {codec!r}")


def decode_packed(packed: torch.Tensor, codec: str) -> torch.Tensor:
    """:func:`decode` of stored rows as they leave the cache (``int8``: ``q`` followed by the
    row's float16 scale in its last two bytes, little-endian), in torch on the tensor's device.

    The training loader hands these 8-bit rows from its workers to the step, a quarter of the
    bytes of float32, and the step decodes them where it computes (on a GPU: after the copy).
    Bit for bit :func:`decode`: one float32 product per value, exactly rounded on every device.
    """
    if codec in ("fp32", "fp16"):
        return packed.float()
    if codec == "int8":
        if packed.dtype != torch.uint8 or packed.shape[-1] < 2:
            raise ValueError(f"int8 rows must be uint8 with two trailing scale bytes, got "
                             f"{packed.dtype} {tuple(packed.shape)}")
        k = packed.shape[-1] - 2
        raw = packed.new_empty((*packed.shape[:-1], 2)).copy_(packed[..., k:])  # own storage
        if sys.byteorder == "little":
            scale = raw.view(torch.float16).float()  # [..., 1]
        else:  # the stored scale is little-endian: let numpy read it
            scale = torch.from_numpy(raw.cpu().numpy().view("<f2").astype(np.float32)).to(packed.device)
        return packed[..., :k].float() * -scale
    raise ValueError(f"unknown codec {codec!r}")


def bytes_per_value(codec: str) -> int:
    return {"fp32": 4, "fp16": 2, "int8": 1}[codec]


def row_extra(codec: str) -> int:
    """Trailing bytes per stored row that hold the row's scale (int8: a float16)."""
    return 2 if codec == "int8" else 0


def clip_of(codec: str) -> float | None:
    """The most negative value the encoder keeps (``None``: no clipping)."""
    return {"fp32": None, "fp16": FP16_CLIP, "int8": CLIP}[codec]
