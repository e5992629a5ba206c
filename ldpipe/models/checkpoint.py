"""Checkpoints: ldpipe's own and mmdetection's, loaded without executing code.

Both formats are ``{'meta': {...}, 'state_dict': {...}, ...}``; ldpipe adds the
optimizer, scheduler and loop state for ``--resume`` and an ``ldpipe`` entry
in ``meta`` (model config, classes, lineage).  Files are read with
``torch.load(weights_only=True)``: a file that needs arbitrary objects
(mmengine's message hub, for example) is refused with a message that says so.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import stat
from typing import Any

import torch
from torch import nn

from ..errors import LdpipeError, first_line
from ..files import replacing


class CheckpointError(LdpipeError):
    """A checkpoint that cannot be read, does not match the model, or cannot be written."""


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_file(path: str) -> dict:
    """The checkpoint's top-level dict, loaded with ``weights_only=True`` on the CPU
    (a ``.safetensors`` file: its tensors as ``state_dict`` and its ``meta``)."""
    if not os.path.isfile(path):
        if os.path.exists(path):  # a folder, FIFO or device: never opened (a FIFO would block)
            mode = os.stat(path).st_mode
            what = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                    else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a file")
            raise CheckpointError(f"checkpoint {path} is {what}, not a regular file")
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        return load_safetensors(path)
    with open(path, "rb") as fh:
        head = fh.read(4)
    # torch.save writes a zip archive ("PK\x03\x04"); files of torch < 1.6 are a raw pickle
    if not (head.startswith(b"PK") or head.startswith(b"\x80")):
        what = "an empty file" if not head else f"a file starting with {head!r}"
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({what}; torch.save writes a "
                              "zip archive)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError) as exc:
        raise CheckpointError(
            f"{path}: cannot be loaded safely with weights_only=True ({first_line(exc, typed=False)}). "
            "ldpipe never executes code from checkpoint files; save only the tensors, e.g. "
            "torch.save({'state_dict': ckpt['state_dict']}, 'clean.pth') in a trusted environment."
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(obj).__name__}")
    return obj


SAFETENSORS_META = "ldpipe_meta"  # metadata key of a .safetensors file holding the meta dict (JSON)


def load_safetensors(path: str) -> dict:
    """``{'meta', 'state_dict'}`` of a ``.safetensors`` file (a format that holds only tensors
    and string metadata: nothing in it can execute)."""
    try:
        from safetensors import safe_open
    except ImportError:
        raise CheckpointError(f"{path}: reading .safetensors needs the safetensors package "
                              "(pip install 'ldpipe[safetensors]')") from None
    try:
        with safe_open(path, framework="pt", device="cpu") as fh:
            state = {k: fh.get_tensor(k) for k in fh.keys()}
            raw = (fh.metadata() or {}).get(SAFETENSORS_META, "{}")
        meta = json.loads(raw)
    except Exception as exc:  # the library raises its own error types for damaged files
        raise CheckpointError(f"{path}: not a readable safetensors file ({first_line(exc, typed=False)})") from None
    return {"meta": meta if isinstance(meta, dict) else {}, "state_dict": state}


def load_state_dict_file(path: str, obj: dict | None = None) -> dict[str, torch.Tensor]:
    """The weights of checkpoint ``path`` (``obj``: its :func:`load_file` dict, if already read)."""
    obj = load_file(path) if obj is None else obj
    state = obj.get("state_dict", obj.get("model", obj))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: no state_dict of tensors found")
    return {k.removeprefix("module."): v for k, v in state.items()}


# weights that only training uses: CrossKD's 1x1 align maps (models.NAME.head.align_channels);
# a model built without them (eval, predict, export, a teacher) loads a checkpoint that has them
TRAINING_ONLY = ("bbox_head.align_cls.", "bbox_head.align_reg.")


def load_weights(model: nn.Module, path: str, obj: dict | None = None) -> dict:
    """Load a checkpoint's weights strictly; returns its ``meta`` dict.  The file is read
    once (``obj``: its :func:`load_file` dict when the caller has read it already).

    Differences in names or shapes are reported with the first few offending
    keys so that a wrong depth, width, reg_max or class count is obvious.  Training-only
    weights (:data:`TRAINING_ONLY`) the model does not have are left out.
    """
    obj = load_file(path) if obj is None else obj
    state = load_state_dict_file(path, obj)
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.startswith(TRAINING_ONLY)}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[:3]})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[:3]})")
        raise CheckpointError(f"{path} does not match the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
    meta = obj.get("meta", {})
    return meta if isinstance(meta, dict) else {}


def save_checkpoint(path: str, model: nn.Module, meta: dict[str, Any], **extra: Any) -> None:
    """Write atomically (temp file + rename) so a kill never leaves a torn file."""
    module = model.module if hasattr(model, "module") else model
    obj = {"meta": meta, "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()}}
    obj.update(extra)
    try:
        with replacing(path) as tmp:  # a failed write removes its temporary file
            torch.save(obj, tmp)
    except (OSError, RuntimeError) as exc:  # ENOSPC: torch reports some as RuntimeError
        reason = getattr(exc, "strerror", None) or first_line(exc, typed=False)
        raise CheckpointError(f"cannot write checkpoint {path}: {reason}; the checkpoints written "
                              "before are kept (latest.pth still names the newest complete one): "
                              "free space and rerun with --resume") from None
