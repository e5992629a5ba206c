"""The online teacher: a teacher network run on every batch (the reference implementation's
way, kept to compare cached against online training)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache import CacheError
from ..cache.compat import CLS_TERMS, CROSSKD_TERMS, class_kd_problem, crosskd_pair_problem
from ..config import Pipeline, enabled_terms
from ..models import GFL, BatchTargets, HeadPart, load_detector
from ..models.checkpoint import file_sha256
from ..models.detector import HEADS
from ..models.device_ops import amp_context
from .crosskd import batch_stats
from .sources import TargetSource, TeacherBatch, TeacherRows


class OnlineTeacher(TargetSource):
    """Model ``teacher_model`` of ``pipe`` with the weights of ``checkpoint``, frozen, run on
    the student's input (same anchor layout) under the student's AMP setting."""

    def __init__(self, pipe: Pipeline, teacher_model: str, checkpoint: str,
                 device: torch.device = torch.device("cpu"), use_amp: bool = False) -> None:
        self.terms = enabled_terms(pipe)
        self.model_name, self.checkpoint = teacher_model, checkpoint
        self.device, self.use_amp = device, use_amp
        self.net: GFL | None = None
        # CrossKD: the pipeline's cache.reused_head_idx names the reused conv here too
        self.reuse_idx = pipe.cache.reused_head_idx if self.terms & CROSSKD_TERMS else None
        self._part: HeadPart | None = None

    def head_part(self, device: torch.device) -> HeadPart:
        if self._part is None:
            self._part = HeadPart.of_head(self.net.bbox_head, self.reuse_idx).to(device)
        return self._part

    def check(self, pipe: Pipeline, model_name: str, split) -> None:
        """Check the pairing, then build the teacher (on ``self.device``, frozen)."""
        student, teacher = pipe.model(model_name), pipe.model(self.model_name)
        if pipe.cache.teacher_upscale != 1:
            raise CacheError(f"cache.teacher_upscale={pipe.cache.teacher_upscale}: the online teacher "
                             "runs on the student's own input; dump the teacher (dump-teacher) to train "
                             "from a higher-resolution teacher, or set cache.teacher_upscale=1")
        if student.reg_max != teacher.reg_max:
            raise CacheError(f"reg_max: teacher {self.model_name!r} has {teacher.reg_max}, "
                             f"student {model_name!r} has {student.reg_max}")
        problem = (self.terms & CLS_TERMS and class_kd_problem(
            HEADS[teacher.head.type].cls_logits, teacher.head.type, student, model_name))
        if problem:
            raise CacheError(problem)
        if self.reuse_idx is not None:
            problem = crosskd_pair_problem(teacher, student, model_name, self.reuse_idx, self.model_name)
            if problem:
                raise CacheError(problem)
        # built under a forked RNG: the student (built after this) gets the same initial
        # weights for a given seed as with a cache, so online and cached runs compare
        with torch.random.fork_rng(devices=[]):
            self.net, _ = load_detector(teacher, len(split.classes), self.checkpoint, self.device)
        for p in self.net.parameters():
            p.requires_grad_(False)

    def lineage(self) -> dict:
        return {"online_teacher": {"model": self.model_name, "checkpoint": self.checkpoint,
                                   "sha256": file_sha256(self.checkpoint)}}

    @torch.no_grad()
    def prepare(self, batch: dict, bt: BatchTargets, device: torch.device) -> "OnlineBatch":
        """Run the teacher on the student's batch."""
        with amp_context(device, self.use_amp):
            img = batch["img"].to(device)
            out = self.net(img) if self.reuse_idx is None else self.net(img, hold=self.reuse_idx)
        got = OnlineBatch(out.flat_reg(), out.flat_cls())
        if self.reuse_idx is not None:  # the reference's: the teacher's own features on this batch
            got.head_stats = torch.stack([torch.stack([batch_stats(c), batch_stats(r)])
                                          for c, r in zip(*out.held)])
        return got


@dataclass
class OnlineBatch(TeacherBatch):
    box: torch.Tensor  # [B*N, 4, reg_max + 1] logits
    cls: torch.Tensor  # [B*N, C] logits

    def at(self, flat: torch.Tensor, need_cls: bool = True) -> TeacherRows:
        return TeacherRows(self.box[flat], self.cls[flat] if need_cls else None)
