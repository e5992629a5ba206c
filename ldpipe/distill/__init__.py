"""Distillation: teachers (cached or online) -> loader -> LD losses (``ldpipe train-student``)."""
from __future__ import annotations

from ..config import Pipeline
from ..engine.train import train
from ..engine.workdir import check_work_dir
from .teachers import CachedTeacher, OnlineTeacher


def train_student(pipe: Pipeline, model_name: str, work_dir: str, cache: str | None = None,
                  online_teacher: str | None = None, teacher_model: str = "teacher",
                  resume: bool = False, device: str | None = None, progress: bool = True,
                  overwrite: bool = False, command: list[str] | None = None) -> str:
    """Train ``model_name`` with LD from a cache (or, for comparison, an online teacher)."""
    if (cache is None) == (online_teacher is None):
        raise ValueError("give exactly one of a cache or an online teacher checkpoint")
    check_work_dir(work_dir, resume, overwrite)  # before the cache or teacher is opened
    hook = (CachedTeacher(pipe, cache) if cache is not None
            else OnlineTeacher(pipe, teacher_model, online_teacher))
    return train(pipe, model_name, work_dir, resume=resume, hook=hook, device=device,
                 progress=progress, overwrite=overwrite, command=command)


__all__ = ["CachedTeacher", "OnlineTeacher", "train_student"]
