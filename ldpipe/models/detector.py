"""The GFL detector: ResNet backbone + FPN neck + GFL head, composed by hand.

Top-level names match mmdetection's ``GFL`` detector (``backbone``, ``neck``,
``bbox_head``), so its checkpoints load with ``strict=True``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from .assigner import Grid, ImageTargets, grid_tensors
from .backbone import ResNet
from .boxes import grid_anchors, grid_to_batch_index
from .fpn import FPN
from .gfl_head import GFLHead


class GFL(nn.Module):
    def __init__(self, cfg: ModelConfig, num_classes: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        pretrained = bool(cfg.pretrained)
        self.backbone = ResNet(cfg.depth, cfg.base_width,
                               frozen_stages=1 if pretrained else -1, norm_eval=pretrained)
        if pretrained:
            self.backbone.load_pretrained(cfg.pretrained)
        self.neck = FPN(self.backbone.out_channels[1:], cfg.channels, num_extra=len(cfg.strides) - 3)
        self.bbox_head = GFLHead(num_classes, cfg.channels, cfg.channels, cfg.stacked_convs,
                                 cfg.reg_max, len(cfg.strides), cfg.norm_groups)

    @property
    def strides(self) -> list[int]:
        return list(self.cfg.strides)

    def forward(self, img: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Class logits and edge-distribution logits per level."""
        return self.bbox_head(self.neck(self.backbone(img)[1:]))

    @torch.no_grad()
    def predict(self, img: torch.Tensor, metas: list[dict]) -> list[dict]:
        cls_scores, bbox_preds = self(img)
        sizes = [tuple(m.shape[-2:]) for m in cls_scores]
        anchors = [grid_anchors([hw], [s], self.cfg.anchor_scale, img.device)[0]
                   for hw, s in zip(sizes, self.strides)]
        return self.bbox_head.predict(cls_scores, bbox_preds, anchors, self.strides, metas, self.cfg.test)


def build_model(cfg: ModelConfig, num_classes: int) -> GFL:
    return GFL(cfg, num_classes)


@dataclass
class BatchTargets:
    """Per-image targets scattered into the batch's flattened anchor layout."""

    anchors: torch.Tensor  # [B*N, 4]
    strides: torch.Tensor  # [B*N]
    labels: torch.Tensor  # [B*N]
    label_weights: torch.Tensor  # [B*N]
    bbox_targets: torch.Tensor  # [B*N, 4]
    vlr: torch.Tensor | None  # [B*N]
    own_to_batch: list[torch.Tensor]  # per image: own-grid flat index -> flat index in [B*N]
    num_pos_images: float  # sum over images of max(n_pos, 1)


def batch_targets(targets: list[ImageTargets], batch_sizes: list[tuple[int, int]],
                  strides: list[int], anchor_scale: float, num_classes: int,
                  device: torch.device) -> BatchTargets:
    """Scatter own-grid targets into the batch grid.

    Anchors outside an image's own padded extent get label weight 0 (mmdetection's
    valid flags).  Flat index of image ``b`` anchor ``j`` is ``b * N + j``.
    """
    grid = Grid(tuple(batch_sizes), tuple(strides), float(anchor_scale))
    anchors, stride_of = grid_tensors(grid)
    n = anchors.shape[0]
    bsz = len(targets)
    labels = torch.full((bsz, n), num_classes, dtype=torch.long)
    weights = torch.zeros(bsz, n)
    boxes = torch.zeros(bsz, n, 4)
    with_vlr = bool(targets) and targets[0].vlr is not None
    vlr = torch.zeros(bsz, n) if with_vlr else None
    maps, num_pos = [], 0.0
    for b, t in enumerate(targets):
        idx = grid_to_batch_index(list(t.grid.sizes), batch_sizes)
        labels[b, idx] = t.labels
        weights[b, idx] = t.label_weights
        boxes[b, idx] = t.bbox_targets
        if vlr is not None:
            vlr[b, idx] = t.vlr
        maps.append((idx + b * n).to(device))
        num_pos += max(int((t.labels < num_classes).sum()), 1)
    return BatchTargets(
        anchors.repeat(bsz, 1).to(device), stride_of.repeat(bsz).to(device),
        labels.reshape(-1).to(device), weights.reshape(-1).to(device),
        boxes.reshape(-1, 4).to(device), vlr.reshape(-1).to(device) if vlr is not None else None,
        maps, num_pos)
