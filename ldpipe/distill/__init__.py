"""Distillation below the runners: teacher target sources -> loader -> criteria.

``sources`` (the contract), ``cached`` (rows of a ``dump-teacher`` cache), ``online`` (a
teacher network run every step), ``loader`` (per-sample cache rows in the loader workers),
``losses`` (the LD formulas) and ``criterion`` (GFL's losses, plus the LD terms).  The runner
that composes them with the training loop is ``ldpipe.engine.student``.
"""
from __future__ import annotations

from .cached import CachedTeacher
from .criterion import Criterion, DistillCriterion, GFLCriterion
from .online import OnlineTeacher
from .sources import TargetSource, TeacherBatch, TeacherRows

__all__ = ["CachedTeacher", "Criterion", "DistillCriterion", "GFLCriterion", "OnlineTeacher",
           "TargetSource", "TeacherBatch", "TeacherRows"]
