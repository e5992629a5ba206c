"""What a long run needs besides the training step: resuming mid-epoch, a log file,
TensorBoard scalars and validation every N epochs with ``best.pth``.

* :class:`SkipSampler` - the epoch's sampler with its first ``skip`` items dropped, so a run
  resumed from ``iter_N.pth`` sees exactly the batches the interrupted one had left;
* :func:`rng_state` / :func:`set_rng_state` - Python, NumPy and torch (CPU, CUDA) generators as
  plain lists and tensors (``weights_only``-loadable);
* :class:`RunLog` - ``WORK_DIR/train.log`` (the console logger's lines) and, with
  ``train.tensorboard``, scalars under ``WORK_DIR/tensorboard`` (skipped with a message when
  the tensorboard package is absent);
* :class:`Validator` - ``ldpipe eval``'s evaluation (:func:`ldpipe.engine.infer.evaluate_model`)
  every ``train.val_interval`` epochs, a ``val`` record in ``metrics.jsonl`` and ``best.pth``
  (by ``bbox_mAP``).
"""
from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from ..config import DataConfig
from ..data import load_split
from ..models.checkpoint import save_checkpoint
from . import workdir

log = logging.getLogger("ldpipe.train")

LOG_FORMAT, LOG_DATEFMT = "%(asctime)s %(name)s: %(message)s", "%H:%M:%S"  # = the CLI's console


class SkipSampler(Sampler):
    """``base`` (an epoch sampler with ``set_epoch``) whose next iteration drops its first
    ``skip`` items; later iterations are whole."""

    def __init__(self, base) -> None:
        self.base, self.skip = base, 0

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __iter__(self) -> Iterator:
        skip, self.skip = self.skip, 0
        it = iter(self.base)
        for _ in range(skip):
            next(it, None)
        return it

    def __len__(self) -> int:
        return max(len(self.base) - self.skip, 0)


# ---------------------------------------------------------------------- RNG
def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": _plain(random.getstate()),
             "numpy": [np_state[0], np_state[1].tolist(), *map(_plain, np_state[2:])],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    if not state:
        return
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain(value):
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


# ---------------------------------------------------------------------- log file, TensorBoard
class RunLog:
    """``train.log`` in the work dir (rank 0) and optional TensorBoard scalars."""

    def __init__(self, work_dir: str, tensorboard: bool, enabled: bool = True) -> None:
        self.logger = logging.getLogger("ldpipe")
        self.handler, self.writer, self._level = None, None, None
        if not enabled:
            return
        self.handler = logging.FileHandler(os.path.join(work_dir, "train.log"))
        self.handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATEFMT))
        self.handler.setLevel(logging.INFO)
        if self.logger.getEffectiveLevel() > logging.INFO:  # the file gets INFO lines anyway
            self._level = self.logger.level
            self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self.handler)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning("train.tensorboard: the tensorboard package is not installed "
                            "(pip install 'ldpipe[tensorboard]'); no TensorBoard scalars are written")
            else:
                self.writer = SummaryWriter(os.path.join(work_dir, "tensorboard"))

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.handler is not None:
            self.logger.removeHandler(self.handler)
            self.handler.close()
            if self._level is not None:
                self.logger.setLevel(self._level)


# ---------------------------------------------------------------------- validation
class Validator:
    """Every ``interval`` epochs: evaluate on the ``data`` section's ``val`` split, record it,
    keep ``best.pth``."""

    def __init__(self, data: DataConfig, model_name: str, work_dir: str, interval: int,
                 best: float | None = None) -> None:
        self.data, self.model_name, self.work_dir, self.interval = data, model_name, work_dir, interval
        self.best = best
        self.split = load_split(data, "val") if interval > 0 else None

    def due(self, epoch: int) -> bool:
        """Whether validation follows epoch ``epoch`` (1-based)."""
        return self.interval > 0 and epoch % self.interval == 0

    def restore(self, metrics_path: str, epoch: int, pending: bool) -> bool:
        """On resume: whether epoch ``epoch``'s validation is still to do.  The epoch checkpoint
        is written before its validation, so what that found is in ``metrics.jsonl``, not in
        the checkpoint: an epoch validated there is not validated twice, and ``best.pth`` is
        replaced only by an AP above every recorded one."""
        done = workdir.val_records(metrics_path, self.model_name) if self.interval else []
        if done:
            best = max(r["bbox_mAP"] for r in done)
            self.best = best if self.best is None else max(self.best, best)
        return pending and not any(r["epoch"] == epoch for r in done)

    def __call__(self, model, epoch: int, meta: dict, device: torch.device) -> dict:
        """Evaluate ``model`` after epoch ``epoch``; writes ``best.pth`` when it is the best."""
        from .infer import evaluate_model
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            metrics, _ = evaluate_model(model, self.data, self.split, device, progress=False)
        model.train()
        ap = float(metrics["bbox_mAP"])
        record = {"type": "val", "model": self.model_name, "epoch": epoch,
                  **{k: float(metrics[k]) for k in ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75")}}
        improved = self.best is None or ap > self.best
        if improved:
            self.best = ap
            best_meta = {**meta, "ldpipe": {**meta["ldpipe"], "best": {"epoch": epoch, "bbox_mAP": ap}}}
            workdir.record_output(self.work_dir, "best.pth")
            save_checkpoint(os.path.join(self.work_dir, "best.pth"), model, best_meta)
        log.info("%s epoch %d val: bbox_mAP=%.4f (best %.4f%s)", self.model_name, epoch, ap,
                 self.best, ", saved best.pth" if improved else "")
        return record
