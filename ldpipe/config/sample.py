"""What a stored sample is made of, below both the data set that makes samples and the cache
that stores them (``ldpipe.cache`` may not import ``ldpipe.data``): the sample numbering and a
sample's input geometry.  :class:`ldpipe.data.SampleMeta` carries a :class:`SampleGeometry`; the
cache stores one per sample and returns it with the sample's rows.  Shapes are ``(height,
width)`` in pixels.

Sample numbers: the cache and the dump address sample ``(image_index, variant_index)`` of
``num_variants`` variants as ``image_index * num_variants + variant_index``
(:func:`sample_number`, :func:`sample_pair`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass


def sample_number(image_index, variant_index, num_variants: int):
    """The sample number of ``(image_index, variant_index)``; ints or integer numpy arrays."""
    return image_index * num_variants + variant_index


def sample_pair(sample, num_variants: int):
    """``(image_index, variant_index)`` of a sample number (:func:`sample_number` inverted);
    ints or integer numpy arrays."""
    return sample // num_variants, sample % num_variants


@dataclass(frozen=True)
class SampleGeometry:
    """How a sample's network input was made from its image (what a cached row refers to)."""

    img_shape: tuple[int, int]  # (h, w) after the keep-ratio resize, before padding
    pad_shape: tuple[int, int]  # (h, w) of the input: img_shape padded to data.pad_divisor
    ori_shape: tuple[int, int]  # (h, w) of the decoded image
    flip: bool  # horizontally flipped after the resize
    scale_factor: tuple[float, float]  # (w, h) resize factors, img / ori

    FIELDS = ("img_shape", "pad_shape", "ori_shape", "flip", "scale_factor")

    def differences(self, other: "SampleGeometry", fields=FIELDS,
                    rel_tol: float = 1e-6) -> list[tuple[str, object, object]]:
        """``(field, ours, theirs)`` for each of ``fields`` that differs (scale factors: beyond
        ``rel_tol``, 0 = exactly); empty when the two describe the same input.  The one
        per-sample geometry check (the cache loader, ``cache show`` / ``diff`` / ``merge``)."""
        out = []
        for name in fields:
            a, b = getattr(self, name), getattr(other, name)
            if name == "scale_factor":
                same = len(a) == len(b) and all(math.isclose(x, y, rel_tol=rel_tol) for x, y in zip(a, b))
            elif name == "flip":
                same = bool(a) == bool(b)
            else:
                same = tuple(a) == tuple(b)
            if not same:
                out.append((name, a, b))
        return out


__all__ = ["SampleGeometry", "sample_number", "sample_pair"]
