"""The training loop shared by ``ldpipe train`` and ``ldpipe train-student``.

mmdetection's schedule: SGD (momentum 0.9, weight decay 1e-4), linear warm-up
over ``warmup_iters`` iterations from ``warmup_ratio``, step decay at the given
epochs, lr = 0.01 x total batch / 16 unless set.  AMP on CUDA, DDP through
torchrun (gloo on the CPU), a checkpoint each epoch (and, with
``train.checkpoint_interval``, every N iterations), ``DIR/latest.pth`` always
pointing at the newest one, ``--resume`` continuing the same run (mid-epoch too),
a used work dir refused without ``--resume`` / ``--overwrite`` and the run's
provenance recorded (``ldpipe.engine.workdir``), tqdm progress, JSON-lines metrics
(``DIR/metrics.jsonl``), ``DIR/train.log``, optional validation with ``best.pth``
and TensorBoard scalars (``ldpipe.engine.longrun``).

The pieces a benchmark or another runner needs on their own:

* :func:`base_lr`, :class:`Schedule` - the lr rule and schedule;
* :class:`TrainCollate` - collate + per-image ATSS targets (in loader workers);
* :func:`step_losses` - forward one batch and every loss term;
* :class:`TrainStep` - one optimisation step exactly as :func:`train` runs it.

Distillation plugs in through a :class:`Hook` (see ``ldpipe.distill``): it adds
per-sample data to the loader (the cached teacher targets), checks
compatibility before the first step, and adds loss terms.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from ..config import ModelConfig, Pipeline, TrainConfig, to_dict
from ..data import DetectionDataset, VariantSampler, collate, load_split, train_variants
from ..models import GFL, BatchTargets, DenseOutput, batch_targets, build_model, image_targets
from ..models.checkpoint import CheckpointError, load_file, load_weights, save_checkpoint
from . import longrun, runtime, workdir

log = logging.getLogger("ldpipe.train")


class Hook:
    """Distillation extension points (no-ops for plain training)."""

    with_vlr: bool = False
    device: torch.device = torch.device("cpu")
    use_amp: bool = False

    def setup(self, device: torch.device, use_amp: bool) -> None:
        """Called once before :meth:`check` with the training device and AMP setting."""
        self.device, self.use_amp = device, use_amp

    def sample_extra(self):  # -> Callable[[dict], dict] | None, picklable
        return None

    def variants(self, pipe: Pipeline):
        return train_variants(pipe.data)

    def check(self, pipe: Pipeline, model_name: str, split) -> None:
        pass

    def losses(self, model: GFL, batch: dict, out: DenseOutput, bt: BatchTargets,
               extras: dict) -> dict[str, torch.Tensor]:
        return {}

    def lineage(self) -> dict:
        return {}


class TrainCollate:
    """Collate plus per-image ATSS targets on the image's own grid (runs in loader workers)."""

    def __init__(self, cfg: ModelConfig, num_classes: int, with_vlr: bool) -> None:
        self.strides, self.anchor_scale, self.num_classes = list(cfg.strides), cfg.anchor_scale, num_classes
        self.topk, self.ignore_iof_thr = cfg.assigner.topk, cfg.assigner.ignore_iof_thr
        self.with_vlr, self.vlr_region = with_vlr, cfg.assigner.vlr_region

    def __call__(self, samples: list[dict]) -> dict:
        batch = collate(samples)
        if not batch["metas"]:  # every item skipped (data.skip_undecodable_images)
            return batch
        batch["targets"] = [
            image_targets(g, lb, ig, m["pad_shape"], self.strides, self.anchor_scale,
                          self.num_classes, self.topk, self.ignore_iof_thr, self.with_vlr,
                          self.vlr_region)
            for g, lb, ig, m in zip(batch["gt_boxes"], batch["gt_labels"],
                                    batch["ignore_boxes"], batch["metas"])]
        return batch


@dataclass
class Schedule:
    base_lr: float
    warmup_iters: int
    warmup_ratio: float
    steps: list[int]
    gamma: float

    @classmethod
    def of(cls, sched: TrainConfig, lr: float) -> "Schedule":
        return cls(lr, sched.warmup_iters, sched.warmup_ratio, sched.steps, sched.gamma)

    def lr(self, epoch: int, it: int) -> float:
        regular = self.base_lr * self.gamma ** sum(epoch >= s for s in self.steps)
        if it < self.warmup_iters:
            k = (1 - it / self.warmup_iters) * (1 - self.warmup_ratio)
            return regular * (1 - k)
        return regular


