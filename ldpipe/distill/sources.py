"""Where a student's teacher targets come from: the contract every target source keeps.

A *source* gives, for one training batch, the teacher's edge-distribution and class
log-probabilities (or logits) at any batch-flat anchors the criterion asks for.  Two exist:
:class:`~ldpipe.distill.cached.CachedTeacher` (rows of a ``dump-teacher`` cache that travelled
with the batch; the teacher is never built) and :class:`~ldpipe.distill.online.OnlineTeacher`
(a teacher network run on the batch, the reference implementation's way).  A later source (a
teacher *part* run on the student's features) is one more subclass.

Before training, the runner (``ldpipe.engine.student``) asks a source for the variants the
loader must serve, the per-sample loader extra that fetches its rows, its lineage, and to check
that it can serve the student; during training the criterion calls :meth:`TargetSource.prepare`
once per step and :meth:`TeacherBatch.at` for each region it reads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..config import Pipeline
from ..data import Variant, train_variants
from ..models import BatchTargets


@dataclass(frozen=True)
class TeacherRows:
    """The teacher at ``k`` requested anchors (rows in the order asked)."""

    box: torch.Tensor  # [k, 4, reg_max + 1] edge-distribution log-probabilities or logits
    cls: torch.Tensor | None  # [k, C] class log-probabilities or logits; None when not asked


class TeacherBatch:
    """The teacher's side of one batch, prepared once per step."""

    # CrossKD: the teacher's (mean, unbiased std) per level, tower (cls, reg) and channel of
    # its towers' input to the reused conv over this batch, ``[L, 2, 2, C]``; None otherwise
    head_stats: torch.Tensor | None = None
    # the student strides whose anchors the teacher has targets at; None: every level.  A teacher
    # run at 2^k x the student's input (cache.teacher_upscale) has none at the student's top k
    # levels, whose anchors the criterion leaves out of the distillation terms
    strides: tuple[int, ...] | None = None

    def at(self, flat: torch.Tensor, need_cls: bool = True) -> TeacherRows:
        """The teacher at batch-flat anchor rows ``flat`` ``[k]`` (int64)."""
        raise NotImplementedError


class TargetSource:
    """A teacher as the training run sees it (no-op defaults where a source needs nothing)."""

    # CrossKD: the head conv whose input the student holds and feeds through
    # :meth:`head_part` (None: the source serves no CrossKD term)
    reuse_idx: int | None = None

    def head_part(self, device: torch.device):
        """CrossKD: the teacher's frozen :class:`~ldpipe.models.HeadPart` on ``device``."""
        raise NotImplementedError("this teacher source serves no CrossKD head part")

    def variants(self, pipe: Pipeline) -> list[Variant]:
        """The (scale, flip) variants the student's loader serves."""
        return train_variants(pipe.data)

    def views(self, pipe: Pipeline):
        """The stored views the loader serves (a :class:`~ldpipe.data.viewset.ViewTable`), or
        None: the pipeline's own (fixed variants, or views drawn from its seed)."""
        return None

    def sample_extra(self, device: torch.device) -> Callable | None:
        """A picklable per-sample loader hook (``meta -> dict`` merged into the sample), or None."""
        return None

    def check(self, pipe: Pipeline, model_name: str, split) -> None:
        """Refuse (an ldpipe error naming the problem) a student this source cannot teach."""

    def lineage(self) -> dict:
        """What the student's checkpoint records about its teacher."""
        return {}

    def prepare(self, batch: dict, bt: BatchTargets, device: torch.device) -> TeacherBatch:
        raise NotImplementedError
