"""Runtime utilities shared by the runners: process group, device, AMP, seeding, progress.

One code path for 1 process and for torchrun on the CPU (gloo) or CUDA (NCCL).
"""
from __future__ import annotations

import contextlib
import os
import random
import sys
from dataclasses import dataclass

import numpy as np

import torch
import torch.distributed as dist
from tqdm import tqdm


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init(device: str | None = None) -> DistInfo:
    """Start the process group when launched by torchrun (``WORLD_SIZE`` > 1).

    ``device``: 'cpu', 'cuda' or None (CUDA when available).  Each rank takes
    ``cuda:LOCAL_RANK``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("CUDA was requested but is not available")
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local, dev)


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """Average a tensor over ranks (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    t = t.detach().clone().float()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / dist.get_world_size()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def amp_context(device: torch.device, enabled: bool):
    """fp16 autocast on CUDA when ``enabled`` (a no-op context otherwise)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16)


def progress_bar(**kwargs) -> tqdm:
    """tqdm that refreshes rarely when stderr is not a terminal (CI logs stay readable)."""
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", 15.0)
    return tqdm(dynamic_ncols=True, **kwargs)


def worker_init(worker_id: int) -> None:
    """Loader workers use one thread each: the main process owns the cores."""
    torch.set_num_threads(1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