def base_lr(sched: TrainConfig, world_size: int = 1) -> float:
    """``train.lr``, or the linear scaling rule 0.01 x total batch / 16 when it is 0."""
    return sched.lr or 0.01 * sched.batch_size * world_size / 16


def step_losses(ddp, model: GFL, batch: dict, device: torch.device, use_amp: bool,
                hook: Hook) -> dict[str, torch.Tensor]:
    """Forward one batch (through ``ddp``, the model or its DDP wrapper) and return every
    loss term (GFL + the hook's)."""
    img = batch["img"].to(device, non_blocking=True)
    with runtime.amp_context(device, use_amp):
        out = ddp(img)
    cfg = model.cfg
    bt = batch_targets(batch["targets"], out.level_sizes, cfg.strides, cfg.anchor_scale,
                       model.num_classes, device)
    losses, extras = model.bbox_head.loss(out, bt, cfg.loss, reduce=runtime.mean_over_ranks)
    losses.update(hook.losses(model, batch, out, bt, extras))
    return losses


class TrainStep:
    """One optimisation step as :func:`train` runs it: lr from the schedule, forward and
    losses, finiteness check, backward (GradScaler with AMP), gradient clipping, update."""

    def __init__(self, model: GFL, sched: TrainConfig, device: torch.device, use_amp: bool,
                 world_size: int = 1, ddp=None) -> None:
        self.model, self.ddp = model, ddp if ddp is not None else model
        self.device, self.use_amp, self.grad_clip = device, use_amp, sched.grad_clip
        self.params = [p for p in model.parameters() if p.requires_grad]
        lr = base_lr(sched, world_size)
        self.optimizer = torch.optim.SGD(self.params, lr=lr, momentum=sched.momentum,
                                         weight_decay=sched.weight_decay)
        self.schedule = Schedule.of(sched, lr)
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    def __call__(self, batch: dict, hook: Hook, epoch: int, it: int) -> tuple[dict[str, float], float]:
        """Run the step at (epoch, global iteration ``it``); returns the loss values and lr."""
        lr = self.schedule.lr(epoch, it)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        losses = step_losses(self.ddp, self.model, batch, self.device, self.use_amp, hook)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss is {float(loss)} at epoch {epoch + 1} iteration {it} "
                f"(images {[m['image_id'] for m in batch['metas']]}); {_fmt(losses)}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        values = {k: float(v.detach()) for k, v in losses.items()}
        values["loss"] = float(loss.detach())
        return values, lr

    def state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def resume(self, path: str) -> tuple[int, int]:
        """Load weights, optimizer and scaler state of ``path``; returns (epoch, iteration)."""
        state = load_file(path)
        load_weights(self.model, path)
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        loop = state.get("loop", {})
        return int(loop.get("epoch", 0)), int(loop.get("iter", 0))


def link_latest(work_dir: str, name: str) -> None:
    """Point ``latest.pth`` at ``name`` atomically (symlink; copy where links fail)."""
    dst = os.path.join(work_dir, "latest.pth")
    tmp = os.path.join(work_dir, f".latest.{os.getpid()}")
    try:
        if os.path.lexists(tmp):
            os.remove(tmp)
        os.symlink(name, tmp)
    except OSError:
        import shutil
        shutil.copyfile(os.path.join(work_dir, name), tmp)
    os.replace(tmp, dst)


def train(pipe: Pipeline, model_name: str, work_dir: str, resume: bool = False,
          hook: Hook | None = None, device: str | None = None, init_from: str | None = None,
          progress: bool = True, overwrite: bool = False, command: list[str] | None = None) -> str:
    """Train one model of the pipeline; returns the path of the final checkpoint.

    A ``work_dir`` holding files is refused unless ``resume`` (continue the run there, also
    from a mid-epoch ``iter_N.pth``) or ``overwrite`` (delete that run's outputs first);
    ``command`` is the command line recorded in the provenance (default ``sys.argv``)."""
    hook = hook or Hook()
    info = runtime.init(device)
    cfg = pipe.model(model_name)
    sched = pipe.train_for(model_name)
    workdir.check_work_dir(work_dir, resume, overwrite)  # every rank, before any rank writes
    runtime.barrier()
    runtime.seed_everything(sched.seed + info.rank)
    os.makedirs(work_dir, exist_ok=True)
    prov = workdir.provenance(pipe, command)
    gone = workdir.clear_run_outputs(work_dir) if overwrite and info.is_main else []
    if info.is_main:
        workdir.write_run_files(work_dir, pipe, prov)
    runtime.barrier()
    runlog = longrun.RunLog(work_dir, sched.tensorboard, enabled=info.is_main)
    try:
        if gone:
            log.info("--overwrite: deleted %d earlier outputs of %s (%s)", len(gone), work_dir,
                     ", ".join(gone[:4]) + (", ..." if len(gone) > 4 else ""))
        if info.is_main:
            git = prov["git"]
            log.info("%s: run.json, pipeline.toml written (ldpipe %s, git %s)", work_dir,
                     prov["versions"]["ldpipe"], f"{git['commit'][:10]}{' dirty' if git['dirty'] else ''}"
                     if git["available"] else f"unavailable: {git['reason']}")
        return _run(pipe, model_name, work_dir, resume, hook, info, cfg, sched, init_from,
                    progress, prov, runlog)
    finally:
        runlog.close()


