"""Loader side of distillation: fetch each sample's cached teacher targets.

``CacheTargets`` is handed to the data set as its ``extra`` hook, so the
targets are read in the DataLoader workers (each opens the cache lazily; only
the per-sample index is held in memory, never the whole cache) and travel with
the image in the batch.  The sample's geometry is checked against what the
cache recorded: the student's pixels may be normalised differently, but its
resize, flip and padding must be the teacher's.
"""
from __future__ import annotations

import math

from ..cache import CacheError, CacheReader


class CacheTargets:
    """``decode=False``: the rows travel as stored (``codec`` names them) and the training
    step decodes them on its device (``ldpipe.cache.codec.decode_packed``)."""

    def __init__(self, url: str, with_cls: bool = True, decode: bool = True) -> None:
        self.reader = CacheReader(url)
        self.with_cls, self.decode = with_cls, decode

    def __call__(self, meta: dict) -> dict:
        index, variant = meta["index"], meta["variant_index"]
        got = self.reader.read(index, variant, with_cls=self.with_cls, decode=self.decode)
        geo = got.pop("geometry")
        for key in ("img_shape", "pad_shape", "ori_shape"):
            if tuple(geo[key]) != tuple(meta[key]):
                raise CacheError(self._where(meta) + f": {key} is {tuple(meta[key])} here but "
                                 f"{tuple(geo[key])} in the cache: the teacher saw other geometry")
        if bool(geo["flip"]) != bool(meta["flip"]):
            raise CacheError(self._where(meta) + ": flip differs from the cached variant")
        if not all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(geo["scale_factor"], meta["scale_factor"])):
            raise CacheError(self._where(meta) + f": scale factor {meta['scale_factor']} here but "
                             f"{geo['scale_factor']} in the cache")
        return {"teacher": got}

    def _where(self, meta: dict) -> str:
        return (f"{self.reader.url}: sample image_id={meta['image_id']} ({meta.get('file_name')}) "
                f"variant {meta['variant']}")
