"""``ldpipe cache show``: the picture of what LD transfers for one cached sample.

Left: the sample's input as the teacher saw it (the variant's resize and flip, or a view
cache's stored view composed from its record; padding included), its GT boxes (green), the chosen anchors (dotted squares) and the box the
teacher's distributions decode to at each of them (its expectation over the bins, the
way GFL decodes).  Right, one row per anchor: the teacher's four edge distributions
(left, top, right, bottom: ``softmax`` over the ``reg_max + 1`` bins of the cached
log-probabilities, in units of the anchor's stride) as bar charts, with the GT's
distance (the hard target of DFL) as a vertical line.

The manifest records the data set's fingerprint and split but not where its images
are, so the pipeline supplies the data (``ldpipe cache show PIPELINE CACHE``); a pipeline
whose split is not the one the cache was made from is refused.  The cache is read
through :class:`ldpipe.cache.reader.CacheReader`.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from ..cache.manifest import CacheError, Manifest
from ..cache.reader import CacheReader
from ..cache.store import open_root
from ..cache.views import read_views
from ..config import AssignerConfig, DataConfig, Pipeline
from ..data import Variant, load_image, load_split, make_sample
from ..data.views import View, compose
from ..models.anchors import grid_tensors
from ..models.assigner import atss_assign
from ..models.boxes import anchor_centers, bbox2distance, box_iou, distance2bbox

EDGES = ("left", "top", "right", "bottom")
DPI = 100


def parse_anchors(text: str | None) -> list[int] | None:
    """``"12,40, 41"`` -> ``[12, 40, 41]``; ``None`` / empty -> ``None`` (the default choice)."""
    if text is None or not text.strip():
        return None
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise CacheError(f"--anchors {text!r}: expected comma-separated anchor indices") from None


def variant_index(m: Manifest, variant: str | None) -> int:
    """The index of a variant given by key (``s0n``) or index; ``None`` -> 0."""
    if variant is None:
        return 0
    if variant in m.variants:
        return m.variants.index(variant)
    if variant.isdigit() and int(variant) < len(m.variants):
        return int(variant)
    raise CacheError(f"variant {variant!r} is not in the cache (variants: {', '.join(m.variants)})")


def _sample(data: DataConfig, reader: CacheReader, url: str, image_id: int, v: int):
    """The split's record, the cached rows and the made sample of (image id, variant)."""
    m = reader.manifest
    split = load_split(data, m.data.split)
    if split.fingerprint != m.data.fingerprint:
        raise CacheError(f"{url} was made for data fingerprint {m.data.fingerprint[:16]} "
                         f"({m.data.num_images} images of split {m.data.split!r}); this pipeline's "
                         f"split has {split.fingerprint[:16]} ({len(split.records)} images): give the "
                         "pipeline (and -o overrides) the cache was dumped with")
    ids = [int(i) for i in m.data.image_ids]
    if image_id not in ids:
        raise CacheError(f"{url}: image id {image_id} is not in the cache's split {m.data.split!r} "
                         f"(ids {ids[:5]}{' ...' if len(ids) > 5 else ''})")
    index = ids.index(image_id)
    rows = reader.read(index, v)
    record = split.records[index]
    if m.views is not None:  # a view cache: the stored view, composed from its record
        sample = compose(View.from_dict(read_views(open_root(url), url, m)[index * m.num_variants + v]),
                         split.records, data)
    else:
        g = m.geometry.variants[v]
        sample = make_sample(record, load_image(record.file_name), Variant(int(g["scale_idx"]), bool(g["flip"])),
                             data)
    differ = sample["meta"].geometry.differences(rows["geometry"], ("img_shape", "pad_shape"))
    if differ:
        key, ours, cached = differ[0]
        raise CacheError(f"{url}: image {image_id} variant {m.variants[v]} has {key} {cached} in "
                         f"the cache but {ours} with this pipeline (data.train_scales?)")
    return rows, sample


def default_anchors(m: Manifest, anchors: torch.Tensor, num_level: list[int], gt: torch.Tensor,
                    ignore: torch.Tensor, stored: torch.Tensor, k: int) -> list[int]:
    """Up to ``k`` stored ATSS positives of the largest GT box, highest IoU first (the
    assigner of the manifest's first reader); stored anchors overlapping it if it has none."""
    if gt.shape[0] == 0:
        raise CacheError("the sample has no GT boxes: choose anchors with --anchors")
    area = (gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])
    g = int(area.argmax())
    spec = m.region.settings()[0] if m.region.assigners else AssignerConfig()
    res = atss_assign(anchors, num_level, gt, ignore, spec.topk, spec.ignore_iof_thr)
    iou = box_iou(anchors, gt[g:g + 1])[:, 0]
    is_stored = torch.zeros(anchors.shape[0], dtype=torch.bool)
    is_stored[stored] = True
    cand = torch.nonzero((res.gt_index == g + 1) & is_stored).squeeze(1)
    if cand.numel() == 0:
        cand = torch.nonzero((iou > 0) & is_stored).squeeze(1)
    if cand.numel() == 0:
        raise CacheError("no stored anchor overlaps the largest GT box: choose anchors with --anchors")
    order = torch.argsort(iou[cand], descending=True, stable=True)
    return sorted(int(a) for a in cand[order[:k]])