def _run(pipe: Pipeline, model_name: str, work_dir: str, resume: bool, hook: Hook,
         info: runtime.DistInfo, cfg: ModelConfig, sched: TrainConfig, init_from: str | None,
         progress: bool, prov: dict, runlog: longrun.RunLog) -> str:
    """The run itself, once the work dir is checked and the provenance written."""
    split = load_split(pipe.data, "train")
    classes = split.classes
    use_amp = sched.amp and info.device.type == "cuda"
    hook.setup(info.device, use_amp)
    hook.check(pipe, model_name, split)
    variants = hook.variants(pipe)
    dataset = DetectionDataset(split, pipe.data, variants, extra=hook.sample_extra())
    sampler = longrun.SkipSampler(VariantSampler(len(dataset), len(variants), shuffle=True,
                                                 seed=sched.seed, rank=info.rank,
                                                 world_size=info.world_size))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=sched.batch_size, sampler=sampler, drop_last=False,
        num_workers=sched.workers, pin_memory=info.device.type == "cuda",
        persistent_workers=sched.workers > 0, worker_init_fn=runtime.worker_init,
        collate_fn=TrainCollate(cfg, len(classes), hook.with_vlr))
    validator = longrun.Validator(pipe, model_name, work_dir, sched.val_interval if info.is_main else 0)

    model = build_model(cfg, len(classes)).to(info.device)
    if init_from:
        load_weights(model, init_from)
    ddp = DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda"
                                  else None) if info.enabled else model
    step = TrainStep(model, sched, info.device, use_amp, info.world_size, ddp)

    start_epoch, global_it, skip, running0, rng, val_pending = 0, 0, 0, {}, None, False
    latest = os.path.join(work_dir, "latest.pth")
    if resume and os.path.exists(latest):
        start_epoch, global_it = step.resume(latest)
        state = load_file(latest)
        loop = state.get("loop", {})
        skip, running0 = int(loop.get("epoch_iter", 0)), dict(loop.get("running", {}))
        validator.best, val_pending, rng = loop.get("best"), bool(loop.get("val_pending")), state.get("rng")
        if info.is_main:
            log.info("resuming %s from epoch %d (iteration %d%s)", latest, start_epoch, global_it,
                     f", {skip} into epoch {start_epoch + 1}" if skip else "")
            workdir.trim_metrics(os.path.join(work_dir, "metrics.jsonl"), global_it)
    elif resume and info.is_main:
        log.info("--resume: no %s yet, starting from scratch", latest)

    metrics_path = os.path.join(work_dir, "metrics.jsonl")
    iters_per_epoch = len(loader)
    if sched.max_iters_per_epoch > 0:
        iters_per_epoch = min(iters_per_epoch, sched.max_iters_per_epoch)

    meta = {"ldpipe": {
        "model": model_name, "config": to_dict(cfg), "classes": classes,
        "pipeline": pipe.source, "pipeline_name": pipe.name,
        "data_fingerprint": split.fingerprint, "lineage": hook.lineage(), "provenance": prov,
    }}

    def save(name: str, loop: dict) -> None:
        save_checkpoint(os.path.join(work_dir, name), model, meta, **step.state(), loop=loop,
                        rng=longrun.rng_state())
        link_latest(work_dir, name)
        workdir.remove_iter_checkpoints(work_dir, keep=name)

    def validate(epoch: int) -> None:
        record = validator(model, epoch, meta, info.device)
        _append_json(metrics_path, {**record, "iter": global_it})
        runlog.scalars("val", {k: v for k, v in record.items() if k.startswith("bbox")}, global_it)

    if resume:
        val_pending = validator.restore(metrics_path, start_epoch, val_pending)
    if val_pending and validator.interval:  # killed between an epoch's checkpoint and its val
        validate(start_epoch)
    for epoch in range(start_epoch, sched.epochs):
        sampler.set_epoch(epoch)
        first = epoch == start_epoch and skip > 0
        if rng is not None and not first:  # an epoch checkpoint: the state at the epoch's start
            longrun.set_rng_state(rng)
            rng = None
        sampler.skip = skip * sched.batch_size if first else 0
        model.train()
        bar = runtime.progress_bar(total=iters_per_epoch, desc=f"{model_name} epoch {epoch + 1}/{sched.epochs}",
                                   disable=not (progress and info.is_main), leave=False,
                                   initial=skip if first else 0)
        t_epoch = time.perf_counter()  # a duration: monotonic, not the wall clock
        running: dict[str, float] = dict(running0) if first else {}
        batches = iter(loader)
        if rng is not None:  # an iter checkpoint: the state after that iteration
            longrun.set_rng_state(rng)
            rng = None
        i = (skip if first else 0) - 1
        skipped: list[str] = []
        for i, batch in enumerate(batches, start=skip if first else 0):
            if i >= iters_per_epoch:
                break
            skipped += batch.get("skipped", [])
            if not batch["metas"]:
                _all_skipped(info.world_size, batch["skipped"])
                continue
            values, lr = step(batch, hook, epoch, global_it)
            global_it += 1
            for k, v in values.items():
                running[k] = running.get(k, 0.0) + v
            bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{lr:.2e}")
            bar.update(1)
            if info.is_main and (global_it % sched.log_interval == 0):
                _append_json(metrics_path, {"type": "train", "model": model_name, "epoch": epoch + 1,
                                            "iter": global_it, "lr": lr, **values})
                runlog.scalars("train", {"lr": lr, **values}, global_it)
            if (info.is_main and sched.checkpoint_interval > 0 and i + 1 < iters_per_epoch
                    and global_it % sched.checkpoint_interval == 0):
                meta["ldpipe"].update(epoch=epoch, iter=global_it)
                save(f"iter_{global_it}.pth", {"epoch": epoch, "iter": global_it, "epoch_iter": i + 1,
                                               "running": running, "best": validator.best})
                log.info("%s: iteration checkpoint iter_%d.pth (epoch %d, %d/%d)", model_name,
                         global_it, epoch + 1, i + 1, iters_per_epoch)
        bar.close()
        skip = 0
        n = max(min(iters_per_epoch, i + 1), 1)
        summary = {k: v / n for k, v in running.items()}
        if skipped:
            summary["skipped_images"] = len(skipped)
            log.warning("%s epoch %d: skipped %d undecodable image(s) on rank %d (e.g. %s)",
                        model_name, epoch + 1, len(skipped), info.rank, skipped[0])
        if info.is_main:
            elapsed = time.perf_counter() - t_epoch
            _append_json(metrics_path, {"type": "epoch", "model": model_name, "epoch": epoch + 1,
                                        "iter": global_it, "time_s": round(elapsed, 3),
                                        "it_per_s": round(n / max(elapsed, 1e-9), 3), **summary})
            runlog.scalars("epoch", summary, global_it)
            log.info("%s epoch %d/%d: %s (%.1fs)", model_name, epoch + 1, sched.epochs,
                     _fmt(summary), elapsed)
            meta["ldpipe"].update(epoch=epoch + 1, iter=global_it)
            due = validator.due(epoch + 1)
            save(f"epoch_{epoch + 1}.pth", {"epoch": epoch + 1, "iter": global_it,
                                            "best": validator.best, "val_pending": due})
            if sched.keep_checkpoints > 0:
                workdir.prune_epoch_checkpoints(work_dir, sched.keep_checkpoints)
            if due:
                validate(epoch + 1)
        runtime.barrier()
    if not os.path.exists(latest):
        raise CheckpointError(f"{work_dir}: training ended without a checkpoint")
    return latest


def _all_skipped(world_size: int, files: list[str]) -> None:
    """A batch whose images were all skipped: leave the step out (one process), or stop (under
    DDP every rank must take every step)."""
    if world_size > 1:
        from ..data import DataError
        raise DataError(f"every image of a batch is undecodable ({', '.join(files)}); under "
                        "torchrun a rank cannot leave a step out: remove these files from the split")


def _append_json(path: str, record: dict[str, Any]) -> None:
    record = {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v)
              for k, v in record.items()}
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def _fmt(values: dict) -> str:
    return " ".join(f"{k}={float(v):.4f}" for k, v in values.items())
