"""The GFL detector: ResNet / ResNeXt / Res2Net backbone + FPN neck + GFL or GFocalV2 head,
composed by hand.

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

from ..config import BackboneConfig, ModelConfig, is_resolved
from .anchors import grid_anchors
from .backbone import ResNet
from .checkpoint import load_weights
from .res2net import Res2Net
from .fpn import FPN
from .gfl_head import GFLHead
from .gfocal_head import GFocalHead

HEADS = {"GFLHead": GFLHead, "GFocalHead": GFocalHead}  # [models.NAME.head] type


@dataclass
class DenseOutput:
    """Per-anchor outputs of a batch on its anchor grid (row ``b * N + j``: image ``b``, anchor ``j``)."""

    cls: torch.Tensor  # [B, N, C] class logits of ``gfl_cls`` (sigmoid), float32
    reg: torch.Tensor  # [B, N, 4, reg_max + 1] edge-distribution logits, float32
    level_sizes: list[tuple[int, int]]  # (h, w) of each level's grid
    # [B, N, 1] GFocalV2's DGQP quality in (0, 1); None for GFL.  GFL: sigmoid(cls) is the
    # joint class-IoU score.  GFocalV2: sigmoid(cls) is the class score and the joint score
    # is sigmoid(cls) x quality (what QFL, the LD weights and the test path read).  The dump
    # and class KD read ``cls`` in both cases (docs/cache-format.md, section 3).
    quality: torch.Tensor | None = None
    # CrossKD: per level, the cls and reg towers' inputs to the held conv ([B, C, h, w] each);
    # None unless the forward was asked to hold them (GFL.forward(img, hold=idx))
    held: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
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

    def scores(self) -> torch.Tensor:
        """``[B, N, C]`` the detection scores: ``sigmoid(cls)``, times ``quality`` if present."""
        s = self.cls.sigmoid()
        return s if self.quality is None else s * self.quality

    def flat_scores(self) -> torch.Tensor:
        """``[B*N, C]`` :meth:`scores` from the flat views (made once, with gradients)."""
        if "scores" not in self._flat:
            s = self.flat_cls().sigmoid()
            self._flat["scores"] = s if self.quality is None else s * self.quality.reshape(-1, 1)
        return self._flat["scores"]

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
        self.backbone = build_backbone(cfg.backbone)
        if pretrained:
            self.backbone.load_pretrained(cfg.pretrained)
        self.neck = FPN(self.backbone.out_channels[1:], cfg.channels, num_extra=len(cfg.strides) - 3)
        self.bbox_head = build_head(cfg, num_classes)

    @property
    def strides(self) -> list[int]:
        return list(self.cfg.strides)

    @property
    def reg_bins(self) -> int:
        """Bins of one edge distribution (``reg_max + 1``)."""
        return self.bbox_head.reg_bins

    def forward(self, img: torch.Tensor, hold: int | None = None) -> DenseOutput:
        """Class and edge-distribution logits of every anchor, batch-flat; ``hold``: also the
        head towers' inputs to conv ``hold`` per level (``DenseOutput.held``, CrossKD)."""
        feats = self.neck(self.backbone(img)[1:])
        if hold is not None:
            cls_maps, reg_maps, held_cls, held_reg = self.bbox_head.forward_held(feats, hold)
            out = self._dense(img, [cls_maps, reg_maps])
            out.held = (held_cls, held_reg)
            return out
        return self._dense(img, self.bbox_head(feats))

    def _dense(self, img: torch.Tensor, maps) -> DenseOutput:
        cls_maps, reg_maps = maps[0], maps[1]
        b = img.shape[0]
        quality = flatten_levels(maps[2]).float() if len(maps) > 2 else None  # GFocalHead
        return DenseOutput(flatten_levels(cls_maps).float(),
                           flatten_levels(reg_maps).float().reshape(b, -1, 4, self.reg_bins),
                           [tuple(m.shape[-2:]) for m in cls_maps], quality)

    @torch.no_grad()
    def predict(self, img: torch.Tensor, img_shapes: list[tuple[int, int]]) -> list[dict]:
        """Detections in input coordinates per image: ``{'boxes', 'scores', 'labels'}``
        (``img_shapes``: each image's ``(h, w)`` before padding, ``SampleMeta.img_shape``;
        boxes are clipped to it)."""
        return self.postprocess(self(img), img_shapes)

    @torch.no_grad()
    def postprocess(self, out: DenseOutput, img_shapes: list[tuple[int, int]], test_cfg=None) -> list[dict]:
        """Detections of given outputs, with ``test_cfg`` (default: ``cfg.test``)."""
        anchors = [grid_anchors([hw], [s], self.cfg.anchor_scale, out.cls.device)[0]
                   for hw, s in zip(out.level_sizes, self.strides)]
        return self.bbox_head.predict(out, anchors, self.strides, img_shapes, test_cfg or self.cfg.test)


