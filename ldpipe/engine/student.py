"""``ldpipe train-student``: a student trained against a teacher's targets.

Composes the pieces below the runners - a teacher target source (``ldpipe.distill``: a cache's
rows, or for comparison a teacher network run every step), the distillation criterion (GFL's
losses + the enabled LD terms) - with the training loop (:func:`ldpipe.engine.train.train`).
"""
from __future__ import annotations

from ..config import Pipeline, enabled_terms
from ..data import load_split
from ..distill import CachedTeacher, DistillCriterion, OnlineTeacher, TargetSource
from . import runtime
from .train import TrainJob, train
from .workdir import check_work_dir


def distill_job(pipe: Pipeline, model_name: str, teacher: TargetSource, device) -> TrainJob:
    """The training job of ``model_name`` taught by ``teacher`` on ``device``: the source is
    checked against the student (and an online teacher built) before anything trains."""
    split = load_split(pipe.data, "train")
    teacher.check(pipe, model_name, split)
    criterion = DistillCriterion(pipe.distill, enabled_terms(pipe), teacher)
    return TrainJob(criterion, teacher.variants(pipe), teacher.sample_extra(device),
                    teacher.lineage(), split, views=teacher.views(pipe))


def train_student(pipe: Pipeline, model_name: str, work_dir: str, cache: str | None = None,
                  online_teacher: str | None = None, teacher_model: str = "teacher",
                  resume: bool = False, device: str | None = None, progress: bool = True,
                  overwrite: bool = False, command: list[str] | None = None,
                  resume_anyway: bool = False) -> str:
    """Train ``model_name`` with LD from a cache (or, for comparison, an online teacher's
    checkpoint); returns the final checkpoint's path."""
    if (cache is None) == (online_teacher is None):
        raise ValueError("give exactly one of a cache or an online teacher checkpoint")
    check_work_dir(work_dir, resume, overwrite)  # before the cache or teacher is opened
    dev = runtime.init(device).device
    use_amp = runtime.train_amp(pipe.train_for(model_name).amp, dev)  # the step's own rule
    teacher = (CachedTeacher(pipe, cache) if cache is not None
               else OnlineTeacher(pipe, teacher_model, online_teacher, dev, use_amp))
    return train(pipe, model_name, work_dir, resume=resume, job=distill_job(pipe, model_name, teacher, dev),
                 device=device, progress=progress, overwrite=overwrite, command=command,
                 resume_anyway=resume_anyway)
