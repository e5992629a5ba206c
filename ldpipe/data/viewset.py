"""A data set of views: ``dataset[(image_index, slot)]`` composes that image's view ``slot``.

:class:`ViewTable` says which view a ``(image, slot)`` is: drawn from the seed when asked
(``ldpipe train`` with ``[[data.augment]]``: slot = epoch, a fresh view per image per epoch) or
read from stored records (a teacher cache's views, ``ldpipe.distill``).  Its ``schedule``
says how a training epoch picks slots: ``"epochs"`` - slot = the epoch (SRe2L's one view per
image per epoch), ``"pool"`` - a slot drawn per image and epoch from the ``count`` views
(FKD's pool; :class:`~ldpipe.data.dataset.VariantSampler` draws it).
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ldpipe.config import AugmentStep, DataConfig
from ldpipe.data.dataset import DetectionDataset
from ldpipe.data.decode import UndecodableImage
from ldpipe.data.meta import SampleMeta
from ldpipe.data.records import Record, Split
from ldpipe.data.views import View, compose, draw_view, view_rng

log = logging.getLogger("ldpipe.data")

SCHEDULES = ("pool", "epochs")
STREAMS = {"pool": 1, "epochs": 0}  # each schedule its own random stream


@dataclass(frozen=True)
class ViewTable:
    """Which view each ``(image, slot)`` is.  ``count`` slots per image (0: unbounded, drawn
    as asked); ``stored`` - the views as records, image-major (``stored[image * count + slot]``),
    or empty: drawn from ``(seed, image, slot)``."""

    steps: tuple[AugmentStep, ...]
    schedule: str  # "pool" | "epochs"
    seed: int
    count: int = 0
    stored: tuple[dict, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"view schedule must be {'|'.join(SCHEDULES)}, got {self.schedule!r}")

    @property
    def by_epoch(self) -> bool:
        return self.schedule == "epochs"

    def view(self, records: Sequence[Record], image: int, slot: int) -> View:
        if self.count and not 0 <= slot < self.count:
            raise IndexError(f"view slot {slot} of image {image}: the table holds {self.count}")
        if self.stored:
            return View.from_dict(self.stored[image * self.count + slot])
        return draw_view(self.steps, records, image, view_rng(self.seed, image, slot, STREAMS[self.schedule]))

    def draw_all(self, records: Sequence[Record]) -> list[View]:
        """Every view of the table, image-major (``count`` must be set)."""
        if not self.count:
            raise ValueError("an unbounded view table cannot be listed")
        return [self.view(records, i, k) for i in range(len(records)) for k in range(self.count)]


def view_key(slot: int) -> str:
    """A view sample's variant key: ``v0``, ``v1``, ..."""
    return f"v{slot}"


class ViewDataset(DetectionDataset):
    """``dataset[(image_index, slot)]`` -> :func:`~ldpipe.data.views.compose` of that view.

    As :class:`DetectionDataset` otherwise: ``extra(meta)`` adds keys, an undecodable source
    image (the main one or a mixing partner) is an error or, with ``skip_undecodable``, the
    item ``{"skipped": file_name}``."""

    def __init__(self, split: Split, data: DataConfig, table: ViewTable,
                 extra: Callable[[SampleMeta], dict] | None = None,
                 skip_undecodable: bool | None = None) -> None:
        super().__init__(split, data, [None], extra, skip_undecodable)
        self.table = table

    def __getitem__(self, key) -> dict:
        index, slot = (key, 0) if isinstance(key, int) else key
        view = self.table.view(self.split.records, index, slot)
        try:
            sample = compose(view, self.split.records, self.data)
        except UndecodableImage as exc:
            if not self.skip_undecodable:
                raise
            name = self.split.records[index].file_name
            log.warning("skipping a view of %s (data.skip_undecodable_images): %s", name, exc)
            return {"skipped": name}
        sample["meta"] = dataclasses.replace(sample["meta"], variant=view_key(slot)).at(index, slot)
        if self.extra is not None:
            sample.update(self.extra(sample["meta"]))
        return sample


__all__ = ["SCHEDULES", "ViewDataset", "ViewTable", "view_key"]
