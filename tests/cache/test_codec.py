"""The codecs of the teacher cache (``ldpipe.cache.codec``) on their own: one codec object per
name and its stored form, the fp32 / fp16 / int8 bounds on sharp distributions, and int8's
rounding by hand.  Codecs on a dumped cache (a trained teacher, sharpened teachers, the int8
box step, verify's row check) are in ``test_cache.py``; the bytes of each codec's stored
objects in ``test_format_golden.py``.

The int8 tests are hand-computed guards of issue 12 ("tests first"): each was written to fail
on a plausible bug that the rest of the suite let through (named in its docstring).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import ld_kl
from ldpipe.cache import codec as C
from ldpipe.config import CODECS


def test_one_codec_object_per_name():
    assert [C.codec_for(n).name for n in CODECS] == list(CODECS)
    with pytest.raises(ValueError, match="unknown codec 'int4'"):
        C.codec_for("int4")
    assert [C.codec_for(n).legacy_clip for n in CODECS] == [None, 60000.0, 40.0]
    lp = torch.log_softmax(torch.randn(5, 4, 17) * 4, dim=-1)
    for name in CODECS:
        codec = C.codec_for(name)
        stored = codec.pack(codec.encode(lp, 0.125))
        assert stored.dtype == codec.dtype and stored.shape[-1] == 17 + codec.trailer
        dec = codec.unpack(stored)
        assert torch.equal(codec.decode_packed(torch.from_numpy(stored)), dec)  # bit for bit
        values = stored[..., :stored.shape[-1] - codec.trailer]
        assert torch.equal(C.decode(values, codec.stored_scale(stored), name), dec)  # the by-name form
        assert (codec.stored_scale(stored) is None) == (codec.trailer == 0)


def test_codecs_on_sharp_distributions():
    """The codec bounds hold beyond a near-uniform random teacher."""
    gen = torch.Generator().manual_seed(1)
    lp = C.log_probs(torch.randn(2000, 4, 17, generator=gen) * 8.0)
    assert torch.equal(C.decode(*_enc(lp, "fp32"), "fp32"), lp)
    fp16 = C.decode(*_enc(lp, "fp16"), "fp16")
    assert ((fp16 - lp).abs() <= lp.abs().clamp(min=1.0) * 2 ** -11).all()
    int8 = C.decode(*_enc(lp, "int8"), "int8")
    student = torch.randn(lp.shape, generator=gen) * 3.0
    ref, got = ld_kl(lp.reshape(-1, 17), student.reshape(-1, 17)), ld_kl(int8.reshape(-1, 17),
                                                                            student.reshape(-1, 17))
    assert abs(got - ref) / ref <= 0.01, (ref, got)


def _enc(lp, codec):
    e = C.encode(lp, codec)
    return e.values, e.scale


def test_int8_error_is_at_most_half_a_step():
    """Kills: rounding replaced by floor (or truncation) in the int8 encoder.  Rounding to
    the nearest of 256 levels of the stored fp16 step ``s`` errs by at most ``s / 2``; the
    row minimum, clamped at 255 when the fp16 step rounded down, errs by at most
    ``255 * s * 2**-11 < s / 8``."""
    gen = torch.Generator().manual_seed(1)
    lp = C.log_probs(torch.randn(2000, 4, 17, generator=gen) * 8.0)
    enc = C.encode(lp, "int8")
    assert enc.values.dtype == np.uint8 and enc.scale.dtype == np.float16
    dec = C.decode(enc.values, enc.scale, "int8")
    step = torch.from_numpy(enc.scale).float()[..., None]
    x = lp.clamp(min=-C.CLIP)
    err = (dec - x).abs()
    assert (err <= step / 2 * (1 + 1e-5) + 1e-7).all(), float((err / step).max())
    # the step is the row's range over 255 (to fp16 precision); every row uses level 255
    want = (-x.min(dim=-1).values / 255.0)[..., None]
    assert ((step - want).abs() <= want * 2 ** -10).all()
    assert (torch.from_numpy(enc.values).amax(dim=-1) == 255).all()
    # the LD loss against a student far from the teacher moves by ~5e-4 relative (floor: 3e-3)
    student = torch.randn(lp.shape, generator=gen) * 3.0
    ref = ld_kl(lp.reshape(-1, 17), student.reshape(-1, 17))
    got = ld_kl(dec.reshape(-1, 17), student.reshape(-1, 17))
    assert abs(got - ref) / ref <= 1e-3, (ref, got)


def test_int8_known_values():
    """A row with minimum -2.55 has step 0.01 (fp16-rounded); values round to the nearest level."""
    lp = torch.tensor([[0.0, -0.004, -0.006, -1.0049, -2.55]])
    enc = C.encode(lp, "int8")
    s = float(np.float16(2.55 / 255))
    assert float(enc.scale[0]) == s
    assert enc.values[0].tolist() == [0, round(0.004 / s), round(0.006 / s), round(1.0049 / s), 255]
    assert enc.values[0].tolist()[:3] == [0, 0, 1]


# ---------------------------------------------------------------------- stored-row paths, directly
def _rows(k: int = 17, n: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(n, 4, k, generator=g) * 3, dim=-1)


@pytest.mark.parametrize("name", ["fp32", "fp16", "int8"])
def test_stored_rows_pack_unpack_and_decode_packed_agree(name):
    """pack -> unpack equals decode of the encoded values; decode_packed (torch, on the
    tensor's device) equals unpack bit for bit; the stored row has K values + the trailer."""
    codec = C.codec_for(name)
    lp = _rows()
    enc = codec.encode(lp, min_step=0.125 if name == "int8" else 0.0)
    raw = codec.pack(enc)
    assert raw.dtype == codec.dtype and raw.shape == (6, 4, 17 + codec.trailer)
    direct = codec.decode(enc.values, enc.scale)
    assert torch.equal(codec.unpack(raw), direct)
    assert torch.equal(codec.decode_packed(torch.from_numpy(raw)), direct)
    assert torch.equal(C.decode_packed(torch.from_numpy(raw), name), direct)
    assert (direct - lp).abs().max() <= {"fp32": 0.0, "fp16": 2e-2, "int8": 0.0626}[name]
    scale = codec.stored_scale(raw)
    if name == "int8":
        assert scale.dtype == np.float16 and np.array_equal(scale, enc.scale)
        assert float(scale.min()) >= 0.125  # the common 1/8-nat grid where the range allows
        assert float((torch.from_numpy(raw[..., :17].astype(np.float32)) * -torch.from_numpy(
            scale.astype(np.float32))[..., None] - direct).abs().max()) == 0.0
    else:
        assert scale is None


def test_int8_decode_packed_refuses_rows_that_are_not_stored_int8():
    codec = C.codec_for("int8")
    with pytest.raises(ValueError, match="uint8 with two trailing scale bytes"):
        codec.decode_packed(torch.zeros(3, 19, dtype=torch.float32))
    with pytest.raises(ValueError, match="uint8"):
        codec.decode_packed(torch.zeros(3, 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="need their scales"):
        codec.decode(np.zeros((2, 17), np.uint8), None)


def test_int8_scale_is_the_row_range_over_255_and_rows_clip():
    codec = C.codec_for("int8")
    lp = torch.tensor([[0.0, -1.0, -25.5], [0.0, -1000.0, -2.0]])
    enc = codec.encode(lp)
    assert enc.scale[0] == np.float16(25.5 / 255) and enc.values[0, 2] == 255 and enc.values[0, 0] == 0
    assert float(codec.decode(enc.values, enc.scale)[1].min()) == pytest.approx(-codec.clip, rel=2e-3)
    fp16 = C.codec_for("fp16")
    assert float(fp16.encode(torch.tensor([[0.0, -1e6]])).values.min()) == -fp16.clip  # not -inf
    assert float(fp16.encode(lp).values.min()) == -1000.0
