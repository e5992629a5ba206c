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

import torch

from ..config import REGION_POLICIES, AssignerConfig, Pipeline
from ..models.anchors import grid_tensors, make_grid
from ..models.assigner import atss_assign, overlap_mask, vlr_weights

# caches made before the VLR definition was a setting computed true DIoU
LEGACY_VLR_REGION = "diou"

# the models (by name) that read a cache, per assigner setting, in first-reader order
Readers = dict[AssignerConfig, list[str]]


def manifest_entries(readers: Readers) -> list[dict]:
    """The manifest's ``region.assigners`` JSON: one entry per setting (the only place it is
    written; :func:`entry_setting` is the only place it is read)."""
    return [{"topk": a.topk, "ignore_iof_thr": a.ignore_iof_thr, "vlr_region": a.vlr_region,
             "models": list(models)} for a, models in readers.items()]


def entry_setting(entry: dict) -> AssignerConfig:
    """The assigner setting of one ``region.assigners`` entry (``vlr_region`` absent: a cache
    from before it was a setting, made with :data:`LEGACY_VLR_REGION`)."""
    return AssignerConfig(topk=entry["topk"], ignore_iof_thr=entry["ignore_iof_thr"],
                          vlr_region=entry.get("vlr_region", LEGACY_VLR_REGION))


def reader_settings(pipe: Pipeline, model_name: str) -> Readers:
    """Assigner settings of the models that will read a cache of ``model_name`` (``cache.readers``;
    default: every other model of the pipeline, or the teacher itself for Self-LD)."""
    names = list(pipe.cache.readers) or [n for n in pipe.models if n != model_name] or [model_name]
    readers: Readers = {}
    for n in names:
        readers.setdefault(pipe.model(n).assigner, []).append(n)
    return readers


def reader_assigners(pipe: Pipeline, model_name: str) -> list[dict]:
    """:func:`reader_settings` as the manifest records them (:func:`manifest_entries`)."""
    return manifest_entries(reader_settings(pipe, model_name))


def own_assigner_note(pipe: Pipeline, model_name: str, readers: Readers) -> str | None:
    """A warning when the dumped model's own assigner setting is one that no reader uses.

    The ``main`` / ``ld`` region is computed for the models that read the cache
    (:func:`reader_settings`), so ``-o models.teacher.assigner.vlr_region=diou`` alone changes
    nothing in a dump; this says so, naming the readers' settings.  ``None`` when the setting
    is among the readers' or the policy does not depend on it."""
    if pipe.cache.region not in ("main", "ld"):
        return None
    own = pipe.model(model_name).assigner
    if own in readers:
        return None
    named = "; ".join(f"{', '.join(models)}: vlr_region={s.vlr_region}, topk={s.topk}, "
                      f"ignore_iof_thr={s.ignore_iof_thr}" for s, models in readers.items())
    return (f"models.{model_name}.assigner (vlr_region={own.vlr_region}, topk={own.topk}, "
            f"ignore_iof_thr={own.ignore_iof_thr}) does not shape this cache: its "
            f"'{pipe.cache.region}' region is computed for the models that read it ({named}); "
            "set their assigner (models.NAME.assigner.*) or cache.readers to change it")


def region_index(policy: str, gt: torch.Tensor, ignore: torch.Tensor | None,
                 pad_shape: tuple[int, int], strides, anchor_scale: float,
                 assigners: list[AssignerConfig]) -> torch.Tensor:
    """Sorted own-grid flat indices (int64) of the anchors to store for one sample
    (``assigners``: the settings of ``main`` / ``ld``; none given: the default setting)."""
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
    for spec in assigners or [AssignerConfig()]:
        res = atss_assign(anchors, grid.num_level_anchors, gt, ignore, spec.topk, spec.ignore_iof_thr)
        keep |= res.gt_index > 0
        if policy == "ld":
            keep |= vlr_weights(anchors, gt, res.thr, overlaps=res.overlaps,
                                region=spec.vlr_region) > 0
    return torch.nonzero(keep).squeeze(1)
