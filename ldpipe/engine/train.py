"""The training loop shared by ``ldpipe train`` and ``ldpipe train-student``.

As DETR's: a model, a criterion and a short loop.  :func:`train` trains one model of the
pipeline with the :class:`TrainJob` it is given - a criterion (``ldpipe.distill.criterion``:
GFL's own losses by default, plus distillation terms for a student), the variants its loader
serves and a per-sample loader extra (a cached teacher's rows) - and knows nothing about
teachers; ``ldpipe.engine.student`` composes the distillation job.  One step is
``ldpipe.engine.step.TrainStep`` (re-exported here with the other step pieces).

A checkpoint each epoch (and, with ``train.checkpoint_interval``, every N iterations),
``DIR/latest.pth`` always pointing at the newest one, ``--resume`` continuing the same run
(mid-epoch too) from the :class:`LoopState` saved in it (the checkpoint is read once), a used
work dir refused without ``--resume`` / ``--overwrite`` and the run's provenance recorded
(``ldpipe.engine.workdir``), DDP through torchrun (gloo on the CPU), tqdm progress, JSON-lines
metrics (``DIR/metrics.jsonl``), ``DIR/train.log``, optional validation with ``best.pth`` and
TensorBoard scalars (``ldpipe.engine.longrun``).
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.nn.parallel import DistributedDataParallel

from ..config import Pipeline, to_dict
from ..data import DetectionDataset, Variant, VariantSampler, load_split, train_variants
from ..data.viewset import ViewDataset, ViewTable
from ..distill.criterion import Criterion, GFLCriterion
from ..models import build_model
from ..models.checkpoint import CheckpointError, load_file, load_weights, save_checkpoint
from . import longrun, runtime, workdir
from .step import (TrainCollate, TrainStep, Schedule, append_json, base_lr,  # noqa: F401
                   fmt_values, step_losses)

log = logging.getLogger("ldpipe.train")


@dataclass
class TrainJob:
    """What a run trains with besides the pipeline and the model (default: plain GFL)."""

    criterion: Criterion = field(default_factory=GFLCriterion)
    variants: list[Variant] | None = None  # the loader's variants; None: the pipeline's own
    sample_extra: Callable | None = None  # picklable ``meta -> dict`` run in loader workers
    lineage: dict = field(default_factory=dict)  # recorded in every checkpoint's meta
    split: Any = None  # the training split when the composer read it already
    # the views the loader serves (ldpipe.data.viewset); None: drawn from the seed when the
    # pipeline declares [[data.augment]], else the fixed variants
    views: ViewTable | None = None


@dataclass
class LoopState:
    """Where a run is, saved in every checkpoint (``"loop"``) and read back by ``--resume``."""

    epoch: int = 0  # epochs completed
    iter: int = 0  # optimisation steps taken, all epochs
    epoch_iter: int = 0  # steps taken into epoch ``epoch + 1`` (an iteration checkpoint)
    running: dict[str, float] = field(default_factory=dict)  # that partial epoch's loss sums
    best: float | None = None  # best validation bbox_mAP so far
    val_pending: bool = False  # epoch checkpoint written, its validation not yet done

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "iter": self.iter, "epoch_iter": self.epoch_iter,
                "running": dict(self.running), "best": self.best, "val_pending": self.val_pending}

    @classmethod
    def from_dict(cls, loop: dict) -> "LoopState":
        """A checkpoint's ``loop`` entry (every key optional: older checkpoints lack some)."""
        return cls(int(loop.get("epoch", 0)), int(loop.get("iter", 0)),
                   int(loop.get("epoch_iter", 0)), dict(loop.get("running", {})),
                   loop.get("best"), bool(loop.get("val_pending")))


def online_views(pipe: Pipeline, sched) -> ViewTable | None:
    """``[[data.augment]]`` without a stored schedule: a fresh view per image and epoch, drawn
    from the run's seed (None: the pipeline declares no augmentation)."""
    if not pipe.data.augment:
        return None
    return ViewTable(tuple(pipe.data.augment), "epochs", sched.seed)


def check_epochs(views: ViewTable, epochs: int) -> None:
    """A schedule of one view per epoch serves at most its ``count`` epochs."""
    if views.by_epoch and views.count and epochs > views.count:
        from ..data import DataError
        raise DataError(f"the view schedule holds {views.count} epochs (one view per image per "
                        f"epoch), this run asks for train.epochs = {epochs}: dump a schedule of "
                        f"{epochs} epochs, or train {views.count}")


