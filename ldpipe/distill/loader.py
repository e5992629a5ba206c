"""Loader side of distillation: fetch each sample's cached teacher targets.

``CacheTargets`` is handed to the data set as its ``extra`` hook, so the
targets are read in the DataLoader workers (each opens the cache lazily; only
the per-sample index is held in memory, never the whole cache) and travel with
the image in the batch.  The sample's geometry is checked against what the
cache recorded: the student's pixels may be normalised differently, but its
resize, flip and padding must be the teacher's.
"""
from __future__ import annotations

from ..cache import CacheError, CacheReader
from ..data.meta import SampleMeta


class CacheTargets:
    """``decode=False``: the rows travel as stored (``codec`` names them) and the training
    step decodes them on its device (``ldpipe.cache.codec.decode_packed``)."""

    def __init__(self, url: str, with_cls: bool = True, decode: bool = True) -> None:
        self.reader = CacheReader(url)
        self.with_cls, self.decode = with_cls, decode

    def __call__(self, meta: SampleMeta) -> dict:
        got = self.reader.read(meta.index, meta.variant_index, with_cls=self.with_cls, decode=self.decode)
        cached = got.pop("geometry")
        differ = meta.geometry.differences(cached)
        if differ:
            name, ours, theirs = differ[0]
            raise CacheError(f"{self.reader.url}: sample {meta.label()}: {name} is {ours} here but "
                             f"{theirs} in the cache: the teacher saw other geometry")
        return {"teacher": got}
