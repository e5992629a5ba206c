"""mmdetection 2.x's GFL checkpoint layouts, written out by hand from its module definitions
(mmdet/models/backbones/{resnet,resnext,res2net}.py with ResLayer / Res2Layer, mmcv's
DeformConv2dPack / ModulatedDeformConv2dPack, FPN and GFLHead) - independent of ldpipe's
modules, for the strict-load tests; and a whole GFL (ResNet + FPN + GFLHead) state dict with
random values in an mmdetection checkpoint's wrapping."""
from __future__ import annotations

import math

import torch


def _bn_keys(keys: dict, prefix: str, c: int) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        keys[f"{prefix}.{name}"] = (c,)
    keys[f"{prefix}.num_batches_tracked"] = ()


def _conv2_keys(keys: dict, prefix: str, width: int, groups: int, dcn: str | None, dg: int = 1) -> None:
    """mmcv: DeformConv2dPack / ModulatedDeformConv2dPack(width, width, 3, groups, bias=False)
    = weight [out, in/groups, 3, 3] + conv_offset Conv2d(in, dg * {2,3} * 9, 3, bias=True)."""
    keys[f"{prefix}.weight"] = (width, width // groups, 3, 3)
    if dcn:
        parts = 2 if dcn == "DCN" else 3
        keys[f"{prefix}.conv_offset.weight"] = (dg * parts * 9, width, 3, 3)
        keys[f"{prefix}.conv_offset.bias"] = (dg * parts * 9,)


def mmdet_backbone_keys(kind: str, depth: int, base: int = 64, groups: int = 1, base_width: int = 4,
                        scales: int = 4, dcn: str | None = None, stages=(False,) * 4) -> dict:
    """``backbone.*`` names and shapes of mmdetection 2.x's ResNet / ResNeXt / Res2Net
    (mmdet/models/backbones/{resnet,resnext,res2net}.py, ResLayer / Res2Layer), by hand."""
    blocks = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
    keys: dict = {}
    if kind == "Res2Net":  # deep stem: 3x3 convs stem.0/3/6 (base/2, base/2, base), BNs stem.1/4/7
        for conv, bn, cin, cout in ((0, 1, 3, base // 2), (3, 4, base // 2, base // 2), (6, 7, base // 2, base)):
            keys[f"stem.{conv}.weight"] = (cout, cin, 3, 3)
            _bn_keys(keys, f"stem.{bn}", cout)
    else:
        keys["conv1.weight"] = (base, 3, 7, 7)
        _bn_keys(keys, "bn1", base)
    inplanes = base
    for i, n in enumerate(blocks):
        planes = base * 2 ** i
        stage_dcn = dcn if stages[i] else None
        for j in range(n):
            p = f"layer{i + 1}.{j}"
            if kind == "Res2Net":
                width = math.floor(planes * base_width / base)
                keys[f"{p}.conv1.weight"] = (width * scales, inplanes, 1, 1)
                _bn_keys(keys, f"{p}.bn1", width * scales)
                for s in range(scales - 1):
                    _conv2_keys(keys, f"{p}.convs.{s}", width, 1, stage_dcn)
                    _bn_keys(keys, f"{p}.bns.{s}", width)
                keys[f"{p}.conv3.weight"] = (planes * 4, width * scales, 1, 1)
            else:
                width = planes if groups == 1 else math.floor(planes * base_width / base) * groups
                keys[f"{p}.conv1.weight"] = (width, inplanes, 1, 1)
                _bn_keys(keys, f"{p}.bn1", width)
                _conv2_keys(keys, f"{p}.conv2", width, groups, stage_dcn)
                _bn_keys(keys, f"{p}.bn2", width)
                keys[f"{p}.conv3.weight"] = (planes * 4, width, 1, 1)
            _bn_keys(keys, f"{p}.bn3", planes * 4)
            if j == 0:  # Res2Layer: AvgPool (no weights) at downsample.0, then conv and BN
                d = 1 if kind == "Res2Net" else 0
                keys[f"{p}.downsample.{d}.weight"] = (planes * 4, inplanes, 1, 1)
                _bn_keys(keys, f"{p}.downsample.{d + 1}", planes * 4)
            inplanes = planes * 4
    return {f"backbone.{k}": v for k, v in keys.items()}


def mmdet_gfl_keys(backbone: dict, base: int = 64, channels: int = 256, stacked: int = 4,
                   num_classes: int = 3, reg_max: int = 16) -> dict:
    """Backbone keys + mmdetection's FPN (start_level 1, add_extra_convs 'on_output', 5 outs) and GFLHead."""
    keys = dict(backbone)
    for i, cin in enumerate([base * 2 ** i * 4 for i in (1, 2, 3)]):
        keys[f"neck.lateral_convs.{i}.conv.weight"] = (channels, cin, 1, 1)
        keys[f"neck.lateral_convs.{i}.conv.bias"] = (channels,)
    for i in range(5):
        keys[f"neck.fpn_convs.{i}.conv.weight"] = (channels, channels, 3, 3)
        keys[f"neck.fpn_convs.{i}.conv.bias"] = (channels,)
        keys[f"bbox_head.scales.{i}.scale"] = ()
    for tower in ("cls_convs", "reg_convs"):
        for i in range(stacked):
            keys[f"bbox_head.{tower}.{i}.conv.weight"] = (channels, channels, 3, 3)
            keys[f"bbox_head.{tower}.{i}.gn.weight"] = (channels,)
            keys[f"bbox_head.{tower}.{i}.gn.bias"] = (channels,)
    keys["bbox_head.gfl_cls.weight"] = (num_classes, channels, 3, 3)
    keys["bbox_head.gfl_cls.bias"] = (num_classes,)
    keys["bbox_head.gfl_reg.weight"] = (4 * (reg_max + 1), channels, 3, 3)
    keys["bbox_head.gfl_reg.bias"] = (4 * (reg_max + 1),)
    keys["bbox_head.integral.project"] = (reg_max + 1,)
    return keys


def fill_state_dict(keys: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Tensors of the given shapes with values a network can run on (He-scaled convs,
    BN statistics near 1, small DCN offsets, GFL's integral)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in keys.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(1000, dtype=torch.long)
        elif k.endswith("integral.project"):
            sd[k] = torch.linspace(0, shape[0] - 1, shape[0])
        elif k.endswith(".scale"):
            sd[k] = torch.tensor(1.0)
        elif "conv_offset" in k:
            sd[k] = torch.randn(shape, generator=g) * (0.01 if k.endswith("weight") else 0.5)
        elif len(shape) == 4:
            sd[k] = torch.randn(shape, generator=g) * math.sqrt(2.0 / (shape[1] * shape[2] * shape[3]))
        elif k.endswith(("running_var", ".weight")):
            sd[k] = torch.rand(shape, generator=g) * 0.5 + 0.5
        else:
            sd[k] = torch.randn(shape, generator=g) * 0.1
    if "bbox_head.gfl_cls.bias" in sd:  # scores near 0.5: random weights still detect something
        sd["bbox_head.gfl_cls.bias"].zero_()
    return sd


# (pipeline's [models.X.backbone] table, mmdetection's layout) of the LD tables' teachers
MMDET_TEACHERS = {
    "R-101-DCN": (dict(type="ResNet", depth=101, dcn={"type": "DCN", "deform_groups": 1},
                       stage_with_dcn=[False, True, True, True]),
                  dict(kind="ResNet", depth=101, dcn="DCN", stages=(False, True, True, True))),
    "X-101-32x4d-DCN": (dict(type="ResNeXt", depth=101, groups=32, base_width=4, dcn="DCN",
                             stage_with_dcn=[False, False, True, True]),
                        dict(kind="ResNeXt", depth=101, groups=32, base_width=4, dcn="DCN",
                             stages=(False, False, True, True))),
    "R2-101-DCN": (dict(type="Res2Net", depth=101, scales=4, base_width=26, dcn="DCN",
                        stage_with_dcn=[False, True, True, True]),
                   dict(kind="Res2Net", depth=101, scales=4, base_width=26, dcn="DCN",
                        stages=(False, True, True, True))),
    "R2-50-DCNv2": (dict(type="Res2Net", depth=50, dcn="DCNv2", stage_with_dcn=[False, False, True, True]),
                    dict(kind="Res2Net", depth=50, base_width=26, dcn="DCNv2", stages=(False, False, True, True))),
}


# ------------------------------------------------ a whole GFL state dict, random values
def _bn(sd: dict, prefix: str, c: int) -> None:
    sd[f"{prefix}.weight"] = torch.rand(c) + 0.5
    sd[f"{prefix}.bias"] = torch.randn(c)
    sd[f"{prefix}.running_mean"] = torch.randn(c)
    sd[f"{prefix}.running_var"] = torch.rand(c) + 0.5
    sd[f"{prefix}.num_batches_tracked"] = torch.tensor(12345, dtype=torch.long)


def mmdet_gfl_state_dict(depth: int = 50, width: int = 64, channels: int = 256,
                         stacked: int = 4, num_classes: int = 3, reg_max: int = 16,
                         num_outs: int = 5) -> dict[str, torch.Tensor]:
    """An mmdetection GFL (ResNet + FPN + GFLHead) state_dict, names and shapes by hand."""
    g = torch.Generator().manual_seed(depth + num_classes)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    sd: dict[str, torch.Tensor] = {}
    bottleneck = depth >= 50
    expansion = 4 if bottleneck else 1
    blocks = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
    sd["backbone.conv1.weight"] = rnd(width, 3, 7, 7)
    _bn(sd, "backbone.bn1", width)
    inplanes = width
    stage_out = []
    for i, n in enumerate(blocks):
        planes = width * 2 ** i
        for j in range(n):
            p = f"backbone.layer{i + 1}.{j}"
            if bottleneck:
                convs = [(planes, inplanes, 1), (planes, planes, 3), (planes * 4, planes, 1)]
            else:
                convs = [(planes, inplanes, 3), (planes, planes, 3)]
            for c, (o, cin, k) in enumerate(convs, 1):
                sd[f"{p}.conv{c}.weight"] = rnd(o, cin, k, k)
                _bn(sd, f"{p}.bn{c}", o)
            if j == 0 and (i > 0 or inplanes != planes * expansion):
                sd[f"{p}.downsample.0.weight"] = rnd(planes * expansion, inplanes, 1, 1)
                _bn(sd, f"{p}.downsample.1", planes * expansion)
            inplanes = planes * expansion
        stage_out.append(inplanes)
    for i, cin in enumerate(stage_out[1:]):  # start_level = 1
        sd[f"neck.lateral_convs.{i}.conv.weight"] = rnd(channels, cin, 1, 1)
        sd[f"neck.lateral_convs.{i}.conv.bias"] = rnd(channels)
    for i in range(num_outs):
        sd[f"neck.fpn_convs.{i}.conv.weight"] = rnd(channels, channels, 3, 3)
        sd[f"neck.fpn_convs.{i}.conv.bias"] = rnd(channels)
    for tower in ("cls_convs", "reg_convs"):
        for i in range(stacked):
            sd[f"bbox_head.{tower}.{i}.conv.weight"] = rnd(channels, channels, 3, 3)
            sd[f"bbox_head.{tower}.{i}.gn.weight"] = rnd(channels)
            sd[f"bbox_head.{tower}.{i}.gn.bias"] = rnd(channels)
    sd["bbox_head.gfl_cls.weight"] = rnd(num_classes, channels, 3, 3)
    sd["bbox_head.gfl_cls.bias"] = rnd(num_classes)
    sd["bbox_head.gfl_reg.weight"] = rnd(4 * (reg_max + 1), channels, 3, 3)
    sd["bbox_head.gfl_reg.bias"] = rnd(4 * (reg_max + 1))
    for i in range(num_outs):
        sd[f"bbox_head.scales.{i}.scale"] = torch.tensor(1.0 + 0.1 * i)
    sd["bbox_head.integral.project"] = torch.linspace(0, reg_max, reg_max + 1)
    return sd


def mmdet_checkpoint(sd: dict) -> dict:
    return {
        "meta": {"CLASSES": ("RBC", "WBC", "Platelets"), "epoch": 12, "iter": 3000,
                 "mmcv_version": "1.7.0", "mmdet_version": "2.28.2",
                 "config": "model = dict(type='GFL', ...)"},
        "state_dict": sd,
        "optimizer": {"state": {0: {"momentum_buffer": torch.zeros(4)}},
                      "param_groups": [{"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4,
                                        "params": [0]}]},
    }
