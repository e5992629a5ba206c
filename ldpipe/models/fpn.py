"""Feature pyramid (P3-P7) with mmdetection's parameter names.

Equal to mmdetection's ``FPN(start_level=1, add_extra_convs='on_output',
num_outs=5)``: 1x1 lateral convs on C3..C5, nearest-neighbour top-down path,
3x3 output convs, and two extra stride-2 3x3 convs, the first on P5's output,
the second on P6 (no ReLU in between, ``relu_before_extra_convs=False``).
Names: ``lateral_convs.{i}.conv.*``, ``fpn_convs.{i}.conv.*``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from mmcv.cnn import ConvModule
from torch import nn


class FPN(nn.Module):
    def __init__(self, in_channels: list[int], out_channels: int = 256, num_extra: int = 2) -> None:
        super().__init__()
        self.lateral_convs = nn.ModuleList(
            ConvModule(c, out_channels, 1, act_cfg=None) for c in in_channels)
        self.fpn_convs = nn.ModuleList(
            ConvModule(out_channels, out_channels, 3, padding=1, act_cfg=None)
            for _ in in_channels)
        for _ in range(num_extra):
            self.fpn_convs.append(
                ConvModule(out_channels, out_channels, 3, stride=2, padding=1, act_cfg=None))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest")
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)]
        for conv in self.fpn_convs[len(laterals):]:
            outs.append(conv(outs[-1]))
        return outs
