"""ResNet backbone from torchvision's blocks, with mmdetection's names and freezing.

Parameter names are torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``, ...),
which are also mmdetection's ``ResNet`` names, so ``backbone.*`` keys of an
mmdetection checkpoint load unchanged.  ``base_width`` scales every stage
(64 = the standard network) to make CPU-sized models for tests and demos.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

_ARCH = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}


class ResNet(nn.Module):
    """ResNet-18/34/50/101 returning the C2..C5 feature maps.

    Args:
        depth: 18, 34, 50 or 101.
        base_width: channels of the stem and first stage (64 in torchvision).
        frozen_stages: stem and stages ``1..frozen_stages`` get no gradient
            (mmdetection's GFL config uses 1 with ImageNet weights); -1 freezes nothing.
        norm_eval: keep BatchNorm layers in eval mode while training (statistics
            and affine parameters frozen), as mmdetection does with pretrained weights.
    """

    def __init__(self, depth: int = 50, base_width: int = 64, frozen_stages: int = -1,
                 norm_eval: bool = False) -> None:
        super().__init__()
        if depth not in _ARCH:
            raise ValueError(f"ResNet depth must be one of {sorted(_ARCH)}, got {depth}")
        block, layers = _ARCH[depth]
        self.depth = depth
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.inplanes = base_width
        self.conv1 = nn.Conv2d(3, base_width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, base_width, layers[0], stride=1)
        self.layer2 = self._make_layer(block, base_width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, base_width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, base_width * 8, layers[3], stride=2)
        self.out_channels = [base_width * m * block.expansion for m in (1, 2, 4, 8)]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self._freeze()

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        # torchvision's Bottleneck derives its inner width from base_width/64.
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _freeze(self) -> None:
        if self.frozen_stages >= 0:
            for m in (self.conv1, self.bn1):
                for p in m.parameters():
                    p.requires_grad_(False)
        for i in range(1, self.frozen_stages + 1):
            for p in getattr(self, f"layer{i}").parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> "ResNet":
        super().train(mode)
        if mode:
            if self.frozen_stages >= 0:
                self.bn1.eval()
            for i in range(1, self.frozen_stages + 1):
                getattr(self, f"layer{i}").eval()
            if self.norm_eval:
                for m in self.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
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
        if unexpected or [k for k in missing if not k.endswith("num_batches_tracked")]:
            raise ValueError(f"{path}: does not match ResNet-{self.depth} "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
