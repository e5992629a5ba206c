"""The cached teacher: targets from a ``dump-teacher`` cache; the teacher is never built.

Each sample's rows are read in the loader workers (:class:`~ldpipe.distill.loader.CacheTargets`)
and travel with the batch as ``batch["teacher"]``; :meth:`CachedTeacher.prepare` maps the
batch-flat anchors onto those rows once per step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache import CacheError, CacheReader
from ..cache.codec import decode_packed
from ..cache.compat import CLS_TERMS, CROSSKD_TERMS, check_compatible
from ..cache.store import open_root, read_head_part
from ..cache.upscale import served_strides
from ..cache.views import epochs_problem, read_views
from ..config import Pipeline, enabled_terms
from ..data import Variant
from ..data.viewset import ViewTable
from ..models import BatchTargets, HeadPart
from ..models.anchors import level_sizes
from .crosskd import combine_moments
from .loader import CacheTargets
from .sources import TargetSource, TeacherBatch, TeacherRows


class CachedTeacher(TargetSource):
    """Teacher targets from the cache at ``cache_url``, for the LD terms ``pipe`` enables."""

    def __init__(self, pipe: Pipeline, cache_url: str) -> None:
        self.url = cache_url
        self.terms = enabled_terms(pipe)
        self.reader = CacheReader(cache_url)
        self.manifest = self.reader.manifest
        part = self.manifest.head_part
        self.reuse_idx = part["idx"] if part and self.terms & CROSSKD_TERMS else None
        self._part: HeadPart | None = None

    def head_part(self, device: torch.device) -> HeadPart:
        """The teacher's head part stored in the cache (checked against the manifest's sha256)."""
        if self._part is None:
            m, e = self.manifest, self.manifest.head_part
            part = HeadPart(m.geometry.num_classes, e["channels"], e["stacked_convs"], e["idx"],
                            m.geometry.reg_max, e["levels"], e["norm_groups"])
            part.load_state_dict(read_head_part(open_root(self.url), self.url, e["sha256"]))
            self._part = part.to(device).frozen()
        return self._part

    def sample_extra(self, device: torch.device) -> CacheTargets:
        # a GPU step gets the rows as stored (8 bits a value for int8: a quarter of the bytes
        # through the workers' shared memory and the copy) and decodes them on the device;
        # a CPU step gets them decoded by the workers (numpy, one thread each), which is
        # cheaper there than decoding in the training process (docs/benchmarks.md, "Reading")
        return CacheTargets(self.url, with_cls=bool(self.terms & CLS_TERMS), decode=device.type != "cuda")

    def variants(self, pipe: Pipeline) -> list[Variant]:
        if self.manifest.views is not None:  # a view cache: its samples are views (views())
            return []
        return [Variant(v["scale_idx"], v["flip"]) for v in self.manifest.geometry.variants]

    def views(self, pipe: Pipeline) -> ViewTable | None:
        """A view cache's stored views (each sample's record), as the loader's table."""
        m = self.manifest
        if m.views is None:
            return None
        records = read_views(open_root(self.url), self.url, m)
        return ViewTable(tuple(pipe.data.augment), m.views["schedule"], int(m.views["seed"]),
                         int(m.views["count"]), stored=tuple(records))

    def check(self, pipe: Pipeline, model_name: str, split) -> None:
        check_compatible(self.manifest, self.url, self.reader.table.shape[0], pipe.model(model_name),
                         pipe.data, model_name, split, self.terms)
        problem = epochs_problem(self.manifest, pipe.train_for(model_name).epochs, model_name)
        if problem:
            raise CacheError(f"cache {self.url} cannot train model {model_name!r}: {problem}")

    def lineage(self) -> dict:
        return self.manifest.lineage_entry(self.url)

    def prepare(self, batch: dict, bt: BatchTargets, device: torch.device) -> "CachedBatch":
        """Row of the batch's cached teacher targets for each batch-flat anchor (-1: not cached)."""
        n_total = bt.labels.shape[0]
        rows = torch.full((n_total,), -1, dtype=torch.long, device=device)
        boxes, classes, offset = [], [], 0
        for b, t in enumerate(batch["teacher"]):
            anchors = t["anchor"].to(device)
            n = anchors.shape[0]
            rows[bt.own_to_batch[b][anchors]] = torch.arange(offset, offset + n, device=device)
            boxes.append(_rows(t, "box", device))
            if t["cls"] is not None:
                classes.append(_rows(t, "cls", device))
            offset += n
        box = torch.cat(boxes) if boxes else torch.zeros(0, 4, 1, device=device)
        cls = torch.cat(classes) if classes else None
        out = CachedBatch(rows, box, cls, self.url, self.manifest.region.policy, batch["metas"])
        if self.manifest.teacher_upscale:
            out.strides = served_strides(self.manifest)
        if self.reuse_idx is not None:
            out.head_stats = self._batch_stats(batch, device)
        return out

    def _batch_stats(self, batch: dict, device: torch.device) -> torch.Tensor:
        """``[L, 2, 2, C]`` the teacher's mean / std over this batch, from the samples' moments."""
        moments = [t.get("featstats") for t in batch["teacher"]]
        if any(m is None for m in moments):
            meta = batch["metas"][[m is None for m in moments].index(True)]
            raise CacheError(f"{self.url}: sample {meta.label()} has no CrossKD feature statistics")
        mom = torch.stack(moments).to(device)  # [B, L, 2, 2, C]
        strides = self.manifest.geometry.strides
        counts = torch.tensor([[h * w for h, w in level_sizes(tuple(m.geometry.pad_shape), list(strides))]
                               for m in batch["metas"]], dtype=torch.float64, device=device)  # [B, L]
        return torch.stack([torch.stack([combine_moments(mom[:, lv, br], counts[:, lv]) for br in (0, 1)])
                            for lv in range(mom.shape[1])])


@dataclass
class CachedBatch(TeacherBatch):
    """A batch's cached rows and, per batch-flat anchor, the row holding it (-1: not stored)."""

    rows: torch.Tensor  # [B*N] int64
    box: torch.Tensor  # [R, 4, reg_max + 1]
    cls: torch.Tensor | None  # [R, C]
    url: str
    policy: str
    metas: list

    def at(self, flat: torch.Tensor, need_cls: bool = True) -> TeacherRows:
        r = self.rows[flat]
        if (r < 0).any():
            bad = flat[r < 0][0]
            meta = self.metas[int(bad // (self.rows.shape[0] // len(self.metas)))]
            raise CacheError(
                f"{self.url}: sample image_id={meta.image_id} variant {meta.variant} lacks "
                f"{int((r < 0).sum())} anchors the losses need (region policy "
                f"{self.policy!r} does not cover them)")
        return TeacherRows(self.box[r], self.cls[r] if (need_cls and self.cls is not None) else None)


def _rows(t: dict, name: str, device: torch.device) -> torch.Tensor:
    """A sample's cached rows on ``device``, decoded there when they came as stored."""
    x = t[name].to(device, non_blocking=True)
    return decode_packed(x, t["codec"]) if "codec" in t else x
