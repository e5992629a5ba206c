"""``dump-teacher`` with ``[[data.augment]]``: the views it draws, stores and runs the teacher on.

:func:`dump_views` draws every view of the ``[cache.views]`` schedule before the teacher runs
(from the annotations: no image is decoded), as records; the dump then addresses sample
``image_index * count + slot`` as it addresses a fixed variant, its data set composes each
view from its record (:class:`~ldpipe.data.viewset.ViewDataset`), and the records go into the
cache beside the rows (``ldpipe.cache.views``), so the student rebuilds exactly the inputs the
teacher saw.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..cache import manifest as M
from ..cache.views import records_blob, views_entry
from ..config import Pipeline
from ..data.viewset import ViewDataset, ViewTable, view_key
from ..data.views import padded_view_shape


@dataclass(frozen=True)
class Slot:
    """A view slot where the manifest builder takes a variant (``key`` v0, v1, ...)."""

    key: str
    scale_idx: int = -1
    flip: bool = False


@dataclass(frozen=True)
class DumpViews:
    """The drawn views of a dump: the table (records stored in it) and their stored form."""

    table: ViewTable
    blob: bytes

    def slots(self) -> list[Slot]:
        return [Slot(view_key(k)) for k in range(self.table.count)]

    def mark(self, manifest: M.Manifest, pipe: Pipeline) -> None:
        """Make ``manifest`` the manifest of a view cache (format version 3, ``views`` entry)."""
        manifest.views = views_entry(pipe.cache.views, pipe.data, self.blob)
        manifest.format_version = M.VIEWS_FORMAT_VERSION
        manifest.geometry.variants = [{"key": s.key, "view": True} for s in self.slots()]
        manifest.cache_id = manifest.compute_id()

    def shapes(self, split, data) -> list[tuple[int, int]]:
        """Padded input shape of every sample, in sample order (no image decoded)."""
        recs = split.records
        return [padded_view_shape(self.table.view(recs, i, k), recs, data)
                for i in range(len(recs)) for k in range(self.table.count)]

    def dataset(self, split, data) -> ViewDataset:
        # a cache holds every sample: an undecodable image stops the dump, naming it
        return ViewDataset(split, data, self.table, skip_undecodable=False)


def dump_views(pipe: Pipeline, split) -> DumpViews | None:
    """The views of ``[cache.views]`` over ``split`` (None: the pipeline declares no augmentation)."""
    if not pipe.data.augment:
        return None
    vc = pipe.cache.views
    table = ViewTable(tuple(pipe.data.augment), vc.schedule, vc.seed, vc.count)
    records = tuple(v.to_dict() for v in table.draw_all(split.records))
    return DumpViews(dataclasses.replace(table, stored=records), records_blob(list(records)))


__all__ = ["DumpViews", "Slot", "dump_views"]