def check_picture_args(out: str, num_anchors: int, figure_type) -> None:
    """``--num-anchors`` at least 1, and an ``--out`` whose suffix names an image format
    matplotlib writes (``figure_type``: its ``Figure``); :class:`CacheError` otherwise."""
    if num_anchors < 1:
        raise CacheError(f"--num-anchors {num_anchors}: give at least 1 anchor to draw")
    formats = figure_type().canvas.get_supported_filetypes()
    suffix = os.path.splitext(out)[1].lower().lstrip(".")
    if suffix not in formats:
        what = f"the suffix .{suffix}" if suffix else "a name without a suffix"
        raise CacheError(f"--out {out}: {what} names no image format matplotlib writes (give one "
                         f"of {', '.join('.' + f for f in sorted(formats))})")


def _display_image(sample: dict, d: DataConfig) -> np.ndarray:
    """The network input back to RGB uint8 (undoing the normalisation)."""
    x = sample["img"].permute(1, 2, 0).numpy() * np.asarray(d.std, np.float32) + np.asarray(d.mean, np.float32)
    x = x if d.to_rgb else x[..., ::-1]
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def show_sample(pipe: Pipeline, url: str, image_id: int, out: str, variant: str | None = None,
                anchors: list[int] | None = None, num_anchors: int = 3) -> dict:
    """Draw the picture to ``out`` (PNG); returns what was drawn: ``anchors``, ``probs``
    (``[k, 4, reg_max + 1]``, the bar heights as plotted), ``targets`` (GT distances in
    stride units), ``teacher_boxes``, ``gt_boxes``, ``variant`` and ``size`` (PNG w, h)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    check_picture_args(out, num_anchors, Figure)
    reader = CacheReader(url)
    m = reader.manifest
    v = variant_index(m, variant)
    rows, sample = _sample(pipe.data, reader, url, image_id, v)
    grid = m.geometry.grid(rows["geometry"].pad_shape)
    all_anchors, all_strides = grid_tensors(grid)
    stored = rows["anchor"]
    gt, ignore = sample["gt_boxes"], sample["ignore_boxes"]
    if anchors is None:
        chosen = default_anchors(m, all_anchors, grid.num_level_anchors, gt, ignore, stored, num_anchors)
    else:
        absent = [a for a in anchors if not bool((stored == a).any())]
        if absent or not anchors:
            raise CacheError(f"{url}: anchors {absent} of image {image_id} variant {m.variants[v]} are "
                             f"not stored (the {m.region.policy!r} region holds {stored.numel()} anchors, "
                             f"e.g. {stored[:8].tolist()})")
        chosen = list(anchors)
    pos = torch.searchsorted(stored, torch.tensor(chosen, dtype=torch.long))
    probs_in = torch.softmax(rows["box"][pos].float(), dim=-1)  # [k, 4, bins]
    bins = m.geometry.reg_bins
    idx = torch.tensor(chosen, dtype=torch.long)
    centers, strides = anchor_centers(all_anchors[idx]), all_strides[idx]
    expect = (probs_in * torch.arange(bins, dtype=torch.float32)).sum(-1)
    teacher_boxes = distance2bbox(centers, expect * strides[:, None])
    targets = None
    if gt.shape[0]:
        best = box_iou(all_anchors[idx], gt).argmax(dim=1)
        targets = bbox2distance(centers / strides[:, None], gt[best] / strides[:, None], m.geometry.reg_max)

    k = len(chosen)
    fig = Figure(figsize=(5.0 + 4 * 2.4, max(3.6, 2.0 * k)), dpi=DPI, layout="constrained")
    gs = fig.add_gridspec(k, 5, width_ratios=[2.2, 1, 1, 1, 1])
    ax = fig.add_subplot(gs[:, 0])
    ax.imshow(_display_image(sample, pipe.data))
    for b in gt.tolist():
        ax.add_patch(Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, color="lime", lw=1.5))
    colors = [f"C{i % 10}" for i in range(k)]
    for i, a in enumerate(chosen):
        ab, tb = all_anchors[a].tolist(), teacher_boxes[i].tolist()
        ax.add_patch(Rectangle((ab[0], ab[1]), ab[2] - ab[0], ab[3] - ab[1], fill=False, color=colors[i],
                               lw=1, ls=":"))
        ax.add_patch(Rectangle((tb[0], tb[1]), tb[2] - tb[0], tb[3] - tb[1], fill=False, color=colors[i], lw=1.2))
        ax.plot(*centers[i].tolist(), "o", color=colors[i], ms=3)
    ax.set_title(f"image {image_id} ({m.variants[v]}): GT (green), teacher boxes", fontsize=8)
    ax.axis("off")
    plotted = np.zeros((k, 4, bins), dtype=np.float64)
    for i, a in enumerate(chosen):
        for e in range(4):
            bax = fig.add_subplot(gs[i, e + 1])
            bars = bax.bar(np.arange(bins), probs_in[i, e].numpy(), color=colors[i], width=0.85)
            plotted[i, e] = [p.get_height() for p in bars]
            if targets is not None:
                bax.axvline(float(targets[i, e]), color="lime", lw=1.2)
            bax.set_ylim(0, 1)
            bax.tick_params(labelsize=6)
            bax.set_title(f"anchor {a} (s{int(strides[i])}) {EDGES[e]}" if e == 0 else EDGES[e], fontsize=7)
    fig.suptitle(f"{url}: teacher {m.teacher.model}, {m.codec}, region {m.region.policy}; bars: "
                 "edge distributions (bins = stride units), green line: GT distance", fontsize=8)
    fig.savefig(out, dpi=DPI)
    size = (int(round(fig.get_figwidth() * DPI)), int(round(fig.get_figheight() * DPI)))
    return {"anchors": chosen, "variant": m.variants[v], "probs": plotted,
            "targets": None if targets is None else targets.numpy(),
            "teacher_boxes": teacher_boxes.numpy(), "gt_boxes": gt.numpy(), "size": size, "png": out}
