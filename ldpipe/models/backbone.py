"""ResNet and ResNeXt backbones with mmdetection's parameter names, freezing and DCN.

Parameter names are mmdetection's ``ResNet`` / ``ResNeXt`` names (``conv1``, ``bn1``,
``layer1.0.conv1``, ``layer3.0.downsample.0``, ...; also torchvision's), so ``backbone.*``
keys of an mmdetection checkpoint load unchanged.  With ``dcn`` the ``conv2`` of every
bottleneck in the stages of ``stage_with_dcn`` is mmcv's packed deformable conv
(``conv2.weight``, ``conv2.conv_offset.{weight,bias}``; :mod:`.dcn`), as mmdetection's
``Bottleneck`` does.  ``base_channels`` (mmdetection's name; 64 = the standard network)
scales every stage to make CPU-sized models for tests and demos.  Res2Net: :mod:`.res2net`.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from .dcn import build_dcn

STAGE_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
NO_DCN = (False, False, False, False)


class Bottleneck(nn.Module):
    """mmdetection's ResNet / ResNeXt ``Bottleneck`` ("pytorch" style: stride on conv2).

    Inner width: ``planes`` when ``groups == 1``, else
    ``floor(planes * base_width / base_channels) * groups`` (mmdetection's ResNeXt);
    ``conv2`` is grouped, and deformable when ``dcn`` is given.
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, *, groups: int = 1, base_width: int = 4,
                 base_channels: int = 64, dcn: dict | None = None) -> None:
        super().__init__()
        width = planes if groups == 1 else math.floor(planes * base_width / base_channels) * groups
        # creation order as torchvision's Bottleneck (same initial weights for a given seed)
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        if dcn is None:
            self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=groups, bias=False)
        else:
            self.conv2 = build_dcn(dcn, width, width, stride=stride, groups=groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet-18/34/50/101 (and ResNeXt with ``groups > 1``) returning C2..C5.

    Args:
        depth: 18, 34, 50 or 101.
        base_channels: channels of the stem and first stage (mmdetection's name; 64).
        frozen_stages: stem and stages ``1..frozen_stages`` get no gradient and keep their
            BatchNorm in eval mode (mmdetection's GFL configs use 1); -1 freezes nothing.
        norm_eval: keep every BatchNorm in eval mode while training, as mmdetection does
            with pretrained weights.
        groups, base_width: ResNeXt's cardinality and width per group (``groups=1``: ResNet).
        dcn: mmdetection's ``dcn`` dict (``{"type": "DCN"|"DCNv2", "deform_groups": n}``) or None.
        stage_with_dcn: which of the 4 stages get deformable ``conv2`` s.
    """

    def __init__(self, depth: int = 50, base_channels: int = 64, frozen_stages: int = -1,
                 norm_eval: bool = False, *, groups: int = 1, base_width: int = 4,
                 dcn: dict | None = None, stage_with_dcn=NO_DCN) -> None:
        super().__init__()
        if depth not in STAGE_BLOCKS:
            raise ValueError(f"ResNet depth must be one of {sorted(STAGE_BLOCKS)}, got {depth}")
        if dcn is not None and depth < 50:
            raise ValueError(f"DCN needs a Bottleneck ResNet (depth >= 50), got depth {depth}")
        self.depth = depth
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.groups, self.base_width, self.base_channels = groups, base_width, base_channels
        self.block = self._block_class(depth)
        self.inplanes = base_channels
        self._make_stem(base_channels)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        for i, blocks in enumerate(STAGE_BLOCKS[depth]):
            stage_dcn = dcn if stage_with_dcn[i] else None
            self.add_module(f"layer{i + 1}", self._make_layer(base_channels * 2 ** i, blocks,
                                                              1 if i == 0 else 2, stage_dcn))
        self.out_channels = [base_channels * 2 ** i * self.block.expansion for i in range(4)]
        offsets = {id(m.conv_offset) for m in self.modules() if hasattr(m, "conv_offset")}
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and id(m) not in offsets:  # offsets stay zero (mmdet)
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self._freeze()

    # ------------------------------------------------------------ building
    def _make_stem(self, channels: int) -> None:
        self.conv1 = nn.Conv2d(3, channels, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def _stem_modules(self) -> list[nn.Module]:
        return [self.conv1, self.bn1]

    def _block_class(self, depth: int) -> type:
        return BasicBlock if depth < 50 else Bottleneck

    def _block(self, inplanes: int, planes: int, stride: int, downsample, dcn,
               first: bool) -> nn.Module:
        if self.block is BasicBlock:
            return BasicBlock(inplanes, planes, stride, downsample)
        return Bottleneck(inplanes, planes, stride, downsample, groups=self.groups,
                          base_width=self.base_width, base_channels=self.base_channels, dcn=dcn)

    def _downsample(self, planes: int, stride: int) -> nn.Module:
        out = planes * self.block.expansion
        return nn.Sequential(nn.Conv2d(self.inplanes, out, 1, stride=stride, bias=False),
                             nn.BatchNorm2d(out))

    def _make_layer(self, planes: int, blocks: int, stride: int, dcn) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * self.block.expansion:
            downsample = self._downsample(planes, stride)
        layers = [self._block(self.inplanes, planes, stride, downsample, dcn, True)]
        self.inplanes = planes * self.block.expansion
        layers += [self._block(self.inplanes, planes, 1, None, dcn, False) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    # ------------------------------------------------------------ freezing
    def _freeze(self) -> None:
        if self.frozen_stages >= 0:
            for m in self._stem_modules():
                for p in m.parameters():
                    p.requires_grad_(False)
        for i in range(1, self.frozen_stages + 1):
            for p in getattr(self, f"layer{i}").parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> "ResNet":
        super().train(mode)
        if mode:
            if self.frozen_stages >= 0:
                for m in self._stem_modules():
                    m.eval()
            for i in range(1, self.frozen_stages + 1):
                getattr(self, f"layer{i}").eval()
            if self.norm_eval:
                for m in self.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
        return self

    # ------------------------------------------------------------ running
    def _stem_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(self.conv1(x)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self._stem_forward(x))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c2, c3, c4, c5]

    def load_pretrained(self, path: str) -> None:
        """Load ImageNet weights from a local torchvision/mmcls-style file (fc dropped)."""
        from .checkpoint import load_state_dict_file

        state = load_state_dict_file(path)
        state = {k.removeprefix("backbone."): v for k, v in state.items()
                 if not k.startswith("fc.")}
        missing, unexpected = self.load_state_dict(state, strict=False)
        # ImageNet weights have no DCN offsets: those stay zero (a plain conv at the start)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")
                   and ".conv_offset." not in k]
        if unexpected or missing:
            raise ValueError(f"{path}: does not match {type(self).__name__}-{self.depth} "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")

