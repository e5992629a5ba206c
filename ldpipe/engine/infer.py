"""Inference over a split and evaluation of a checkpoint (``ldpipe eval``)."""
from __future__ import annotations

import itertools
import json
import logging
import os

import numpy as np
import torch
import torch.distributed as dist

from ..config import DataConfig, Pipeline
from ..config.checks import check_run_args
from ..data import TEST_VARIANT, DetectionDataset, boxes_to_original, collate, load_split
from ..models import GFL, load_detector
from ..metrics import build_coco_gt, evaluate, write_results
from . import runtime
from .runtime import amp_context, progress_bar

log = logging.getLogger("ldpipe.eval")


def eval_batches(num_images: int, batch_size: int, rank: int = 0,
                 world_size: int = 1) -> list[list[tuple[int, int]]]:
    """The (image, variant 0) batches of one process - images in split order, ``batch_size``
    each - of which rank ``r`` of ``world_size`` takes batches ``r::world_size``.

    Whole batches, not images, are shared out: a batch is zero-padded to its largest image
    (:func:`~ldpipe.data.collate`), so every rank runs the very batches one process would and
    the detections are the same (a rank may get one batch more than another, or none)."""
    pairs = [(i, 0) for i in range(num_images)]
    batches = [pairs[at:at + batch_size] for at in range(0, num_images, batch_size)]
    return batches[rank::world_size]


@torch.no_grad()
def predict_split(model: GFL, data: DataConfig, split, device: torch.device, batch_size: int = 4,
                  workers: int = 0, progress: bool = True,
                  skipped: list[str] | None = None, rank: int = 0,
                  world_size: int = 1) -> list[dict]:
    """Detections in original image coordinates for every image of ``split``, in split order
    (``skipped`` collects the files left out with ``data.skip_undecodable_images``).

    Under torchrun (``world_size`` > 1, a process group started, every rank calling): each rank
    detects its share (:func:`eval_batches`), rank 0 gathers the shares and returns all the
    detections and skipped files in the order of one process; the other ranks return ``[]``
    (and ``skipped`` stays empty there)."""
    dataset = DetectionDataset(split, data, [TEST_VARIANT])
    batches = eval_batches(len(dataset), batch_size, rank, world_size)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                         collate_fn=collate)
    model.eval()
    shard = []  # per batch of this rank: (batch number, detections, skipped files)
    bar = progress_bar(iterable=loader, desc="eval", disable=not (progress and rank == 0),
                       leave=False)
    for number, batch in zip(itertools.count(rank, world_size), bar):
        dets = detect_batch(model, batch, device) if batch["metas"] else []
        shard.append((number, dets, list(batch["skipped"])))
    if world_size > 1:
        shards: list = [None] * world_size
        dist.all_gather_object(shards, shard)  # gloo and NCCL (runtime.init set the device)
        if rank != 0:
            return []
        shard = sorted((item for part in shards for item in part), key=lambda item: item[0])
    out = [det for _, dets, _ in shard for det in dets]
    skipped = [] if skipped is None else skipped
    skipped += [name for _, _, names in shard for name in names]
    if skipped:  # their objects count as missed (data.skip_undecodable_images)
        log.warning("eval: skipped %d undecodable image(s), their objects count as missed: %s",
                    len(skipped), ", ".join(skipped[:5]))
    return out


@torch.no_grad()
def detect_batch(model: GFL, batch: dict, device: torch.device) -> list[dict]:
    """Detections of one collated batch in original image coordinates (``image_id``,
    ``boxes`` ``[n, 4]`` xyxy float32, ``scores``, ``labels``), one dict per image."""
    img = batch["img"].to(device)
    with amp_context(device, device.type == "cuda"):
        dets = model.predict(img, [m.img_shape for m in batch["metas"]])
    out = []
    for det, meta in zip(dets, batch["metas"]):
        boxes = boxes_to_original(det["boxes"].float().cpu(), meta)
        out.append({"image_id": meta.image_id,
                    "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                    "scores": det["scores"].float().cpu().numpy(),
                    "labels": det["labels"].cpu().numpy().astype(np.int64)})
    return out


def evaluate_model(model: GFL, data: DataConfig, split, device: torch.device, batch_size: int = 4,
                   progress: bool = True, rank: int = 0,
                   world_size: int = 1) -> tuple[dict | None, list[dict]]:
    """Metrics (COCO AP, or VOC mAP for VOC data) and the detections of ``model`` on ``split``
    (``ldpipe eval``, and training's validation every ``train.val_interval`` epochs).

    With ``world_size`` > 1 every rank must call it: the ranks share the images
    (:func:`predict_split`) and rank 0 evaluates all of them once; the other ranks get
    ``(None, [])``."""
    skipped: list[str] = []
    dets = predict_split(model, data, split, device, batch_size=batch_size, progress=progress,
                         skipped=skipped, rank=rank, world_size=world_size)
    if rank != 0:
        return None, []
    metrics = evaluate(split.records, split.classes, dets, coco_json=split.coco_json,
                       voc=data.format == "voc")
    if skipped:
        metrics["skipped_images"] = len(skipped)
    return metrics, dets


def evaluate_checkpoint(pipe: Pipeline, model_name: str, checkpoint: str, split_name: str = "val",
                        out: str | None = None, results: str | None = None,
                        device: str | None = None, batch_size: int = 4,
                        progress: bool = True) -> dict | None:
    """``ldpipe eval``: the metrics of ``checkpoint`` on ``split_name`` (also written to
    ``out``; the detections to ``results`` in COCO results format).

    Under ``torchrun --nproc_per_node=N`` the N ranks share the images (each rank on
    ``cuda:LOCAL_RANK`` with ``--device cuda``) and rank 0 evaluates, writes and returns the
    metrics - the same as one process; the other ranks return ``None``."""
    check_run_args(batch_size)
    started = dist.is_available() and dist.is_initialized()
    info = runtime.init(device)
    try:
        return _evaluate_checkpoint(pipe, model_name, checkpoint, split_name, out, results,
                                    info, batch_size, progress)
    finally:
        if info.enabled and not started and dist.is_initialized():
            dist.destroy_process_group()  # this command started it


def _evaluate_checkpoint(pipe: Pipeline, model_name: str, checkpoint: str, split_name: str,
                         out: str | None, results: str | None, info: runtime.DistInfo,
                         batch_size: int, progress: bool) -> dict | None:
    split = load_split(pipe.data, split_name)
    model, _ = load_detector(pipe.model(model_name), len(split.classes), checkpoint, info.device)
    metrics, dets = evaluate_model(model, pipe.data, split, info.device, batch_size=batch_size,
                                   progress=progress, rank=info.rank,
                                   world_size=info.world_size)
    if metrics is None:
        return None
    metrics.update({"model": model_name, "checkpoint": os.path.abspath(checkpoint),
                    "split": split_name})
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as fh:
            json.dump(metrics, fh, indent=2, sort_keys=True)
    if results:
        _, cat_ids = build_coco_gt(split.records, split.classes, split.coco_json)
        write_results(results, dets, cat_ids)
    return metrics