def link_latest(work_dir: str, name: str) -> None:
    """Point ``latest.pth`` at ``name`` atomically (symlink; copy where links fail)."""
    dst = os.path.join(work_dir, "latest.pth")
    tmp = os.path.join(work_dir, f".latest.{os.getpid()}")
    try:
        if os.path.lexists(tmp):
            os.remove(tmp)
        os.symlink(name, tmp)
    except OSError:
        shutil.copyfile(os.path.join(work_dir, name), tmp)
    os.replace(tmp, dst)


def train(pipe: Pipeline, model_name: str, work_dir: str, resume: bool = False,
          job: TrainJob | None = None, device: str | None = None, init_from: str | None = None,
          progress: bool = True, overwrite: bool = False, command: list[str] | None = None,
          resume_anyway: bool = False) -> str:
    """Train one model of the pipeline with ``job`` (default: plain GFL training); returns the
    path of the final checkpoint.

    A ``work_dir`` holding files is refused unless ``resume`` (continue the run there, also
    from a mid-epoch ``iter_N.pth``) or ``overwrite`` (delete that run's outputs first);
    ``command`` is the command line recorded in the provenance (default ``sys.argv``).  A
    resume continues only the same run (kind, model, pipeline file, teacher: see
    :func:`ldpipe.engine.workdir.resume_problem`) unless ``resume_anyway``."""
    job = job or TrainJob()
    info = runtime.init(device)
    sched = pipe.train_for(model_name)
    workdir.check_work_dir(work_dir, resume, overwrite)  # every rank, before any rank writes
    runtime.barrier()
    runtime.seed_everything(sched.seed + info.rank)
    os.makedirs(work_dir, exist_ok=True)
    prov = workdir.provenance(pipe, command)
    gone, kept = workdir.clear_run_outputs(work_dir) if overwrite and info.is_main else ([], [])
    if info.is_main:
        workdir.write_run_files(work_dir, pipe, prov)
    runtime.barrier()
    runlog = longrun.RunLog(work_dir, sched.tensorboard, enabled=info.is_main)
    try:
        if gone:
            log.info("--overwrite: deleted %d earlier outputs of %s (%s)", len(gone), work_dir,
                     ", ".join(gone[:4]) + (", ..." if len(gone) > 4 else ""))
        if kept:
            log.warning("--overwrite: kept %s in %s: no run recorded writing %s (%s)",
                        ", ".join(kept[:4]) + (", ..." if len(kept) > 4 else ""), work_dir,
                        "it" if len(kept) == 1 else "them", workdir.LEDGER)
        if info.is_main:
            git = prov["git"]
            log.info("%s: run.json, pipeline.toml written (ldpipe %s, git %s)", work_dir,
                     prov["versions"]["ldpipe"], f"{git['commit'][:10]}{' dirty' if git['dirty'] else ''}"
                     if git["available"] else f"unavailable: {git['reason']}")
        loop = _Loop(pipe, model_name, work_dir, job, info, init_from, progress, prov, runlog)
        return loop.run(resume, resume_anyway)
    finally:
        runlog.close()


