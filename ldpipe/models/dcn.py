"""Deformable convolution (DCN v1 and v2) laid out as mmcv's packed modules.

The ops are :func:`torchvision.ops.deform_conv2d`; the modules carry mmcv's parameter
names, so the ``conv2`` of an mmdetection DCN backbone loads unchanged:

- :class:`DeformConv2dPack` (mmcv's ``DCN``): ``weight`` (no bias) and ``conv_offset``, a
  3x3 conv (with bias, zero-initialised) giving ``2 * k * k * deform_groups`` offsets per
  output pixel, ordered ``[y0, x0, y1, x1, ...]`` per deform group (deform group major) -
  the layout torchvision's op reads.
- :class:`ModulatedDeformConv2dPack` (mmcv's ``DCNv2``): ``conv_offset`` gives
  ``3 * k * k * deform_groups`` channels, split as mmcv does: ``o1, o2, mask = chunk(3)``,
  ``offset = cat(o1, o2)``, ``mask = sigmoid(mask)``; ``bias`` only when asked for (ResNet: none).

Forward values are torchvision's, which equal mmcv's (bilinear sampling, zero for a point at
``y <= -1``, ``y >= H``, ``x <= -1`` or ``x >= W``).  The offset gradient follows mmcv's rule
(``deformable_col2im_coord`` in its CUDA and CPU kernels, v1 and v2): a sampling point outside
that open box ``(-1, H) x (-1, W)`` gets a zero offset gradient in both directions.
torchvision's kernel differs in one case only: a point exactly on ``y = -1`` (``x = -1``) gets
the one-sided derivative ``d/dy`` (``d/dx``), the value sampled on row (column) 0; everywhere
else outside the box its derivatives are zero too.  That case is common, not exotic: with
mmcv's zero-initialised ``conv_offset`` every tap of the top row / left column of a padded 3x3
kernel samples exactly at -1 in the first steps of training.  :class:`_MmcvBoundaryGrad` (identity forward) zeroes
those entries, so gradients equal mmcv's; inputs, weights and masks already did
(``tests/test_backbones.py`` checks all four against an independent implementation).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.modules.utils import _pair
from torchvision.ops import deform_conv2d


def outside_points(offset: torch.Tensor, height: int, width: int, kernel_size: tuple[int, int],
                   stride: tuple[int, int], padding: tuple[int, int],
                   dilation: tuple[int, int]) -> torch.Tensor:
    """Where mmcv's kernels zero the offset gradient: bool, the shape of ``offset``
    ``[N, deform_groups * 2 * kh * kw, Ho, Wo]``, true on both the ``dy`` and the ``dx`` channel of
    every tap whose sampling point ``(y, x)`` has ``y <= -1``, ``y >= height``, ``x <= -1`` or
    ``x >= width`` (input ``height`` x ``width``).  ``y = (oy * stride - pad + i * dilation) + dy``
    is formed as the kernels do: an integer plus the offset, one rounding in the offset's dtype."""
    n, c, oh, ow = offset.shape
    kh, kw = kernel_size
    off = offset.detach().reshape(n, c // (2 * kh * kw), kh, kw, 2, oh, ow)
    dev = offset.device
    base_y = ((torch.arange(kh, device=dev) * dilation[0])[:, None, None, None]
              + (torch.arange(oh, device=dev) * stride[0] - padding[0])[None, None, :, None])
    base_x = ((torch.arange(kw, device=dev) * dilation[1])[None, :, None, None]
              + (torch.arange(ow, device=dev) * stride[1] - padding[1])[None, None, None, :])
    y = base_y.to(off.dtype) + off[:, :, :, :, 0]  # [N, dg, kh, kw, Ho, Wo]
    x = base_x.to(off.dtype) + off[:, :, :, :, 1]
    out = (y <= -1) | (y >= height) | (x <= -1) | (x >= width)
    return out.unsqueeze(4).expand(off.shape).reshape(offset.shape)


class _MmcvBoundaryGrad(torch.autograd.Function):
    """Identity on the offsets; its backward zeroes the gradient at :func:`outside_points`,
    leaving every other entry bit for bit as torchvision computed it."""

    @staticmethod
    def forward(ctx, offset, height, width, kernel_size, stride, padding, dilation):
        ctx.save_for_backward(offset)
        ctx.geometry = (height, width, kernel_size, stride, padding, dilation)
        return offset.view_as(offset)

    @staticmethod
    def backward(ctx, grad):
        (offset,) = ctx.saved_tensors
        return (grad.masked_fill(outside_points(offset, *ctx.geometry), 0),
                None, None, None, None, None, None)


def _tracing() -> bool:
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()


class _DeformBase(nn.Module):
    offset_parts = 2  # channels of conv_offset per kernel tap and deform group

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 0, dilation: int = 1, groups: int = 1, deform_groups: int = 1,
                 bias: bool = False) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"channels {in_channels}->{out_channels} not divisible by groups {groups}")
        if in_channels % deform_groups:
            raise ValueError(f"in_channels {in_channels} not divisible by deform_groups {deform_groups}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.groups, self.deform_groups = groups, deform_groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_channels))
        else:
            self.register_parameter("bias", None)
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        taps = self.kernel_size[0] * self.kernel_size[1]
        self.conv_offset = nn.Conv2d(in_channels, deform_groups * self.offset_parts * taps,
                                     self.kernel_size, self.stride, self.padding, self.dilation, bias=True)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def offset_and_mask(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset, mask = self.offset_and_mask(x)
        if offset.requires_grad and torch.is_grad_enabled() and not _tracing():
            offset = _MmcvBoundaryGrad.apply(offset, x.shape[-2], x.shape[-1], self.kernel_size,
                                             self.stride, self.padding, self.dilation)
        # the op has no autocast rule: run it in the offset's dtype, as mmcv does
        x = x.to(offset.dtype)
        weight = self.weight.to(offset.dtype)
        bias = None if self.bias is None else self.bias.to(offset.dtype)
        return deform_conv2d(x, offset, weight, bias, self.stride, self.padding, self.dilation, mask)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, deform_groups={self.deform_groups}, bias={self.bias is not None}")


class DeformConv2dPack(_DeformBase):
    """mmcv's ``DeformConv2dPack`` (``type='DCN'``): offsets from ``conv_offset``, no bias."""

    offset_parts = 2

    def __init__(self, *args, bias: bool = False, **kwargs) -> None:
        if bias:
            raise ValueError("DeformConv2dPack has no bias (as mmcv's DeformConv2d)")
        super().__init__(*args, bias=False, **kwargs)

    def offset_and_mask(self, x):
        return self.conv_offset(x), None


class ModulatedDeformConv2dPack(_DeformBase):
    """mmcv's ``ModulatedDeformConv2dPack`` (``type='DCNv2'``): offsets and a sigmoid mask."""

    offset_parts = 3

    def offset_and_mask(self, x):
        o1, o2, mask = torch.chunk(self.conv_offset(x), 3, dim=1)
        return torch.cat((o1, o2), dim=1), torch.sigmoid(mask)


def build_dcn(dcn: dict, in_channels: int, out_channels: int, *, stride: int = 1, groups: int = 1,
              dilation: int = 1) -> nn.Module:
    """The 3x3 deformable conv of a bottleneck from mmdetection's ``dcn`` dict (no bias)."""
    cls = {"DCN": DeformConv2dPack, "DCNv2": ModulatedDeformConv2dPack}[dcn["type"]]
    return cls(in_channels, out_channels, 3, stride=stride, padding=dilation, dilation=dilation,
               groups=groups, deform_groups=int(dcn.get("deform_groups", 1)), bias=False)