def build_head(cfg: ModelConfig, num_classes: int) -> GFLHead:
    """The head ``cfg.head.type`` names, from the model's flat head keys (and DGQP sizes)."""
    args = (num_classes, cfg.channels, cfg.channels, cfg.stacked_convs, cfg.reg_max,
            len(cfg.strides), cfg.norm_groups)
    if cfg.head.type == "GFocalHead":
        h = cfg.head
        return GFocalHead(*args, reg_topk=h.reg_topk, reg_channels=h.reg_channels, add_mean=h.add_mean)
    if cfg.head.align_channels:
        return HEADS[cfg.head.type](*args, align_channels=cfg.head.align_channels)
    return HEADS[cfg.head.type](*args)


def build_model(cfg: ModelConfig, num_classes: int) -> GFL:
    return GFL(cfg, num_classes)


# [models.NAME.backbone] type -> its builder (config.BACKBONE_TYPES names exactly these)
BACKBONES = {
    "ResNet": lambda b, common: ResNet(b.depth, b.base_channels, **common),
    "ResNeXt": lambda b, common: ResNet(b.depth, b.base_channels, groups=b.groups,
                                        base_width=b.base_width, **common),
    "Res2Net": lambda b, common: Res2Net(b.depth, b.base_channels, scales=b.scales,
                                         base_width=b.base_width, **common),
}


def load_detector(cfg: ModelConfig, num_classes: int, checkpoint: str | None,
                  device: torch.device, obj: dict | None = None) -> tuple[GFL, dict]:
    """The one way every runner gets a trained model: built from ``cfg``, the weights of
    ``checkpoint`` loaded strictly (``None``: keep the initialisation, benchmarks), moved to
    ``device`` and put in eval mode; returns it and the checkpoint's ``meta``.  ``obj``: the
    file's :func:`~ldpipe.models.checkpoint.load_file` dict when the caller read it already
    (a file is read once)."""
    model = build_model(cfg, num_classes)
    meta = load_weights(model, checkpoint, obj) if checkpoint else {}
    return model.to(device).eval(), meta


def build_backbone(b: BackboneConfig) -> ResNet:
    """The backbone of a resolved ``[models.NAME.backbone]`` table: a loaded model's, or one
    that went through :func:`ldpipe.config.resolve_model` (a config built in code)."""
    if not is_resolved(b):
        raise ValueError("the model's backbone is not resolved: load the config with "
                         "ldpipe.config.load_pipeline, or pass a ModelConfig built in code through "
                         "ldpipe.config.resolve_model")
    common = dict(frozen_stages=b.frozen_stages, norm_eval=b.norm_eval, dcn=b.dcn,
                  stage_with_dcn=tuple(b.stage_with_dcn))
    return BACKBONES[b.type](b, common)


def backbone_label(b: BackboneConfig) -> str:
    """mmdetection's model-zoo name of a resolved backbone: ``ResNeXt-101-32x4d-DCN(c4-c5)``."""
    name = f"{b.type}-{b.depth}"
    if b.type == "ResNeXt":
        name += f"-{b.groups}x{b.base_width}d"
    elif b.type == "Res2Net":
        name += f"-{b.base_width}w{b.scales}s"
    stages = [i + 2 for i, on in enumerate(b.stage_with_dcn) if on]
    if b.dcn is not None and stages:
        span = f"c{stages[0]}" if len(stages) == 1 else f"c{stages[0]}-c{stages[-1]}"
        name += f"-{b.dcn['type']}({span})"
    return name
