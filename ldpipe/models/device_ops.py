"""Device-side helpers shared by the model's losses, the distillation criteria and the runners:
fp16 autocast and the mean of a scalar over DDP ranks.  Pure torch; no process group is started
here (``ldpipe.engine.runtime.init`` does that)."""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist


def amp_context(device: torch.device, enabled: bool):
    """fp16 autocast on CUDA when ``enabled`` (a no-op context otherwise)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16)


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """Average a tensor over ranks (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    t = t.detach().clone().float()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / dist.get_world_size()
