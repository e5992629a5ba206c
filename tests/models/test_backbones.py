"""mmdetection's backbones: the ``[models.NAME.backbone]`` table, DCN v1/v2 against an
independent bilinear-sampling implementation, and strict loads of checkpoints whose keys and
shapes are written out here from mmdetection's / mmcv's module definitions."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from ldpipe.config import (BackboneConfig, ConfigError, ModelConfig, load_pipeline, resolve_backbone,
                           resolve_model)
from ldpipe.models.dcn import DeformConv2dPack, ModulatedDeformConv2dPack
from ldpipe.models.detector import backbone_label, build_backbone

from mmdet_layout import MMDET_TEACHERS, mmdet_backbone_keys


# ------------------------------------------------------------------ the table
def test_flat_keys_are_the_shorthand_of_a_plain_resnet(make_tiny_pipe):
    b = make_tiny_pipe().model("teacher").backbone  # flat depth=18, base_channels=8
    assert (b.type, b.depth, b.base_channels, b.dcn, b.frozen_stages, b.norm_eval) == \
        ("ResNet", 18, 8, None, -1, False)


def test_table_in_mmdetection_vocabulary(make_tiny_pipe):
    pipe = make_tiny_pipe(
        "models.teacher.depth=101",
        'models.teacher.backbone={type="ResNeXt", depth=101, groups=32, base_width=4, '
        'dcn={type="DCN", deform_groups=1, fallback_on_stride=false}, '
        'stage_with_dcn=[false, false, true, true], frozen_stages=1, norm_eval=true}')
    m = pipe.model("teacher")
    b = m.backbone
    assert (b.type, b.depth, b.groups, b.base_width, b.base_channels) == ("ResNeXt", 101, 32, 4, 8)
    assert b.dcn == {"type": "DCN", "deform_groups": 1, "fallback_on_stride": False}
    assert (b.frozen_stages, b.norm_eval, m.depth) == (1, True, 101)
    assert backbone_label(b) == "ResNeXt-101-32x4d-DCN(c4-c5)"
    r2 = make_tiny_pipe("models.teacher.depth=50", 'models.teacher.backbone.type="Res2Net"')
    b2 = r2.model("teacher").backbone
    assert (b2.scales, b2.base_width, b2.groups) == (4, 26, None)
    assert backbone_label(b2) == "Res2Net-50-26w4s"


def test_table_alone_sets_depth_and_width(tmp_path):
    """Without flat keys the table decides, and the flat keys follow it (what the manifest,
    the chain's summary and the benchmarks read)."""
    path = tmp_path / "p.toml"
    path.write_text('[data]\nformat = "coco"\n\n[models.teacher.backbone]\ntype = "ResNet"\n'
                    'depth = 101\nbase_channels = 16\ndcn = "DCNv2"\n'
                    'stage_with_dcn = [false, true, true, true]\n')
    m = load_pipeline(str(path)).model("teacher")
    assert (m.depth, m.base_channels, m.backbone.dcn["type"]) == (101, 16, "DCNv2")
    assert backbone_label(m.backbone) == "ResNet-101-DCNv2(c3-c5)"
    with pytest.raises(ConfigError, match="models.teacher.depth = 50 conflicts with "
                                          "models.teacher.backbone.depth = 101"):
        load_pipeline(str(path), ["models.teacher.depth=50"])


@pytest.mark.parametrize("overrides, words", [
    (["models.teacher.backbone.depth=101"],  # flat depth=18 given by the tiny overrides
     ["models.teacher.depth = 18", "models.teacher.backbone.depth = 101"]),
    (["models.teacher.backbone.base_channels=64"],
     ["models.teacher.base_channels = 8", "models.teacher.backbone.base_channels = 64"]),
    (["models.teacher.backbone.colour=1"], ["models.teacher.backbone.colour"]),
    (['models.teacher.backbone.type="VGG"'], ["models.teacher.backbone.type", "VGG"]),
    (['models.teacher.backbone.dcn="DCNv3"'], ["models.teacher.backbone.dcn.type", "DCNv3"]),
    (['models.teacher.backbone.dcn={type="DCN", groups=2}'], ["models.teacher.backbone.dcn.groups"]),
    (['models.teacher.backbone.dcn={type="DCN", fallback_on_stride=true}'], ["fallback_on_stride"]),
    (['models.teacher.backbone.dcn="DCN"'], ["models.teacher.backbone.dcn", "depth 18"]),
    (["models.teacher.backbone.groups=32"], ["models.teacher.backbone.groups", "ResNet"]),
    (["models.teacher.backbone.base_width=4"], ["models.teacher.backbone.base_width", "base_channels"]),
    (["models.teacher.depth=50", 'models.teacher.backbone={type="Res2Net", scales=1}'],
     ["models.teacher.backbone.scales", ">= 2"]),
    (["models.teacher.depth=34", 'models.teacher.backbone.type="ResNeXt"'],
     ["models.teacher.depth of a ResNeXt", "50|101", "34"]),
    (['models.teacher.backbone={type="ResNeXt", depth=18}'],  # equal to the flat key: no conflict
     ["models.teacher.backbone.depth of a ResNeXt", "got 18"]),
    (["models.teacher.depth=152"], ["models.teacher.depth of a ResNet", "18|34|50|101", "152"]),
    (["models.teacher.backbone.stage_with_dcn=[true]"], ["stage_with_dcn", "4 stages"]),
    (["models.teacher.backbone.frozen_stages=5"], ["frozen_stages", "5"]),
    (['models.teacher.backbone.norm_eval="yes"'], ["models.teacher.backbone.norm_eval"]),
])
def test_bad_backbone_tables_are_named(make_tiny_pipe, overrides, words):
    with pytest.raises(ConfigError) as err:
        make_tiny_pipe(*overrides)
    msg = str(err.value)
    assert "demo.toml" in msg
    for word in words:
        assert word in msg, (word, msg)


def test_resolution_is_idempotent_and_pretrained_sets_freezing():
    m = ModelConfig(depth=101, pretrained="w.pth")
    b = resolve_backbone(m)
    assert (b.depth, b.base_channels, b.frozen_stages, b.norm_eval) == (101, 64, 1, True)
    assert resolve_backbone(dataclasses.replace(m, backbone=b)) == b
    assert resolve_model(m).backbone == b and resolve_model(resolve_model(m)) == resolve_model(m)
    m2 = ModelConfig(backbone=BackboneConfig(frozen_stages=-1, norm_eval=False), pretrained="w.pth")
    assert (resolve_backbone(m2).frozen_stages, resolve_backbone(m2).norm_eval) == (-1, False)


# ------------------------------------------------------------------ DCN against a reference
def _bilinear(img: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """``img[:, y, x]`` by bilinear interpolation, zero outside the image (as mmcv's kernels:
    a point at or beyond one pixel outside samples nothing)."""
    c, h, w = img.shape
    out = torch.zeros(c, dtype=img.dtype)
    if y <= -1 or y >= h or x <= -1 or x >= w:
        return out
    y0, x0 = math.floor(y), math.floor(x)
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                out += wy * wx * img[:, yy, xx]
    return out


def reference_deform_conv(x, offset, weight, mask, stride, pad, dil, groups, deform_groups):
    """Deformable conv from mmcv's documented layout, by loops: per deform group ``g`` and tap
    ``k = i * kw + j`` the offset channels ``2 * (g * K + k)`` (dy) and ``+ 1`` (dx), the mask
    channel ``g * K + k``; output ``sum_k w_k * mask_k * x(p0 + p_k + offset_k)``."""
    b, cin, h, w = x.shape
    cout, cg, kh, kw = weight.shape
    K = kh * kw
    oh, ow = offset.shape[-2:]
    per_dg = cin // deform_groups
    cols = torch.zeros(b, cin, K, oh, ow, dtype=x.dtype)
    for n in range(b):
        for oy in range(oh):
            for ox in range(ow):
                for g in range(deform_groups):
                    chans = slice(g * per_dg, (g + 1) * per_dg)
                    for i in range(kh):
                        for j in range(kw):
                            k = i * kw + j
                            dy = float(offset[n, 2 * (g * K + k), oy, ox])
                            dx = float(offset[n, 2 * (g * K + k) + 1, oy, ox])
                            py = oy * stride - pad + i * dil + dy
                            px = ox * stride - pad + j * dil + dx
                            v = _bilinear(x[n, chans], py, px)
                            if mask is not None:
                                v = v * mask[n, g * K + k, oy, ox]
                            cols[n, chans, k, oy, ox] = v
    out = torch.zeros(b, cout, oh, ow, dtype=x.dtype)
    og = cout // groups
    for gi in range(groups):
        wg = weight[gi * og:(gi + 1) * og].reshape(og, cg * K)
        cg_cols = cols[:, gi * cg:(gi + 1) * cg].reshape(b, cg * K, oh * ow)
        out[:, gi * og:(gi + 1) * og] = torch.einsum("ok,bkp->bop", wg, cg_cols).reshape(b, og, oh, ow)
    return out


@pytest.mark.parametrize("modulated", [False, True])
@pytest.mark.parametrize("stride, groups, deform_groups", [(1, 1, 1), (2, 2, 2)])
def test_deform_conv_equals_bilinear_reference(modulated, stride, groups, deform_groups):
    torch.manual_seed(3)
    cls = ModulatedDeformConv2dPack if modulated else DeformConv2dPack
    conv = cls(4, 4, 3, stride=stride, padding=1, groups=groups, deform_groups=deform_groups).double()
    assert torch.count_nonzero(conv.conv_offset.weight) == 0  # mmcv zero-initialises the offsets
    with torch.no_grad():  # non-trivial offsets (up to a few pixels, some far outside) and masks
        conv.conv_offset.weight.normal_(0, 0.6)
        conv.conv_offset.bias.uniform_(-2.5, 2.5)
    x = torch.randn(2, 4, 6, 7, dtype=torch.float64)
    raw = conv.conv_offset(x).detach()
    if modulated:  # mmcv: o1, o2, mask = chunk(3); offset = cat(o1, o2); mask = sigmoid(mask)
        third = raw.shape[1] // 3
        offset, mask = raw[:, :2 * third], torch.sigmoid(raw[:, 2 * third:])
        assert raw.shape[1] == 3 * 9 * deform_groups
        assert 0.2 < float(mask.mean()) < 0.8 and float(mask.std()) > 0.1
    else:
        offset, mask = raw, None
        assert raw.shape[1] == 2 * 9 * deform_groups
    assert float(offset.abs().max()) > 3 and float((offset - offset.round()).abs().mean()) > 0.1
    want = reference_deform_conv(x, offset, conv.weight.detach(), mask, stride, 1, 1, groups, deform_groups)
    got = conv(x)
    assert got.shape == want.shape == (2, 4, 6 // stride, math.ceil(7 / stride))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    # with zero offsets (and, for v2, a mask of 0.5) it is the plain grouped conv
    with torch.no_grad():
        conv.conv_offset.weight.zero_()
        conv.conv_offset.bias.zero_()
    plain = torch.nn.functional.conv2d(x, conv.weight, None, stride, 1, 1, groups)
    torch.testing.assert_close(conv(x), plain * (0.5 if modulated else 1.0))


def test_deform_conv_gradients_reach_the_offsets():
    torch.manual_seed(0)
    conv = ModulatedDeformConv2dPack(4, 4, 3, padding=1)
    with torch.no_grad():
        conv.conv_offset.bias.uniform_(-1, 1)
    conv(torch.randn(1, 4, 5, 5)).square().sum().backward()
    assert conv.conv_offset.weight.grad.abs().sum() > 0 and conv.weight.grad.abs().sum() > 0


def _bilinear_coord_grad(img: torch.Tensor, y: float, x: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d/dy, d/dx)`` of :func:`_bilinear` by mmcv's ``get_coordinate_weight``: zero for a
    point outside the open box ``(-1, h) x (-1, w)`` (``<= -1`` included), else the derivative
    of the four-corner sum, corners outside the image counting 0."""
    c, h, w = img.shape
    zero = torch.zeros(c, dtype=img.dtype)
    if y <= -1 or y >= h or x <= -1 or x >= w:
        return zero, zero.clone()
    y0, x0 = math.floor(y), math.floor(x)
    ly, lx = y - y0, x - x0

    def v(yy, xx):
        return img[:, yy, xx] if 0 <= yy < h and 0 <= xx < w else zero
    d_y = (1 - lx) * (v(y0 + 1, x0) - v(y0, x0)) + lx * (v(y0 + 1, x0 + 1) - v(y0, x0 + 1))
    d_x = (1 - ly) * (v(y0, x0 + 1) - v(y0, x0)) + ly * (v(y0 + 1, x0 + 1) - v(y0 + 1, x0))
    return d_y, d_x


def reference_offset_grad(x, offset, weight, mask, grad_out, stride, pad, dil, groups, deform_groups):
    """mmcv's offset gradient of ``sum(grad_out * deform_conv(...))``, by loops: per tap, the
    coordinate weight of each input channel times ``sum_o grad_out[o] * w[o, c, tap]`` (times
    the mask for v2)."""
    b, cin, h, w = x.shape
    cout, cg, kh, kw = weight.shape
    K, og = kh * kw, cout // groups
    oh, ow = offset.shape[-2:]
    per_dg = cin // deform_groups
    grad = torch.zeros_like(offset)
    for n in range(b):
        for oy in range(oh):
            for ox in range(ow):
                for g in range(deform_groups):
                    for i in range(kh):
                        for j in range(kw):
                            k = i * kw + j
                            py = oy * stride - pad + i * dil + float(offset[n, 2 * (g * K + k), oy, ox])
                            px = ox * stride - pad + j * dil + float(offset[n, 2 * (g * K + k) + 1, oy, ox])
                            d_y, d_x = _bilinear_coord_grad(x[n, g * per_dg:(g + 1) * per_dg], py, px)
                            for c in range(g * per_dg, (g + 1) * per_dg):
                                gi = c // cg
                                a = float((grad_out[n, gi * og:(gi + 1) * og, oy, ox]
                                           * weight[gi * og:(gi + 1) * og, c - gi * cg, i, j]).sum())
                                if mask is not None:
                                    a *= float(mask[n, g * K + k, oy, ox].detach())
                                grad[n, 2 * (g * K + k), oy, ox] += a * float(d_y[c - g * per_dg])
                                grad[n, 2 * (g * K + k) + 1, oy, ox] += a * float(d_x[c - g * per_dg])
    return grad


def _offsets_on_the_boundary(shape, seed):
    """Offsets mixing mmcv's zero init (padding taps exactly at -1 and at H / W), integers
    (more points exactly on -1, on H / W and inside) and fractions."""
    gen = torch.Generator().manual_seed(seed)
    off = torch.randn(shape, generator=gen, dtype=torch.float64) * 1.5
    kind = torch.randint(0, 3, shape, generator=gen)
    return torch.where(kind == 0, 0.0, torch.where(kind == 1, off.round(), off))


@pytest.mark.parametrize("modulated", [False, True])
@pytest.mark.parametrize("stride, groups, deform_groups", [(1, 1, 1), (2, 2, 2)])
def test_deform_conv_gradients_equal_mmcvs_rule(modulated, stride, groups, deform_groups):
    """Offset gradients equal mmcv's kernels, including points exactly on -1 (where
    torchvision's own op returns a one-sided derivative); input, weight and mask gradients
    equal the differentiable reference's."""
    from torchvision.ops import deform_conv2d
    torch.manual_seed(5)
    cls = ModulatedDeformConv2dPack if modulated else DeformConv2dPack
    conv = cls(4, 4, 3, stride=stride, padding=1, groups=groups, deform_groups=deform_groups).double()
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    oh, ow = conv.conv_offset(x).shape[-2:]
    for offset0 in (torch.zeros(2, 18 * deform_groups, oh, ow, dtype=torch.float64),
                    _offsets_on_the_boundary((2, 18 * deform_groups, oh, ow), seed=stride)):
        offset = offset0.clone().requires_grad_(True)
        mask = (torch.rand(2, 9 * deform_groups, oh, ow, dtype=torch.float64) if modulated
                else None)
        if mask is not None:
            mask.requires_grad_(True)
        conv.offset_and_mask = lambda _x: (offset, mask)
        xg = x.clone().requires_grad_(True)
        out = conv(xg)
        grad_out = torch.randn_like(out)
        out.backward(grad_out)
        want = reference_offset_grad(x, offset0, conv.weight.detach(), mask, grad_out, stride, 1, 1,
                                     groups, deform_groups)
        torch.testing.assert_close(offset.grad, want, rtol=1e-9, atol=1e-9)
        # torchvision alone: equal off the -1 lines, one-sided (non-zero) on them
        tv_offset = offset0.clone().requires_grad_(True)
        deform_conv2d(x, tv_offset, conv.weight.detach(), None, stride, 1, 1,
                      None if mask is None else mask.detach()).backward(grad_out)
        differs = tv_offset.grad != offset.grad
        assert differs.any() and not offset.grad[differs].any()
        on_line = _on_minus_one(offset0, stride)
        assert not (differs & ~on_line).any()
        # the other gradients: the differentiable loop reference
        xr = x.clone().requires_grad_(True)
        wr = conv.weight.detach().clone().requires_grad_(True)
        mr = None if mask is None else mask.detach().clone().requires_grad_(True)
        reference_deform_conv(xr, offset0, wr, mr, stride, 1, 1, groups, deform_groups).backward(grad_out)
        torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(conv.weight.grad, wr.grad, rtol=1e-9, atol=1e-9)
        if mask is not None:
            torch.testing.assert_close(mask.grad, mr.grad, rtol=1e-9, atol=1e-9)
        conv.weight.grad = None


def _on_minus_one(offset, stride):
    """True on the dy channel of taps sampling at y == -1 and the dx channel of taps at x == -1
    (3x3, padding 1, dilation 1)."""
    n, c, oh, ow = offset.shape
    off = offset.reshape(n, c // 18, 3, 3, 2, oh, ow)
    y = (torch.arange(3)[:, None, None, None] + torch.arange(oh)[None, None, :, None] * stride - 1
         + off[:, :, :, :, 0])
    x = (torch.arange(3)[None, :, None, None] + torch.arange(ow)[None, None, None, :] * stride - 1
         + off[:, :, :, :, 1])
    return torch.stack((y == -1, x == -1), dim=4).reshape(offset.shape)


def test_zero_offsets_at_the_padding_get_no_offset_gradient():
    """mmcv's zero init: the top-row / left-column taps of output row / column 0 sample exactly
    at -1; mmcv gives them a zero offset gradient, torchvision's op the weighted values of row /
    column 0 (of the order of the other entries: not a rounding effect)."""
    from torchvision.ops import deform_conv2d
    torch.manual_seed(2)
    conv = DeformConv2dPack(3, 2, 3, padding=1).double()
    x = torch.randn(1, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    offset = torch.zeros(1, 18, 4, 5, dtype=torch.float64, requires_grad=True)
    conv.offset_and_mask = lambda _x: (offset, None)
    conv(x).sum().backward()
    tv = torch.zeros_like(offset, requires_grad=True)
    deform_conv2d(x.detach(), tv, conv.weight.detach(), padding=1).sum().backward()
    g, t = offset.grad.reshape(3, 3, 2, 4, 5), tv.grad.reshape(3, 3, 2, 4, 5)
    assert not g[0, :, 0, 0].any() and not g[:, 0, 1, :, 0].any()  # dy at y=-1, dx at x=-1: zero
    # torchvision: one-sided (the corner taps, also outside in x / y, are zero in both)
    assert t[0, 1, 0, 0].abs().min() > 0 and t[1, 0, 1, :, 0].abs().min() > 0
    assert float(t[0, 1, 0, 0].abs().mean()) > 0.1 * float(t.abs().max())
    # everywhere else the two agree bit for bit
    t[0, :, 0, 0] = 0
    t[:, 0, 1, :, 0] = 0
    assert torch.equal(g, t)
    # the module's own path (offsets from the zero-initialised conv_offset) applies the same rule
    conv2 = DeformConv2dPack(3, 2, 3, padding=1).double()
    conv2.weight.data.copy_(conv.weight.data)
    conv2(x.detach()).sum().backward()
    torch.testing.assert_close(conv2.conv_offset.bias.grad, offset.grad.sum(dim=(0, 2, 3)))


def _model_cfg(table: dict) -> ModelConfig:
    return resolve_model(ModelConfig(backbone=BackboneConfig(**table)))


@pytest.mark.parametrize("name", sorted(MMDET_TEACHERS))
def test_full_width_mmdet_layout_loads_strictly(name):
    """At mmdetection's widths: the backbone's names and shapes equal the hand-written layout,
    a state dict built from that layout loads with strict=True and its values land (the whole
    detector's file, neck and head included: tests/test_backbone_runs.py)."""
    table, layout = MMDET_TEACHERS[name]
    keys = {k.removeprefix("backbone."): v for k, v in mmdet_backbone_keys(**layout).items()}
    with torch.device("meta"):  # shapes only: the full-width R-101s cost no memory or init time
        model = build_backbone(_model_cfg(table).backbone)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(own) ^ set(keys)) == []
    assert {k: s for k, s in own.items() if keys[k] != s} == {}
    sd = {k: torch.full(shape, float(i), dtype=torch.long if k.endswith("tracked") else torch.float32)
          for i, (k, shape) in enumerate(keys.items())}
    model.load_state_dict(sd, strict=True, assign=True)
    own = model.state_dict()
    assert all(own[k].data_ptr() == v.data_ptr() for k, v in sd.items())  # every file tensor landed
    with pytest.raises(RuntimeError, match="conv_offset"):  # strict: a plain R-101 file is refused
        model.load_state_dict({k: v for k, v in sd.items() if "conv_offset" not in k}, strict=True)


def test_r101_dcn_spot_shapes():
    """A few of mmdetection's well-known R-101-DCN / X-101-32x4d-DCN / R2-101 shapes."""
    r = mmdet_backbone_keys(**MMDET_TEACHERS["R-101-DCN"][1])
    assert r["backbone.layer2.0.conv2.conv_offset.weight"] == (18, 128, 3, 3)
    assert r["backbone.layer3.22.conv2.weight"] == (256, 256, 3, 3)
    assert "backbone.layer1.0.conv2.conv_offset.weight" not in r
    x = mmdet_backbone_keys(**MMDET_TEACHERS["X-101-32x4d-DCN"][1])
    assert x["backbone.layer1.0.conv2.weight"] == (128, 4, 3, 3)
    assert x["backbone.layer4.2.conv2.weight"] == (1024, 32, 3, 3)
    assert x["backbone.layer4.2.conv2.conv_offset.weight"] == (18, 1024, 3, 3)
    assert "backbone.layer2.0.conv2.conv_offset.weight" not in x
    r2 = mmdet_backbone_keys(**MMDET_TEACHERS["R2-101-DCN"][1])
    assert r2["backbone.layer1.0.conv1.weight"] == (104, 64, 1, 1)
    assert r2["backbone.layer3.0.convs.2.conv_offset.weight"] == (18, 104, 3, 3)
    assert r2["backbone.layer1.0.downsample.1.weight"] == (256, 64, 1, 1)


def test_modules_are_mmdets():
    """conv2 is the DCN module in the DCN stages only; Res2Net's first blocks are 'stage'
    blocks (AvgPool on the last split when striding), the rest 'normal'; frozen_stages=1
    freezes Res2Net's deep stem and layer1."""
    r = build_backbone(_model_cfg(dict(depth=50, base_channels=8, dcn="DCNv2",
                                       stage_with_dcn=[False, True, False, True])).backbone)
    assert type(r.layer1[0].conv2) is torch.nn.Conv2d and type(r.layer3[5].conv2) is torch.nn.Conv2d
    assert isinstance(r.layer2[3].conv2, ModulatedDeformConv2dPack)
    assert isinstance(r.layer4[0].conv2, ModulatedDeformConv2dPack) and r.layer4[0].conv2.stride == (2, 2)
    assert r.layer4[0].conv2.bias is None
    r2 = build_backbone(_model_cfg(dict(type="Res2Net", depth=50, base_channels=8, base_width=4,
                                        frozen_stages=1)).backbone).train()
    assert [b.stage_type for b in r2.layer2] == ["stage", "normal", "normal", "normal"]
    assert hasattr(r2.layer2[0], "pool") and not hasattr(r2.layer1[0], "pool")
    assert isinstance(r2.layer2[0].downsample[0], torch.nn.AvgPool2d)
    assert not any(p.requires_grad for p in r2.stem.parameters())
    assert not any(p.requires_grad for p in r2.layer1.parameters())
    assert all(p.requires_grad for p in r2.layer2.parameters())
    assert not r2.stem[1].training and r2.layer2[0].bn1.training
    outs = r2(torch.randn(1, 3, 64, 64))
    assert [tuple(o.shape[1:]) for o in outs] == [(32, 16, 16), (64, 8, 8), (128, 4, 4), (256, 2, 2)]
