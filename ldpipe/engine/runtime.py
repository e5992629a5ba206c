"""Runtime utilities shared by the runners: process group, device, AMP, seeding, progress.

One code path for 1 process and for torchrun on the CPU (gloo) or CUDA (NCCL).
"""
from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass

import numpy as np

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..config import ConfigError

from ..models.device_ops import amp_context, mean_over_ranks  # noqa: F401 (re-exported)


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


def resolve_device(device: str | None = None, local_rank: int = 0) -> torch.device:
    """The one device rule of every command: ``None`` = CUDA when available, else the CPU;
    ``'cpu'``; ``'cuda'`` / ``'cuda:N'`` (a torchrun rank takes ``cuda:LOCAL_RANK`` for a bare
    ``'cuda'``).  Anything else, or CUDA on a machine without it, is a :class:`ConfigError`
    naming the value."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = str(device).partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
        raise ConfigError(f"--device {device!r}: choose 'cpu', 'cuda' or 'cuda:N'")
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {device!r}: CUDA was requested but is not available here "
                          "(use --device cpu)")
    n = torch.cuda.device_count()
    ordinal = int(index) if index else local_rank
    if ordinal >= n:
        raise ConfigError(f"--device {device!r}: this machine has {n} CUDA device(s)")
    return torch.device(f"cuda:{ordinal}")


def train_amp(amp: bool, device: torch.device) -> bool:
    """Whether a training run (its step, and an online teacher's forward) uses fp16 autocast:
    ``train.amp``, on CUDA only."""
    return amp and device.type == "cuda"


def init(device: str | None = None) -> DistInfo:
    """Start the process group when launched by torchrun (``WORLD_SIZE`` > 1).

    ``device``: as :func:`resolve_device`; each rank takes ``cuda:LOCAL_RANK``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    use_cuda = dev.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local, dev)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


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
