"""One training step and what it needs: the collate that makes per-image targets, the lr
schedule, the forward + criterion (:func:`step_losses`) and the optimisation step
(:class:`TrainStep`) - exactly what :func:`ldpipe.engine.train.train` runs, usable alone by a
benchmark or another runner.

mmdetection's schedule: SGD (momentum 0.9, weight decay 1e-4), linear warm-up over
``warmup_iters`` iterations from ``warmup_ratio``, step decay at the given epochs, lr = 0.01 x
total batch / 16 unless set; AMP (GradScaler) on CUDA; gradient clipping when set.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from ..config import ModelConfig, TrainConfig
from ..data import collate
from ..distill.criterion import Criterion, GFLCriterion
from ..models import GFL, batch_targets, image_targets
from ..models.checkpoint import load_weights
from . import runtime

log = logging.getLogger("ldpipe.train")


class TrainCollate:
    """Collate plus per-image ATSS targets on the image's own grid (runs in loader workers)."""

    def __init__(self, cfg: ModelConfig, num_classes: int, with_vlr: bool) -> None:
        self.strides, self.anchor_scale, self.num_classes = list(cfg.strides), cfg.anchor_scale, num_classes
        self.topk, self.ignore_iof_thr = cfg.assigner.topk, cfg.assigner.ignore_iof_thr
        self.with_vlr, self.vlr_region = with_vlr, cfg.assigner.vlr_region

    def __call__(self, samples: list[dict]) -> dict:
        batch = collate(samples)
        if not batch["metas"]:  # every item skipped (data.skip_undecodable_images)
            return batch
        batch["targets"] = [
            image_targets(g, lb, ig, m.pad_shape, self.strides, self.anchor_scale,
                          self.num_classes, self.topk, self.ignore_iof_thr, self.with_vlr,
                          self.vlr_region)
            for g, lb, ig, m in zip(batch["gt_boxes"], batch["gt_labels"],
                                    batch["ignore_boxes"], batch["metas"])]
        return batch


@dataclass
class Schedule:
    base_lr: float
    warmup_iters: int
    warmup_ratio: float
    steps: list[int]
    gamma: float

    @classmethod
    def of(cls, sched: TrainConfig, lr: float) -> "Schedule":
        return cls(lr, sched.warmup_iters, sched.warmup_ratio, sched.steps, sched.gamma)

    def lr(self, epoch: int, it: int) -> float:
        regular = self.base_lr * self.gamma ** sum(epoch >= s for s in self.steps)
        if it < self.warmup_iters:
            k = (1 - it / self.warmup_iters) * (1 - self.warmup_ratio)
            return regular * (1 - k)
        return regular


def base_lr(sched: TrainConfig, world_size: int = 1) -> float:
    """``train.lr``, or the linear scaling rule 0.01 x total batch / 16 when it is 0."""
    return sched.lr or 0.01 * sched.batch_size * world_size / 16


def step_losses(ddp, model: GFL, batch: dict, device: torch.device, use_amp: bool,
                criterion: Criterion) -> dict[str, torch.Tensor]:
    """Forward one batch (through ``ddp``, the model or its DDP wrapper) and return every
    loss term of ``criterion``."""
    img = batch["img"].to(device, non_blocking=True)
    with runtime.amp_context(device, use_amp):
        out = ddp(img) if criterion.hold is None else ddp(img, hold=criterion.hold)
    cfg = model.cfg
    bt = batch_targets(batch["targets"], out.level_sizes, cfg.strides, cfg.anchor_scale,
                       model.num_classes, device)
    return criterion(model, batch, out, bt)


class TrainStep:
    """One optimisation step as :func:`train` runs it: lr from the schedule, forward and
    ``criterion``'s losses, finiteness check, backward (GradScaler with AMP), gradient
    clipping, update."""

    def __init__(self, model: GFL, sched: TrainConfig, device: torch.device, use_amp: bool,
                 world_size: int = 1, ddp=None, criterion: Criterion | None = None) -> None:
        self.model, self.ddp = model, ddp if ddp is not None else model
        self.criterion = criterion or GFLCriterion()
        self.device, self.use_amp, self.grad_clip = device, use_amp, sched.grad_clip
        self.params = [p for p in model.parameters() if p.requires_grad]
        lr = base_lr(sched, world_size)
        self.optimizer = torch.optim.SGD(self.params, lr=lr, momentum=sched.momentum,
                                         weight_decay=sched.weight_decay)
        self.schedule = Schedule.of(sched, lr)
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    def __call__(self, batch: dict, epoch: int, it: int) -> tuple[dict[str, float], float]:
        """Run the step at (epoch, global iteration ``it``); returns the loss values and lr."""
        lr = self.schedule.lr(epoch, it)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        losses = step_losses(self.ddp, self.model, batch, self.device, self.use_amp, self.criterion)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss is {float(loss)} at epoch {epoch + 1} iteration {it} "
                f"(images {[m.image_id for m in batch['metas']]}); {fmt_values(losses)}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        values = {k: float(v.detach()) for k, v in losses.items()}
        values["loss"] = float(loss.detach())
        return values, lr

    def state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def restore(self, path: str, obj: dict) -> None:
        """Weights, optimizer and scaler state of checkpoint ``path`` (its dict ``obj``, read once)."""
        load_weights(self.model, path, obj)
        if "optimizer" in obj:
            self.optimizer.load_state_dict(obj["optimizer"])
        if obj.get("scaler"):
            self.scaler.load_state_dict(obj["scaler"])


def append_json(path: str, record: dict[str, Any]) -> None:
    record = {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v)
              for k, v in record.items()}
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def fmt_values(values: dict) -> str:
    return " ".join(f"{k}={float(v):.4f}" for k, v in values.items())
