"""Region policies: which anchors of a sample the cache keeps.

All four are functions of the ground truth and the anchor grid alone, so the
dump decides them without the student:

* ``main``    - the ATSS positives (all that LD v1 reads).
* ``ld``      - ATSS positives and the valuable localization region (LD v2).
* ``overlap`` - anchors with IoU > 0 with some GT (assigner-agnostic).
* ``dense``   - every anchor.

``main`` and ``ld`` depend on the assigner; they are computed for every
assigner setting of the models that will read the cache (union), and the
manifest records those settings so a student with another one is refused.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import REGION_POLICIES, Pipeline
from ..models.anchors import grid_tensors, make_grid
from ..models.assigner import atss_assign, overlap_mask, vlr_weights

# caches made before the VLR definition was a setting computed true DIoU
LEGACY_VLR_REGION = "diou"


@dataclass(frozen=True)
class AssignerSpec:
    """The assigner settings a region is computed for (one entry of the manifest's
    ``region.assigners``)."""

    topk: int = 9
    ignore_iof_thr: float = -1.0
    vlr_region: str = "reference"

    @classmethod
    def of_entry(cls, entry: dict) -> "AssignerSpec":
        return cls(entry["topk"], entry["ignore_iof_thr"], entry.get("vlr_region", LEGACY_VLR_REGION))

    def entry(self, models: list[str]) -> dict:
        return {"topk": self.topk, "ignore_iof_thr": self.ignore_iof_thr,
                "vlr_region": self.vlr_region, "models": models}


def reader_assigners(pipe: Pipeline, model_name: str) -> list[dict]:
    """Assigner settings of the models that will read a cache of ``model_name`` (``cache.readers``;
    default: every other model of the pipeline, or the teacher itself for Self-LD)."""
    names = list(pipe.cache.readers) or [n for n in pipe.models if n != model_name] or [model_name]
    models: dict[AssignerSpec, list[str]] = {}
    for n in names:
        a = pipe.model(n).assigner
        models.setdefault(AssignerSpec(a.topk, a.ignore_iof_thr, a.vlr_region), []).append(n)
    return [spec.entry(readers) for spec, readers in models.items()]


def own_assigner_note(pipe: Pipeline, model_name: str, assigners: list[dict]) -> str | None:
    """A warning when the dumped model's own assigner setting is one that no reader uses.

    The ``main`` / ``ld`` region is computed for the models that read the cache
    (:func:`reader_assigners`), so ``-o models.teacher.assigner.vlr_region=diou`` alone changes
    nothing in a dump; this says so, naming the readers' settings.  ``None`` when the setting
    is among the readers' or the policy does not depend on it."""
    if pipe.cache.region not in ("main", "ld"):
        return None
    a = pipe.model(model_name).assigner
    own = AssignerSpec(a.topk, a.ignore_iof_thr, a.vlr_region)
    specs = [AssignerSpec.of_entry(e) for e in assigners]
    if own in specs:
        return None
    readers = "; ".join(f"{', '.join(e['models'])}: vlr_region={s.vlr_region}, topk={s.topk}, "
                        f"ignore_iof_thr={s.ignore_iof_thr}" for e, s in zip(assigners, specs))
    return (f"models.{model_name}.assigner (vlr_region={own.vlr_region}, topk={own.topk}, "
            f"ignore_iof_thr={own.ignore_iof_thr}) does not shape this cache: its "
            f"'{pipe.cache.region}' region is computed for the models that read it ({readers}); "
            "set their assigner (models.NAME.assigner.*) or cache.readers to change it")


def region_index(policy: str, gt: torch.Tensor, ignore: torch.Tensor | None,
                 pad_shape: tuple[int, int], strides, anchor_scale: float,
                 assigners: list[AssignerSpec]) -> torch.Tensor:
    """Sorted own-grid flat indices (int64) of the anchors to store for one sample."""
    if policy not in REGION_POLICIES:
        raise ValueError(f"unknown region policy {policy!r} (choose from {', '.join(REGION_POLICIES)})")
    grid = make_grid(pad_shape, strides, anchor_scale)
    anchors, _ = grid_tensors(grid)
    gt = gt.float().reshape(-1, 4)
    if policy == "dense":
        return torch.arange(anchors.shape[0], dtype=torch.long)
    if policy == "overlap":
        return torch.nonzero(overlap_mask(anchors, gt)).squeeze(1)
    keep = torch.zeros(anchors.shape[0], dtype=torch.bool)
    for spec in assigners or [AssignerSpec()]:
        res = atss_assign(anchors, grid.num_level_anchors, gt, ignore, spec.topk, spec.ignore_iof_thr)
        keep |= res.gt_index > 0
        if policy == "ld":
            keep |= vlr_weights(anchors, gt, res.thr, overlaps=res.overlaps,
                                region=spec.vlr_region) > 0
    return torch.nonzero(keep).squeeze(1)
