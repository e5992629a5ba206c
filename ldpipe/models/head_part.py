"""CrossKD's teacher head part: the convs of a GFL head from ``idx`` on and its prediction layers.

CrossKD (Wang et al., CVPR 2024) feeds the student's held head features (the towers' input to
conv ``idx``) through the *teacher's* remaining head, frozen, and distils those predictions
against the teacher's own.  Offline only this part of the teacher is needed: for a GFL R-101
teacher with ``idx = 3`` about 1.5 M of its ~51 M parameters.  :class:`HeadPart` holds it with
its own parameter names (``cls_convs.0`` is the teacher's conv ``idx``); ``dump-teacher``
stores its tensors in the cache (``cache.reused_head_idx``).
"""
from __future__ import annotations

import copy
import math

import torch
from mmcv.cnn import Scale
from torch import nn

from .gfl_head import GFLHead, _conv_gn


class HeadPart(nn.Module):
    """Convs ``idx .. stacked_convs - 1`` of both towers, ``gfl_cls``, ``gfl_reg`` and the
    per-level ``scales`` of a GFL head with ``channels`` feature channels."""

    def __init__(self, num_classes: int, channels: int, stacked_convs: int, idx: int,
                 reg_max: int = 16, num_levels: int = 5, norm_groups: int = 32) -> None:
        super().__init__()
        if not 0 <= idx <= stacked_convs:
            raise ValueError(f"reused head conv idx {idx} is not in 0..{stacked_convs}")
        self.idx, self.reg_max = idx, reg_max
        groups = math.gcd(norm_groups, channels)
        self.cls_convs = nn.ModuleList(_conv_gn(channels, channels, groups) for _ in range(idx, stacked_convs))
        self.reg_convs = nn.ModuleList(_conv_gn(channels, channels, groups) for _ in range(idx, stacked_convs))
        self.gfl_cls = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.gfl_reg = nn.Conv2d(channels, 4 * (reg_max + 1), 3, padding=1)
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(num_levels))

    @classmethod
    def of_head(cls, head: GFLHead, idx: int) -> "HeadPart":
        """A frozen copy of ``head``'s part from conv ``idx`` on (on ``head``'s device)."""
        if type(head) is not GFLHead:
            raise ValueError(f"CrossKD's head part is implemented for GFLHead, not {type(head).__name__}")
        part = copy.deepcopy(nn.ModuleDict({
            "cls_convs": nn.ModuleList(head.cls_convs[idx:]), "reg_convs": nn.ModuleList(head.reg_convs[idx:]),
            "gfl_cls": head.gfl_cls, "gfl_reg": head.gfl_reg, "scales": head.scales}))
        out = cls.__new__(cls)
        nn.Module.__init__(out)
        out.idx, out.reg_max = idx, head.reg_max
        for name, module in part.items():
            setattr(out, name, module)
        return out.frozen()

    def frozen(self) -> "HeadPart":
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    def forward(self, cls_feat: torch.Tensor, reg_feat: torch.Tensor, level: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits ``[B, C, h, w]`` and edge logits ``[B, 4 * (reg_max + 1), h, w]`` of
        one level from the towers' inputs to conv ``idx`` (``[B, channels, h, w]`` each)."""
        for conv in self.cls_convs:
            cls_feat = conv(cls_feat)
        for conv in self.reg_convs:
            reg_feat = conv(reg_feat)
        return self.gfl_cls(cls_feat), self.scales[level](self.gfl_reg(reg_feat)).float()

    def tensors(self) -> dict[str, torch.Tensor]:
        """Its parameters and buffers by name (float32, CPU): what a cache stores."""
        return {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}


def head_part_config(cfg, num_classes: int, idx: int) -> dict:
    """The constructor arguments of the head part of model config ``cfg`` (a ModelConfig)."""
    return dict(num_classes=num_classes, channels=cfg.channels, stacked_convs=cfg.stacked_convs,
                idx=idx, reg_max=cfg.reg_max, num_levels=len(cfg.strides), norm_groups=cfg.norm_groups)
