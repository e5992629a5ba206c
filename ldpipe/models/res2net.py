"""Res2Net with mmdetection's parameter names (its ``Res2Net`` / ``Bottle2neck``).

As mmdetection's ``Res2Net``: a deep stem (``stem.0`` / ``stem.3`` / ``stem.6`` 3x3 convs with
BatchNorms ``stem.1`` / ``stem.4`` / ``stem.7``), "avg_down" shortcuts
(``downsample.0`` AvgPool, ``downsample.1`` 1x1 conv, ``downsample.2`` BN) and
``Bottle2neck`` blocks: ``conv1``/``bn1`` to ``width * scales`` channels, ``scales - 1``
3x3 convs ``convs.{i}`` with ``bns.{i}`` (deformable with ``dcn``), ``conv3``/``bn3``; the
first block of every stage is ``stage_type='stage'`` (no hierarchical sum, and the last split
goes through a 3x3 AvgPool when the block strides).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .backbone import ResNet
from .dcn import build_dcn


class Bottle2neck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, *, scales: int = 4, base_width: int = 26,
                 base_channels: int = 64, stage_type: str = "normal", dcn: dict | None = None) -> None:
        super().__init__()
        if scales < 2:
            raise ValueError(f"Res2Net needs scales > 1, got {scales}")
        width = math.floor(planes * base_width / base_channels)
        self.width, self.scales, self.stage_type, self.stride = width, scales, stage_type, stride
        self.conv1 = nn.Conv2d(inplanes, width * scales, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width * scales)
        if stage_type == "stage" and stride != 1:
            self.pool = nn.AvgPool2d(kernel_size=3, stride=stride, padding=1)
        convs = []
        for _ in range(scales - 1):
            if dcn is None:
                convs.append(nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False))
            else:
                convs.append(build_dcn(dcn, width, width, stride=stride))
        self.convs = nn.ModuleList(convs)
        self.bns = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(scales - 1))
        self.conv3 = nn.Conv2d(width * scales, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        spx = torch.split(out, self.width, 1)
        sp = self.relu(self.bns[0](self.convs[0](spx[0].contiguous())))
        parts = [sp]
        for i in range(1, self.scales - 1):
            sp = spx[i] if self.stage_type == "stage" else sp + spx[i]
            sp = self.relu(self.bns[i](self.convs[i](sp.contiguous())))
            parts.append(sp)
        last = spx[self.scales - 1]
        if self.stage_type == "stage" and self.stride != 1:
            last = self.pool(last)
        out = self.bn3(self.conv3(torch.cat(parts + [last], 1)))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Res2Net(ResNet):
    """Res2Net-50/101 returning C2..C5 (``scales``, ``base_width``: mmdetection's; 4 and 26)."""

    def __init__(self, depth: int = 50, base_channels: int = 64, frozen_stages: int = -1,
                 norm_eval: bool = False, *, scales: int = 4, base_width: int = 26,
                 dcn: dict | None = None, stage_with_dcn=(False, False, False, False)) -> None:
        if depth < 50:
            raise ValueError(f"Res2Net depth must be 50 or 101, got {depth}")
        self.scales = scales
        super().__init__(depth, base_channels, frozen_stages, norm_eval, base_width=base_width,
                         dcn=dcn, stage_with_dcn=stage_with_dcn)

    def _block_class(self, depth: int) -> type:
        return Bottle2neck

    def _make_stem(self, channels: int) -> None:
        half = channels // 2
        self.stem = nn.Sequential(
            nn.Conv2d(3, half, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
            nn.Conv2d(half, channels, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True))

    def _stem_modules(self) -> list[nn.Module]:
        return [self.stem]

    def _stem_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)

    def _downsample(self, planes: int, stride: int) -> nn.Module:
        out = planes * self.block.expansion
        return nn.Sequential(
            nn.AvgPool2d(kernel_size=stride, stride=stride, ceil_mode=True, count_include_pad=False),
            nn.Conv2d(self.inplanes, out, 1, stride=1, bias=False), nn.BatchNorm2d(out))

    def _block(self, inplanes: int, planes: int, stride: int, downsample, dcn,
               first: bool) -> nn.Module:
        return Bottle2neck(inplanes, planes, stride, downsample, scales=self.scales,
                           base_width=self.base_width, base_channels=self.base_channels,
                           stage_type="stage" if first else "normal", dcn=dcn)
