"""Distillation plugged into the training loop: cached (default) or online teacher.

Both modes compute the same loss terms from the same student outputs; they
differ only in where the teacher's log-probabilities at the needed anchors
come from: the cache rows that travelled with the batch, or a teacher network
run on the batch (the reference implementation's way, kept for comparison).
"""
from __future__ import annotations

import torch

from ..cache import CacheError, CacheReader
from ..cache.codec import decode_packed
from ..cache.compat import check_compatible, class_kd_problem
from ..config import Pipeline, enabled_terms
from ..data import Variant
from ..engine.runtime import amp_context
from ..engine.train import Hook
from ..models import GFL, BatchTargets, DenseOutput, build_model
from ..models.checkpoint import file_sha256, load_weights
from ..models.detector import HEADS
from .loader import CacheTargets
from .losses import cls_kd_loss, ld_loss, vlr_loss


class _DistillBase(Hook):
    def __init__(self, pipe: Pipeline) -> None:
        self.cfg = pipe.distill
        self.terms = enabled_terms(pipe)
        self.with_vlr = "vlr" in self.terms

    def prepare(self, batch: dict, bt: BatchTargets, device: torch.device):
        """The teacher's side of this batch (computed once per step)."""
        raise NotImplementedError

    def teacher_at(self, src, batch: dict, flat: torch.Tensor,
                   need_cls: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher log-probs (or logits) at batch-flat anchors: box ``[k,4,B]``, cls ``[k,C]``."""
        raise NotImplementedError

    def losses(self, model: GFL, batch: dict, out: DenseOutput, bt: BatchTargets,
               extras: dict) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        cls_flat, reg_flat = out.flat_cls(), out.flat_reg()
        rb = out.reg_bins
        pos = extras["pos"]
        src = self.prepare(batch, bt, reg_flat.device)
        if "ld" in self.terms or "kd" in self.terms:
            t_box, t_cls = self.teacher_at(src, batch, pos)
            if "ld" in self.terms:
                terms["loss_ld"] = self.cfg.ld_weight * ld_loss(
                    reg_flat[pos].reshape(-1, rb), t_box.reshape(-1, rb), extras["pos_weight"],
                    self.cfg.ld_T)
            if "kd" in self.terms:
                terms["loss_kd"] = self.cfg.kd_weight * cls_kd_loss(
                    cls_flat[pos], t_cls, bt.label_weights[pos], bt.strides[pos], self.cfg.kd_T)
        if "vlr" in self.terms:
            vidx = torch.nonzero(bt.vlr > 0).squeeze(1)
            t_box, _ = self.teacher_at(src, batch, vidx, need_cls=False)
            terms["loss_ld_vlr"] = self.cfg.vlr_weight * vlr_loss(
                reg_flat[vidx].reshape(-1, rb), t_box.reshape(-1, rb), bt.vlr[vidx], self.cfg.vlr_T)
        return terms


class CachedTeacher(_DistillBase):
    """Teacher targets from a ``dump-teacher`` cache; the teacher is never built."""

    def __init__(self, pipe: Pipeline, cache_url: str) -> None:
        super().__init__(pipe)
        self.url = cache_url
        self.reader = CacheReader(cache_url)
        self.manifest = self.reader.manifest

    def sample_extra(self):
        # a GPU step gets the rows as stored (8 bits a value for int8: a quarter of the bytes
        # through the workers' shared memory and the copy) and decodes them on the device;
        # a CPU step gets them decoded by the workers (numpy, one thread each), which is
        # cheaper there than decoding in the training process (docs/benchmarks.md, "Reading")
        on_gpu = getattr(self, "device", None) is not None and self.device.type == "cuda"
        return CacheTargets(self.url, with_cls="kd" in self.terms, decode=not on_gpu)

    def variants(self, pipe: Pipeline) -> list[Variant]:
        return [Variant(v["scale_idx"], v["flip"]) for v in self.manifest.geometry.variants]

    def check(self, pipe: Pipeline, model_name: str, split) -> None:
        check_compatible(self.manifest, self.url, self.reader.table.shape[0], pipe, model_name,
                         split, self.terms)

    def lineage(self) -> dict:
        return self.manifest.lineage_entry(self.url)

    def teacher_at(self, src, batch, flat, need_cls=True):
        """Rows of the cached teacher at batch-flat anchor indices ``flat``."""
        rows, boxes, classes = src
        r = rows[flat]
        if (r < 0).any():
            bad = flat[r < 0][0]
            img = int(bad // (rows.shape[0] // len(batch["metas"])))
            meta = batch["metas"][img]
            raise CacheError(
                f"{self.url}: sample image_id={meta.image_id} variant {meta.variant} lacks "
                f"{int((r < 0).sum())} anchors the losses need (region policy "
                f"{self.manifest.region.policy!r} does not cover them)")
        t_box = boxes[r]
        t_cls = classes[r] if (need_cls and classes is not None) else None
        return t_box, t_cls

    def prepare(self, batch, bt, device):
        """Row of the batch's cached teacher targets for each batch-flat anchor (-1: not cached)."""
        n_total = bt.labels.shape[0]
        rows = torch.full((n_total,), -1, dtype=torch.long, device=device)
        boxes, classes, offset = [], [], 0
        for b, t in enumerate(batch["teacher"]):
            anchors = t["anchor"].to(device)
            n = anchors.shape[0]
            rows[bt.own_to_batch[b][anchors]] = torch.arange(offset, offset + n, device=device)
            boxes.append(_rows(t, "box", device))
            if t["cls"] is not None:
                classes.append(_rows(t, "cls", device))
            offset += n
        box = torch.cat(boxes) if boxes else torch.zeros(0, 4, 1, device=device)
        cls = torch.cat(classes) if classes else None
        return rows, box, cls


def _rows(t: dict, name: str, device: torch.device) -> torch.Tensor:
    """A sample's cached rows on ``device``, decoded there when they came as stored."""
    x = t[name].to(device, non_blocking=True)
    return decode_packed(x, t["codec"]) if "codec" in t else x


class OnlineTeacher(_DistillBase):
    """Runs a teacher network on every batch (the reference implementation's way)."""

    def __init__(self, pipe: Pipeline, teacher_model: str, checkpoint: str) -> None:
        super().__init__(pipe)
        self.model_name = teacher_model
        self.checkpoint = checkpoint
        self.net: GFL | None = None

    def check(self, pipe: Pipeline, model_name: str, split) -> None:
        student, teacher = pipe.model(model_name), pipe.model(self.model_name)
        if student.reg_max != teacher.reg_max:
            raise CacheError(f"reg_max: teacher {self.model_name!r} has {teacher.reg_max}, "
                             f"student {model_name!r} has {student.reg_max}")
        problem = ("kd" in self.terms and class_kd_problem(
            HEADS[teacher.head.type].cls_logits, teacher.head.type, student, model_name))
        if problem:
            raise CacheError(problem)
        # built under a forked RNG: the student (built after this) gets the same initial
        # weights for a given seed as with a cache, so online and cached runs compare
        with torch.random.fork_rng(devices=[]):
            self.net = build_model(teacher, len(split.classes))
        load_weights(self.net, self.checkpoint)
        self.net.to(self.device).eval()
        for p in self.net.parameters():
            p.requires_grad_(False)

    def lineage(self) -> dict:
        return {"online_teacher": {"model": self.model_name, "checkpoint": self.checkpoint,
                                   "sha256": file_sha256(self.checkpoint)}}

    @torch.no_grad()
    def prepare(self, batch, bt, device):
        """Run the teacher on the student's batch (same input, same anchor layout)."""
        with amp_context(device, self.use_amp):
            out = self.net(batch["img"].to(device))
        return out.flat_reg(), out.flat_cls()

    def teacher_at(self, src, batch, flat, need_cls=True):
        box, cls = src
        return box[flat], (cls[flat] if need_cls else None)
