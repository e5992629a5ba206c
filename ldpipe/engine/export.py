"""``ldpipe export``: a checkpoint for deployment.

* ``pth`` - ``{'meta', 'state_dict'}`` only (no optimizer, scheduler or loop state); loads
  back with :func:`ldpipe.models.checkpoint.load_weights` like any checkpoint.
* ``safetensors`` - the same tensors in the safetensors format (nothing in it can execute),
  the ``meta`` dict as JSON in its metadata; the same loader reads it.
* ``onnx`` - the model's own forward (:meth:`ldpipe.models.GFL.forward`, its
  :class:`~ldpipe.models.detector.DenseOutput`) as named tensors over the ``N`` anchors of
  the batch's grid (level by level, strides ascending, row-major within a level; level
  ``s`` has ``ceil(H/s) x ceil(W/s)`` anchors), all float32 (:data:`ONNX_OUTPUTS`):

  - ``cls`` ``[B, N, C]``: the ``gfl_cls`` class logits (``DenseOutput.cls``);
  - ``reg`` ``[B, N, 4, reg_max + 1]``: the edge-distribution logits, edges left, top,
    right, bottom (``DenseOutput.reg``);
  - ``quality`` ``[B, N, 1]``: GFocalV2's DGQP quality in (0, 1) (``DenseOutput.quality``;
    ``GFocalHead`` models only);
  - ``scores`` ``[B, N, C]``: the detection scores ``DenseOutput.scores()`` - ``sigmoid(cls)``
    for GFL, ``sigmoid(cls) x quality`` for GFocalV2 - what the test path ranks.

  Box decoding and NMS stay in Python (:meth:`ldpipe.models.GFL.predict`).  Batch, height
  and width are dynamic (height and width multiples of 32, as the data pipeline pads them).
  The graph's metadata records classes, head type, strides, ``reg_max``, ``anchor_scale``,
  the output names and the input normalisation.  Before the file is put in place,
  onnxruntime runs it on two inputs of different sizes and every output must equal torch's
  (:class:`DenseTensors`, the wrapper that was exported) within ``atol`` (1e-4; relative to
  the output's largest magnitude where that exceeds 1), else an :class:`ExportError` and no
  file.  The graph is traced by torch's TorchScript exporter
  (``dynamo=False``; deprecated since torch 2.9 but quicker: measured on the 2-core AMD EPYC,
  torch 2.14.1, the export call for a ResNet-18 width-8 model took 2.7 s against 22 s, and
  the whole ``ldpipe export`` of the demo teacher 53 s against 119 s on the loaded machine);
  ``dynamo=True`` (``--dynamo``) uses the torch.export-based exporter, which needs
  ``onnxscript``.  Either is checked the same way.

``fp16`` halves the floating-point tensors of ``pth`` / ``safetensors`` exports (the loader
casts them back into the model's float32 parameters).
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile

import numpy as np
import torch
from torch import nn

from ..config import DataConfig, Pipeline, to_dict
from ..files import blocking_file, location_relation
from ..models import GFL
from ..models.checkpoint import SAFETENSORS_META, CheckpointError, file_sha256
from .predict import open_detector

log = logging.getLogger("ldpipe.export")

FORMATS = ("pth", "safetensors", "onnx")
SUFFIXES = {".pth": "pth", ".pt": "pth", ".safetensors": "safetensors", ".onnx": "onnx"}
ONNX_ATOL = 1e-4
ONNX_OPSET = 18


class ExportError(CheckpointError):
    """An export that cannot be made or does not reproduce the model; the message says why."""


def export_format(out: str, fmt: str | None) -> str:
    """``fmt``, or the format named by the suffix of ``out``."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise ExportError(f"unknown export format {fmt!r} (choose from {', '.join(FORMATS)})")
        return fmt
    suffix = os.path.splitext(out)[1].lower()
    if suffix not in SUFFIXES:
        raise ExportError(f"cannot tell the export format of {out} from its suffix; give --format "
                          f"({', '.join(FORMATS)})")
    return SUFFIXES[suffix]


#: the ONNX outputs of each head type, in order (shapes in the module docstring)
ONNX_OUTPUTS = {"GFLHead": ("cls", "reg", "scores"), "GFocalHead": ("cls", "reg", "quality", "scores")}


