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
A step of 1/8 nat moves a value by at most half of it, 1/16 nat.  In ``softmax(x / T)`` a
bin's own term then changes by a factor within ``exp(+-1/16 / T)`` and the normaliser by as much
again the other way, so at T = 10 a bin's weight changes by at most ``exp(0.0125) - 1`` = 1.26%
(the bound is approached when a low-weight bin and all the others round in opposite
directions).  Measured (``tests/test_codec_bound.py``): 0.97% worst over 10^5 random 17-bin
rows, 1.19% for a row built to come near the bound; issue 23's independent check measured
0.99%.  Decoding is the same for every step.

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
LEGACY_INT8_CLIP = 40.0  # what int8 caches without ``codec_clip`` in their manifest clipped at
BOX_STEP = INT8_BOX_STEP  # default cache.int8_box_step (nats); caches without codec_step used 0


@dataclass
class Encoded:
    values: np.ndarray  # float32 / float16 / uint8, shape [..., K]
    scale: np.ndarray | None  # float16 [...] for int8, else None


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise ``log_softmax`` over the last axis in float32."""
    return F.log_softmax(logits.float(), dim=-1)


@dataclass(frozen=True)
class Codec:
    """Everything ldpipe knows about one value codec (one object per name: :func:`codec_for`).

    A stored row is ``K`` values of ``dtype`` followed by ``trailer`` bytes (int8: the row's
    float16 scale, little-endian); ``pack`` / ``unpack`` convert between :class:`Encoded` and
    that layout (numpy, rows ``[..., K + trailer]``), ``decode_packed`` decodes it in torch on
    the tensor's device, bit for bit ``unpack``."""

    name: str
    dtype: np.dtype  # the stored value type
    bytes_per_value: int
    trailer: int  # trailing bytes per stored row holding its scale (int8: one float16)
    clip: float | None  # the most negative value the encoder keeps (None: no clipping)
    legacy_clip: float | None  # the clip of caches whose manifest has no ``codec_clip``
    norm_tol: float  # |logsumexp(row)| ``cache verify`` allows for a decoded row

    # ------------------------------------------------------------ float codecs (fp32, fp16)
    def encode(self, lp: torch.Tensor | np.ndarray, min_step: float = 0.0) -> Encoded:
        """Encode log-probabilities ``[..., K]`` (the last axis is one distribution);
        ``min_step``: int8 only, the smallest quantisation step in nats."""
        x = torch.as_tensor(lp, dtype=torch.float32)
        if self.clip is not None:
            x = x.clamp(min=-self.clip)
        return Encoded(x.numpy().astype(self.dtype, copy=False), None)

    def decode(self, values: np.ndarray, scale: np.ndarray | None) -> torch.Tensor:
        """Back to float32 log-probabilities ``[..., K]`` (a fresh copy), in numpy: a sample's
        rows are too few for torch's intra-op threads, which cost more than they save there
        (in a 2-thread process, 3-4x the CPU of one thread)."""
        return torch.from_numpy(np.asarray(values).astype(np.float32))

    def pack(self, enc: Encoded) -> np.ndarray:
        """The stored rows ``[..., K + trailer]`` of encoded values."""
        return enc.values

    def stored_scale(self, raw: np.ndarray) -> np.ndarray | None:
        """The per-row scales ``[...]`` (float16) of stored rows (None: the codec has none)."""
        return None

    def unpack(self, raw: np.ndarray) -> torch.Tensor:
        """:meth:`decode` of stored rows ``[..., K + trailer]``."""
        return self.decode(raw, None)

    def decode_packed(self, packed: torch.Tensor) -> torch.Tensor:
        """:meth:`unpack` of stored rows as they leave the cache, in torch on their device."""
        return packed.float()


