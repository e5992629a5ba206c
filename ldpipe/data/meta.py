"""What one sample is: its identity and input geometry, typed (made by :func:`make_sample`).

A :class:`SampleMeta` travels data set -> collate (``batch["metas"]``) -> training / eval /
dump; the cache stores its :class:`~ldpipe.config.sample.SampleGeometry` per sample
(``ldpipe.cache.store``'s table columns) and the loader compares what the cache recorded with
what the student's pipeline made (:meth:`SampleGeometry.differences`).  Shapes are
``(height, width)`` in pixels.  The geometry type and the sample numbering live in
:mod:`ldpipe.config.sample`, below the cache, which may not import this package.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ldpipe.config.sample import SampleGeometry, sample_number, sample_pair


@dataclass(frozen=True)
class SampleMeta:
    """One (image, variant) sample: who it is and its :class:`SampleGeometry`.

    ``index`` / ``variant_index`` are -1 until the data set sets them (:meth:`at`)."""

    image_id: int  # the annotation's image id
    file_name: str  # the image file
    variant: str  # the variant's key: "s0n", "s0f", ..., "test"
    ori_shape: tuple[int, int]  # (h, w) of the decoded image, pixels
    img_shape: tuple[int, int]  # (h, w) after the keep-ratio resize
    pad_shape: tuple[int, int]  # (h, w) of the network input (padded to data.pad_divisor)
    scale_factor: tuple[float, float]  # (w, h) resize factors, img / ori
    flip: bool  # horizontally flipped after the resize
    index: int = -1  # the image's index in its split
    variant_index: int = -1  # the variant's index in the data set's variant list

    @property
    def geometry(self) -> SampleGeometry:
        return SampleGeometry(tuple(self.img_shape), tuple(self.pad_shape), tuple(self.ori_shape),
                              bool(self.flip), tuple(self.scale_factor))

    def at(self, index: int, variant_index: int) -> "SampleMeta":
        """This meta with its data set position set."""
        return dataclasses.replace(self, index=int(index), variant_index=int(variant_index))

    def label(self) -> str:
        """``image_id=7 (path/7.jpg) variant s0n`` for error messages."""
        return f"image_id={self.image_id} ({self.file_name}) variant {self.variant}"


__all__ = ["SampleGeometry", "SampleMeta", "sample_number", "sample_pair"]