class DenseTensors(nn.Module):
    """:meth:`GFL.forward` as a tuple of tensors (``torch.onnx`` exports tensors, not a
    :class:`~ldpipe.models.detector.DenseOutput`): :meth:`output_names` in order."""

    def __init__(self, model: GFL) -> None:
        super().__init__()
        self.model = model

    def output_names(self) -> list[str]:
        return list(ONNX_OUTPUTS[self.model.cfg.head.type])

    def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``img`` ``[B, 3, H, W]`` -> ``cls`` ``[B, N, C]``, ``reg`` ``[B, N, 4, reg_max + 1]``,
        (``quality`` ``[B, N, 1]``,) ``scores`` ``[B, N, C]``."""
        out = self.model(img)
        return (out.cls, out.reg, *(() if out.quality is None else (out.quality,)), out.scores())


def _slim_state(model: nn.Module, fp16: bool) -> dict[str, torch.Tensor]:
    return {k: (v.half() if fp16 and v.is_floating_point() else v).detach().cpu().contiguous().clone()
            for k, v in model.state_dict().items()}


def _meta(pipe: Pipeline, model_name: str, classes: list[str], src_meta: dict, checkpoint: str,
          fmt: str, fp16: bool) -> dict:
    meta = dict(src_meta)
    own = dict(meta.get("ldpipe") or {})
    own.setdefault("model", model_name)
    own.setdefault("config", to_dict(pipe.model(model_name)))
    own.setdefault("classes", classes)
    meta["ldpipe"] = own
    meta["export"] = {"from": os.path.abspath(checkpoint), "from_sha256": file_sha256(checkpoint),
                      "format": fmt, "fp16": fp16}
    return meta


def _need(modules: list[str], extra: str, what: str) -> None:
    import importlib.util
    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    if absent:
        raise ExportError(f"{what} needs {', '.join(absent)} (pip install 'ldpipe[{extra}]')")


def check_inputs(data: DataConfig, seed: int = 0) -> list[torch.Tensor]:
    """Two inputs of different batch and padded size: ``data``'s test scale's padded square
    and a larger landscape one (normalised-image-like values)."""
    d = data.pad_divisor
    side = int(math.ceil(min(data.test_scale) / d) * d)
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 3, side, side, generator=gen),
            torch.randn(2, 3, side + d, side + 2 * d, generator=gen)]


def verify_onnx(maps: DenseTensors, path: str, inputs: list[torch.Tensor], atol: float = ONNX_ATOL) -> float:
    """The largest ``|onnxruntime - torch|`` over every output and input; an
    :class:`ExportError` naming the output and input when it exceeds ``atol`` (times the
    output's largest magnitude where that is over 1: float32 rounding grows with it) or is NaN."""
    import onnxruntime as ort
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    expected = maps.output_names()
    if names != expected:
        raise ExportError(f"{path}: ONNX outputs are {names}, expected {expected}")
    worst = 0.0
    for x in inputs:
        with torch.no_grad():
            ref = [t.numpy() for t in maps(x)]
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        for name, r, g in zip(names, ref, got):
            if r.shape != g.shape:
                raise ExportError(f"{path}: ONNX output {name} has shape {g.shape}, torch "
                                  f"{r.shape} (input {tuple(x.shape)})")
            diff = float(np.abs(r - g).max()) if r.size else 0.0
            scale = max(1.0, float(np.abs(r).max()) if r.size else 0.0)
            if not diff <= atol * scale:
                raise ExportError(f"{path}: ONNX output {name} differs from torch's by {diff:.3g} "
                                  f"> {atol:g}{f' x {scale:.3g}' if scale > 1 else ''} (input "
                                  f"{tuple(x.shape)})")
            worst = max(worst, diff)
    return worst


def _onnx_metadata(path: str, out: str, model: GFL, classes: list[str], d: DataConfig,
                   meta: dict) -> None:
    """Write the graph at ``path`` (with any external data) as one file ``out`` with ldpipe's
    metadata (the input normalisation and padding from the data section ``d``)."""
    import onnx
    proto = onnx.load(path)  # loads external data too
    props = {"ldpipe_classes": classes, "ldpipe_head": model.cfg.head.type,
             "ldpipe_outputs": list(ONNX_OUTPUTS[model.cfg.head.type]),
             "ldpipe_strides": list(model.strides),
             "ldpipe_reg_max": model.cfg.reg_max, "ldpipe_anchor_scale": model.cfg.anchor_scale,
             "ldpipe_input": {"mean": list(d.mean), "std": list(d.std), "to_rgb": d.to_rgb,
                              "test_scale": list(d.test_scale), "pad_divisor": d.pad_divisor},
             "ldpipe_export": meta["export"]}
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.save(proto, out)


def _export_onnx(maps: DenseTensors, path: str, example: torch.Tensor, dynamo: bool) -> None:
    names = maps.output_names()
    if dynamo:
        from torch.export import Dim
        h, w = Dim("h32", min=1, max=256), Dim("w32", min=1, max=256)
        torch.onnx.export(maps, (example,), path, dynamo=True, input_names=["img"],
                          output_names=names, opset_version=ONNX_OPSET, verbose=False,
                          dynamic_shapes={"img": {0: Dim("batch", min=1, max=1024), 2: 32 * h, 3: 32 * w}})
    else:  # the TorchScript exporter: deprecated in torch 2.9+, but ~8x quicker here
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # GroupNorm's size check
            axes = {n: {0: "batch", 1: "anchors"} for n in names}
            torch.onnx.export(maps, (example,), path, dynamo=False, input_names=["img"],
                              output_names=names, opset_version=17,
                              dynamic_axes={"img": {0: "batch", 2: "height", 3: "width"}, **axes})


def export_checkpoint(pipe: Pipeline, model_name: str, checkpoint: str, out: str,
                      fmt: str | None = None, fp16: bool = False, atol: float = ONNX_ATOL,
                      dynamo: bool = False) -> dict:
    """Write ``out`` (see the module docstring); returns a summary.  The file appears only
    once it is complete (and, for ONNX, checked)."""
    fmt = export_format(out, fmt)
    for what, path in (("the checkpoint being exported", checkpoint), ("the pipeline file", pipe.source)):
        if path and location_relation(out, path) == "same":  # also through a symlink: os.replace eats it
            raise ExportError(f"--out {out} is {what}; choose another file")
    above = blocking_file(out)
    if above is not None:
        raise ExportError(f"--out {out}: {above} is a file, not a folder; choose another --out")
    if fmt == "onnx" and fp16:
        raise ExportError("--fp16 applies to pth and safetensors exports; ONNX is exported in float32 "
                          f"(checked against torch at {atol:g})")
    if fmt == "onnx":
        _need(["onnx", "onnxruntime"] + (["onnxscript"] if dynamo else []), "onnx", "ONNX export")
    if fmt == "safetensors":
        _need(["safetensors"], "safetensors", "safetensors export")
    model, classes, src_meta = open_detector(pipe, model_name, checkpoint, torch.device("cpu"))
    meta = _meta(pipe, model_name, classes, src_meta, checkpoint, fmt, fp16)
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    # everything is written in a private folder next to OUT and moved into place when complete
    # (the ONNX exporter may write its weights as a separate external-data file there)
    work = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", dir=folder)
    tmp = os.path.join(work, f"export.{fmt}")
    summary = {"out": out, "format": fmt, "fp16": fp16, "model": model_name, "source": checkpoint}
    try:
        if fmt == "pth":
            torch.save({"meta": meta, "state_dict": _slim_state(model, fp16)}, tmp)
        elif fmt == "safetensors":
            from safetensors.torch import save_file
            save_file(_slim_state(model, fp16), tmp,
                      metadata={SAFETENSORS_META: json.dumps(meta, default=str)})
        else:
            maps = DenseTensors(model).eval()
            inputs = check_inputs(pipe.data)
            raw = os.path.join(work, "raw.onnx")
            _export_onnx(maps, raw, inputs[0], dynamo)
            _onnx_metadata(raw, tmp, model, classes, pipe.data, meta)
            summary["onnx_max_abs_diff"] = verify_onnx(maps, tmp, inputs, atol)
            summary["onnx_checked_inputs"] = [list(x.shape) for x in inputs]
            summary["onnx_outputs"] = maps.output_names()
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary["bytes"] = os.path.getsize(out)
    summary["source_bytes"] = os.path.getsize(checkpoint)
    log.info("exported %s (%s%s, %d bytes; source %d bytes)", out, fmt, ", fp16" if fp16 else "",
             summary["bytes"], summary["source_bytes"])
    return summary