@dataclass(frozen=True)
class Int8Codec(Codec):
    """8 bits per value plus one float16 scale per row: ``x ~= -q * scale``."""

    def encode(self, lp: torch.Tensor | np.ndarray, min_step: float = 0.0) -> Encoded:
        x = torch.as_tensor(lp, dtype=torch.float32).clamp(min=-self.clip)
        scale = ((-x.min(dim=-1).values).clamp(min=1e-6) / 255.0).clamp(min=float(min_step))
        scale16 = scale.to(torch.float16)
        # quantise against the scale that will be stored, so decode is consistent
        s = scale16.float().clamp(min=1e-8)
        q = torch.round(-x / s[..., None]).clamp(0, 255).to(torch.uint8)
        return Encoded(q.numpy(), scale16.numpy())

    def decode(self, values: np.ndarray, scale: np.ndarray | None) -> torch.Tensor:
        if scale is None:
            raise ValueError("int8 values need their scales")
        out = np.asarray(values).astype(np.float32)
        out *= -np.asarray(scale, dtype=np.float32)[..., None]
        return torch.from_numpy(out)

    def pack(self, enc: Encoded) -> np.ndarray:
        scale_bytes = np.ascontiguousarray(enc.scale.astype("<f2")).view(np.uint8).reshape(*enc.scale.shape, 2)
        return np.concatenate([enc.values, scale_bytes], axis=-1)

    def stored_scale(self, raw: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(raw[..., -self.trailer:]).view("<f2")[..., 0]

    def unpack(self, raw: np.ndarray) -> torch.Tensor:
        return self.decode(raw[..., :-self.trailer], self.stored_scale(raw))

    def decode_packed(self, packed: torch.Tensor) -> torch.Tensor:
        """Bit for bit :meth:`unpack`: one float32 product per value, exactly rounded on
        every device."""
        if packed.dtype != torch.uint8 or packed.shape[-1] < self.trailer:
            raise ValueError(f"int8 rows must be uint8 with two trailing scale bytes, got "
                             f"{packed.dtype} {tuple(packed.shape)}")
        k = packed.shape[-1] - self.trailer
        raw = packed.new_empty((*packed.shape[:-1], self.trailer)).copy_(packed[..., k:])  # own storage
        if sys.byteorder == "little":
            scale = raw.view(torch.float16).float()  # [..., 1]
        else:  # the stored scale is little-endian: let numpy read it
            scale = torch.from_numpy(raw.cpu().numpy().view("<f2").astype(np.float32)).to(packed.device)
        return packed[..., :k].float() * -scale


# |logsumexp(row)| tolerances: fp16 keeps ~3 decimal digits; int8 rounds every value by at most
# half its row's step, which moves logsumexp by at most that much (``cache verify`` adds 0.51 x
# the row's stored scale to the int8 tolerance)
CODEC_TABLE: dict[str, Codec] = {
    "fp32": Codec("fp32", np.dtype("float32"), 4, 0, None, None, 1e-4),
    "fp16": Codec("fp16", np.dtype("float16"), 2, 0, FP16_CLIP, FP16_CLIP, 2e-2),
    "int8": Int8Codec("int8", np.dtype("uint8"), 1, 2, CLIP, LEGACY_INT8_CLIP, 1e-3),
}
assert tuple(CODEC_TABLE) == tuple(CODECS)  # the config's vocabulary, one object each


def codec_for(name: str) -> Codec:
    """The :class:`Codec` called ``name``; ``ValueError`` naming the choices otherwise."""
    try:
        return CODEC_TABLE[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown codec {name!r} (choose from {', '.join(CODECS)})") from None


# ---------------------------------------------------------------------- by name (thin wrappers)
def encode(lp: torch.Tensor | np.ndarray, codec: str, min_step: float = 0.0) -> Encoded:
    """:meth:`Codec.encode` of the codec called ``codec``."""
    return codec_for(codec).encode(lp, min_step)


def decode(values: np.ndarray, scale: np.ndarray | None, codec: str) -> torch.Tensor:
    """:meth:`Codec.decode` of the codec called ``codec``."""
    return codec_for(codec).decode(values, scale)


def decode_packed(packed: torch.Tensor, codec: str) -> torch.Tensor:
    """:meth:`Codec.decode_packed`: stored rows decoded in torch on the tensor's device.

    The training loader hands these 8-bit rows from its workers to the step, a quarter of the
    bytes of float32, and the step decodes them where it computes (on a GPU: after the copy);
    bit for bit :func:`decode`."""
    return codec_for(codec).decode_packed(packed)


def bytes_per_value(codec: str) -> int:
    return codec_for(codec).bytes_per_value


def row_extra(codec: str) -> int:
    """Trailing bytes per stored row that hold the row's scale (int8: a float16)."""
    return codec_for(codec).trailer


def clip_of(codec: str) -> float | None:
    """The most negative value the encoder keeps (``None``: no clipping)."""
    return codec_for(codec).clip