class _Loop:
    """One run once its work dir is checked and its provenance written: the loader, the
    model and its step, and the epochs."""

    def __init__(self, pipe: Pipeline, model_name: str, work_dir: str, job: TrainJob,
                 info: runtime.DistInfo, init_from: str | None, progress: bool, prov: dict,
                 runlog: longrun.RunLog) -> None:
        self.pipe, self.name, self.work_dir, self.info, self.runlog = pipe, model_name, work_dir, info, runlog
        self.progress = progress
        cfg, self.sched = pipe.model(model_name), pipe.train_for(model_name)
        split = job.split if job.split is not None else load_split(pipe.data, "train")
        variants = job.variants if job.variants is not None else train_variants(pipe.data)
        views = job.views if job.views is not None else online_views(pipe, self.sched)
        if views is not None:
            check_epochs(views, self.sched.epochs)
            dataset = ViewDataset(split, pipe.data, views, extra=job.sample_extra)
        else:
            dataset = DetectionDataset(split, pipe.data, variants, extra=job.sample_extra)
        self.sampler = longrun.SkipSampler(VariantSampler(
            len(dataset), (views.count or 1) if views is not None else len(variants), shuffle=True,
            seed=self.sched.seed, rank=info.rank, world_size=info.world_size,
            by_epoch=views is not None and views.by_epoch))
        workers = self.sched.workers
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=self.sched.batch_size, sampler=self.sampler, drop_last=False,
            num_workers=workers, pin_memory=info.device.type == "cuda",
            persistent_workers=workers > 0, worker_init_fn=runtime.worker_init,
            collate_fn=TrainCollate(cfg, len(split.classes), job.criterion.with_vlr))
        self.validator = longrun.Validator(pipe.data, model_name, work_dir,
                                           self.sched.val_interval if info.is_main else 0)
        self.model = build_model(cfg, len(split.classes)).to(info.device)
        if init_from:
            load_weights(self.model, init_from)
        ddp = DistributedDataParallel(self.model, device_ids=[info.device.index] if info.device.type == "cuda"
                                      else None) if info.enabled else self.model
        use_amp = runtime.train_amp(self.sched.amp, info.device)
        self.step = TrainStep(self.model, self.sched, info.device, use_amp, info.world_size, ddp,
                              job.criterion)
        self.iters_per_epoch = len(self.loader)
        if self.sched.max_iters_per_epoch > 0:
            self.iters_per_epoch = min(self.iters_per_epoch, self.sched.max_iters_per_epoch)
        self.metrics_path = os.path.join(work_dir, "metrics.jsonl")
        self.meta = {"ldpipe": {
            "model": model_name, "config": to_dict(cfg), "classes": split.classes,
            "pipeline": pipe.source, "pipeline_name": pipe.name,
            "data_fingerprint": split.fingerprint, "lineage": job.lineage, "provenance": prov,
        }}

    # ------------------------------------------------------------------ resume
    def _resume(self, anyway: bool) -> tuple[LoopState, dict | None]:
        """The state of ``latest.pth`` (weights, optimizer and loop; one read of the file) and
        its random state; a fresh state when there is none yet."""
        latest = os.path.join(self.work_dir, "latest.pth")
        state, rng = LoopState(), None
        if os.path.exists(latest):
            obj = load_file(latest)
            problem = workdir.resume_problem(obj.get("meta") or {}, self.meta, latest)
            if problem and not anyway:
                raise workdir.WorkDirError(problem)
            if problem and self.info.is_main:
                log.warning("%s (--resume-anyway: continuing)", problem)
            self.step.restore(latest, obj)
            state, rng = LoopState.from_dict(obj.get("loop", {})), obj.get("rng")
            self.validator.best = state.best
            if self.info.is_main:
                log.info("resuming %s from epoch %d (iteration %d%s)", latest, state.epoch, state.iter,
                         f", {state.epoch_iter} into epoch {state.epoch + 1}" if state.epoch_iter else "")
                workdir.trim_metrics(self.metrics_path, state.iter)
        elif self.info.is_main:
            log.info("--resume: no %s yet, starting from scratch", latest)
        state.val_pending = self.validator.restore(self.metrics_path, state.epoch, state.val_pending)
        return state, rng

    # --------------------------------------------------------------- the run
    def run(self, resume: bool, resume_anyway: bool = False) -> str:
        state, rng = self._resume(resume_anyway) if resume else (LoopState(), None)
        if state.val_pending and self.validator.interval:  # killed between checkpoint and val
            self._validate(state)
        for epoch in range(state.epoch, self.sched.epochs):
            rng = self._epoch(epoch, state, rng)
            runtime.barrier()
        latest = os.path.join(self.work_dir, "latest.pth")
        if not os.path.exists(latest):
            raise CheckpointError(f"{self.work_dir}: training ended without a checkpoint")
        return latest

    def _epoch(self, epoch: int, state: LoopState, rng: dict | None) -> dict | None:
        """Epoch ``epoch`` (0-based), continued from ``state.epoch_iter`` steps in when the run
        resumed from an iteration checkpoint; ``rng``: the resumed random state (None after)."""
        info, sched, n_iters = self.info, self.sched, self.iters_per_epoch
        self.sampler.set_epoch(epoch)
        skip = state.epoch_iter if epoch == state.epoch else 0
        if rng is not None and not skip:  # an epoch checkpoint: the state at the epoch's start
            longrun.set_rng_state(rng)
            rng = None
        self.sampler.skip = skip * sched.batch_size
        self.model.train()
        bar = runtime.progress_bar(total=n_iters, desc=f"{self.name} epoch {epoch + 1}/{sched.epochs}",
                                   disable=not (self.progress and info.is_main), leave=False,
                                   initial=skip)
        t_epoch = time.perf_counter()  # a duration: monotonic, not the wall clock
        running: dict[str, float] = dict(state.running) if skip else {}
        batches = iter(self.loader)
        if rng is not None:  # an iter checkpoint: the state after that iteration
            longrun.set_rng_state(rng)
            rng = None
        i, skipped = skip - 1, []
        for i, batch in enumerate(batches, start=skip):
            if i >= n_iters:
                break
            skipped += batch.get("skipped", [])
            if not batch["metas"]:
                _all_skipped(info.world_size, batch["skipped"])
                continue
            values, lr = self.step(batch, epoch, state.iter)
            state.iter += 1
            for k, v in values.items():
                running[k] = running.get(k, 0.0) + v
            bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{lr:.2e}")
            bar.update(1)
            self._log_step(epoch, state.iter, lr, values)
            if (info.is_main and sched.checkpoint_interval > 0 and i + 1 < n_iters
                    and state.iter % sched.checkpoint_interval == 0):
                self._save(f"iter_{state.iter}.pth", LoopState(
                    epoch, state.iter, i + 1, running, self.validator.best))
                log.info("%s: iteration checkpoint iter_%d.pth (epoch %d, %d/%d)", self.name,
                         state.iter, epoch + 1, i + 1, n_iters)
        bar.close()
        state.epoch_iter, state.running = 0, {}
        self._end_epoch(epoch, state, max(min(n_iters, i + 1), 1), running, skipped,
                        time.perf_counter() - t_epoch)
        return rng

    def _log_step(self, epoch: int, it: int, lr: float, values: dict[str, float]) -> None:
        if self.info.is_main and it % self.sched.log_interval == 0:
            append_json(self.metrics_path, {"type": "train", "model": self.name, "epoch": epoch + 1,
                                            "iter": it, "lr": lr, **values})
            self.runlog.scalars("train", {"lr": lr, **values}, it)

    def _end_epoch(self, epoch: int, state: LoopState, n: int, running: dict[str, float],
                   skipped: list[str], elapsed: float) -> None:
        """The epoch's summary, checkpoint and (when due) validation."""
        summary = {k: v / n for k, v in running.items()}
        if skipped:
            summary["skipped_images"] = len(skipped)
            log.warning("%s epoch %d: skipped %d undecodable image(s) on rank %d (e.g. %s)",
                        self.name, epoch + 1, len(skipped), self.info.rank, skipped[0])
        state.epoch = epoch + 1
        if not self.info.is_main:
            return
        append_json(self.metrics_path, {"type": "epoch", "model": self.name, "epoch": epoch + 1,
                                        "iter": state.iter, "time_s": round(elapsed, 3),
                                        "it_per_s": round(n / max(elapsed, 1e-9), 3), **summary})
        self.runlog.scalars("epoch", summary, state.iter)
        log.info("%s epoch %d/%d: %s (%.1fs)", self.name, epoch + 1, self.sched.epochs,
                 fmt_values(summary), elapsed)
        state.best, state.val_pending = self.validator.best, self.validator.due(epoch + 1)
        self._save(f"epoch_{epoch + 1}.pth", state)
        if self.sched.keep_checkpoints > 0:
            workdir.prune_epoch_checkpoints(self.work_dir, self.sched.keep_checkpoints)
        if state.val_pending:
            self._validate(state)

    def _save(self, name: str, state: LoopState) -> None:
        self.meta["ldpipe"].update(epoch=state.epoch, iter=state.iter)
        workdir.record_output(self.work_dir, name)  # before the file exists: never unrecorded
        save_checkpoint(os.path.join(self.work_dir, name), self.model, self.meta, **self.step.state(),
                        loop=state.to_dict(), rng=longrun.rng_state())
        link_latest(self.work_dir, name)
        workdir.remove_iter_checkpoints(self.work_dir, keep=name)

    def _validate(self, state: LoopState) -> None:
        record = self.validator(self.model, state.epoch, self.meta, self.info.device)
        append_json(self.metrics_path, {**record, "iter": state.iter})
        self.runlog.scalars("val", {k: v for k, v in record.items() if k.startswith("bbox")}, state.iter)
        state.val_pending = False


def _all_skipped(world_size: int, files: list[str]) -> None:
    """A batch whose images were all skipped: leave the step out (one process), or stop (under
    DDP every rank must take every step)."""
    if world_size > 1:
        from ..data import DataError
        raise DataError(f"every image of a batch is undecodable ({', '.join(files)}); under "
                        "torchrun a rank cannot leave a step out: remove these files from the split")
