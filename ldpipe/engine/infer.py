"""Inference over a split and evaluation of a checkpoint (``ldpipe eval``)."""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import torch

from ..config import Pipeline
from ..data import TEST_VARIANT, DetectionDataset, FixedSampler, boxes_to_original, collate, load_split
from ..models import GFL, build_model
from ..models.checkpoint import load_weights
from ..metrics import build_coco_gt, evaluate, write_results
from .runtime import amp_context, progress_bar

log = logging.getLogger("ldpipe.eval")


@torch.no_grad()
def predict_split(model: GFL, pipe: Pipeline, split, device: torch.device, batch_size: int = 4,
                  workers: int = 0, progress: bool = True) -> list[dict]:
    """Detections in original image coordinates for every image of ``split``."""
    dataset = DetectionDataset(split, pipe, [TEST_VARIANT])
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=FixedSampler([(i, 0) for i in range(len(dataset))]),
        num_workers=workers, collate_fn=collate)
    model.eval()
    out = []
    for batch in progress_bar(iterable=loader, desc="eval", disable=not progress, leave=False):
        img = batch["img"].to(device)
        with amp_context(device, device.type == "cuda"):
            dets = model.predict(img, batch["metas"])
        for det, meta in zip(dets, batch["metas"]):
            boxes = boxes_to_original(det["boxes"].float().cpu(), meta)
            out.append({"image_id": meta["image_id"],
                        "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                        "scores": det["scores"].float().cpu().numpy(),
                        "labels": det["labels"].cpu().numpy().astype(np.int64)})
    return out


def evaluate_checkpoint(pipe: Pipeline, model_name: str, checkpoint: str, split_name: str = "val",
                        out: str | None = None, results: str | None = None,
                        device: str | None = None, batch_size: int = 4,
                        progress: bool = True) -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    split = load_split(pipe, split_name)
    model = build_model(pipe.model(model_name), len(split.classes))
    load_weights(model, checkpoint)
    model.to(dev)
    dets = predict_split(model, pipe, split, dev, batch_size=batch_size, progress=progress)
    metrics = evaluate(split.records, split.classes, dets, coco_json=split.coco_json,
                          voc=pipe.data.format == "voc")
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
