"""Inference over a split and evaluation of a checkpoint (``ldpipe eval``)."""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import torch

from ..config import DataConfig, Pipeline
from ..config.checks import check_run_args
from ..data import TEST_VARIANT, DetectionDataset, FixedSampler, boxes_to_original, collate, load_split
from ..models import GFL, build_model
from ..models.checkpoint import load_weights
from ..metrics import build_coco_gt, evaluate, write_results
from .runtime import amp_context, progress_bar

log = logging.getLogger("ldpipe.eval")


@torch.no_grad()
def predict_split(model: GFL, data: DataConfig, split, device: torch.device, batch_size: int = 4,
                  workers: int = 0, progress: bool = True,
                  skipped: list[str] | None = None) -> list[dict]:
    """Detections in original image coordinates for every image of ``split`` (``skipped``
    collects the files left out with ``data.skip_undecodable_images``)."""
    dataset = DetectionDataset(split, data, [TEST_VARIANT])
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=FixedSampler([(i, 0) for i in range(len(dataset))]),
        num_workers=workers, collate_fn=collate)
    model.eval()
    out = []
    skipped = [] if skipped is None else skipped
    for batch in progress_bar(iterable=loader, desc="eval", disable=not progress, leave=False):
        skipped += batch["skipped"]
        if not batch["metas"]:
            continue
        out.extend(detect_batch(model, batch, device))
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
        dets = model.predict(img, batch["metas"])
    out = []
    for det, meta in zip(dets, batch["metas"]):
        boxes = boxes_to_original(det["boxes"].float().cpu(), meta)
        out.append({"image_id": meta["image_id"],
                    "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                    "scores": det["scores"].float().cpu().numpy(),
                    "labels": det["labels"].cpu().numpy().astype(np.int64)})
    return out


def evaluate_model(model: GFL, data: DataConfig, split, device: torch.device, batch_size: int = 4,
                   progress: bool = True) -> tuple[dict, list[dict]]:
    """Metrics (COCO AP, or VOC mAP for VOC data) and the detections of ``model`` on ``split``
    (``ldpipe eval``, and training's validation every ``train.val_interval`` epochs)."""
    skipped: list[str] = []
    dets = predict_split(model, data, split, device, batch_size=batch_size, progress=progress,
                         skipped=skipped)
    metrics = evaluate(split.records, split.classes, dets, coco_json=split.coco_json,
                       voc=data.format == "voc")
    if skipped:
        metrics["skipped_images"] = len(skipped)
    return metrics, dets


def evaluate_checkpoint(pipe: Pipeline, model_name: str, checkpoint: str, split_name: str = "val",
                        out: str | None = None, results: str | None = None,
                        device: str | None = None, batch_size: int = 4,
                        progress: bool = True) -> dict:
    check_run_args(batch_size)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    split = load_split(pipe.data, split_name)
    model = build_model(pipe.model(model_name), len(split.classes))
    load_weights(model, checkpoint)
    model.to(dev)
    metrics, dets = evaluate_model(model, pipe.data, split, dev, batch_size=batch_size, progress=progress)
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
