"""The GFL detector: ResNet backbone + FPN neck + GFL head, composed by hand.

Top-level names match mmdetection's ``GFL`` detector (``backbone``, ``neck``,
``bbox_head``), so its checkpoints load with ``strict=True``.

The model owns its output layout: :meth:`GFL.forward` returns a :class:`DenseOutput`
whose tensors are flattened level by level over the batch's anchor grid (mmdetection's
order), in float32 also under autocast.  Training targets (:mod:`.targets`), the
teacher dump and distillation all index these batch-flat rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import ModelConfig
from .anchors import grid_anchors
from .backbone import ResNet
from .fpn import FPN
from .gfl_head import GFLHead


@dataclass
class DenseOutput:
    """Per-anchor outputs of a batch on its anchor grid (row ``b * N + j``: image ``b``, anchor ``j``)."""

    cls: torch.Tensor  # [B, N, C] class logits (sigmoid), float32
    reg: torch.Tensor  # [B, N, 4, reg_max + 1] edge-distribution logits, float32
    level_sizes: list[tuple[int, int]]  # (h, w) of each level's grid
    # the flat views, made once: the GFL losses and the distillation terms index the same
    # tensor, so their gradients meet in one place (in one order) as before the redesign
    _flat: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def reg_bins(self) -> int:
        return int(self.reg.shape[-1])

    @property
    def num_classes(self) -> int:
        return int(self.cls.shape[-1])

    def flat_cls(self) -> torch.Tensor:
        """``[B*N, C]``."""
        if "cls" not in self._flat:
            self._flat["cls"] = self.cls.reshape(-1, self.cls.shape[-1])
        return self._flat["cls"]

    def flat_reg(self) -> torch.Tensor:
        """``[B*N, 4, reg_max + 1]``."""
        if "reg" not in self._flat:
            self._flat["reg"] = self.reg.reshape(-1, 4, self.reg.shape[-1])
        return self._flat["reg"]

    def level_slices(self) -> list[slice]:
        """The anchors of each level along the ``N`` axis."""
        out, start = [], 0
        for h, w in self.level_sizes:
            out.append(slice(start, start + h * w))
            start += h * w
        return out


def flatten_levels(maps: list[torch.Tensor]) -> torch.Tensor:
    """``[B, C, H, W]`` per level to ``[B, sum(H*W), C]`` (mmdetection's order)."""
    return torch.cat([m.permute(0, 2, 3, 1).reshape(m.shape[0], -1, m.shape[1]) for m in maps], 1)


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

    @property
    def reg_bins(self) -> int:
        """Bins of one edge distribution (``reg_max + 1``)."""
        return self.bbox_head.reg_bins

    def forward(self, img: torch.Tensor) -> DenseOutput:
        """Class and edge-distribution logits of every anchor, batch-flat."""
        cls_maps, reg_maps = self.bbox_head(self.neck(self.backbone(img)[1:]))
        b = img.shape[0]
        return DenseOutput(flatten_levels(cls_maps).float(),
                           flatten_levels(reg_maps).float().reshape(b, -1, 4, self.reg_bins),
                           [tuple(m.shape[-2:]) for m in cls_maps])

    @torch.no_grad()
    def predict(self, img: torch.Tensor, metas: list[dict]) -> list[dict]:
        """Detections in input coordinates per image: ``{'boxes', 'scores', 'labels'}``."""
        out = self(img)
        anchors = [grid_anchors([hw], [s], self.cfg.anchor_scale, img.device)[0]
                   for hw, s in zip(out.level_sizes, self.strides)]
        return self.bbox_head.predict(out, anchors, self.strides, metas, self.cfg.test)


def build_model(cfg: ModelConfig, num_classes: int) -> GFL:
    return GFL(cfg, num_classes)
