"""Distillation plugged into the training loop: cached (default) or online teacher.

Both modes compute the same loss terms from the same student outputs; they
differ only in where the teacher's log-probabilities at the needed anchors
come from: the cache rows that travelled with the batch, or a teacher network
run on the batch (the reference implementation's way, kept for comparison).
"""
from __future__ import annotations

import logging

import torch

from ..cache.region import SERVES
from ..cache.store import CacheError, CacheReader
from ..config import Pipeline
from ..data import Variant
from ..engine.train import Hook
from ..models import BatchTargets, GFL, build_model
from ..models.checkpoint import file_sha256, load_weights
from .loader import CacheTargets
from .losses import cls_kd_loss, ld_loss, vlr_loss

log = logging.getLogger("ldpipe.distill")


def enabled_terms(pipe: Pipeline) -> set[str]:
    d = pipe.distill
    return {name for name, on in (("ld", d.ld), ("vlr", d.vlr), ("kd", d.kd)) if on}


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

    def losses(self, model: GFL, batch: dict, cls_flat: torch.Tensor, reg_flat: torch.Tensor,
               bt: BatchTargets, extras: dict) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        rb = model.cfg.reg_max + 1
        pos = extras["pos"]
        src = self.prepare(batch, bt, reg_flat.device)
        if "ld" in self.terms or "kd" in self.terms:
            t_box, t_cls = self.teacher_at(src, batch, pos)
            if "ld" in self.terms:
                out["loss_ld"] = self.cfg.ld_weight * ld_loss(
                    reg_flat[pos].reshape(-1, rb), t_box.reshape(-1, rb), extras["pos_weight"],
                    self.cfg.ld_T)
            if "kd" in self.terms:
                out["loss_kd"] = self.cfg.kd_weight * cls_kd_loss(
                    cls_flat[pos], t_cls, bt.label_weights[pos], bt.strides[pos], self.cfg.kd_T)
        if "vlr" in self.terms:
            vidx = torch.nonzero(bt.vlr > 0).squeeze(1)
            t_box, _ = self.teacher_at(src, batch, vidx, need_cls=False)
            out["loss_ld_vlr"] = self.cfg.vlr_weight * vlr_loss(
                reg_flat[vidx].reshape(-1, rb), t_box.reshape(-1, rb), bt.vlr[vidx], self.cfg.vlr_T)
        return out


class CachedTeacher(_DistillBase):
    """Teacher targets from a ``dump-teacher`` cache; the teacher is never built."""

    def __init__(self, pipe: Pipeline, cache_url: str) -> None:
        super().__init__(pipe)
        self.url = cache_url
        self.reader = CacheReader(cache_url)
        self.manifest = self.reader.manifest

    def sample_extra(self):
        return CacheTargets(self.url, with_cls="kd" in self.terms)

    def variants(self, pipe: Pipeline) -> list[Variant]:
        return [Variant(v["scale_idx"], v["flip"]) for v in self.manifest["geometry"]["variants"]]

    def check(self, pipe: Pipeline, model_name: str, split) -> None:
        check_compatible(self.manifest, self.url, pipe, model_name, split, self.terms)

    def lineage(self) -> dict:
        m = self.manifest
        return {"cache": {"url": self.url, "cache_id": m.get("cache_id"),
                          "teacher_model": m["teacher"]["model"],
                          "teacher_sha256": m["teacher"]["checkpoint_sha256"],
                          "region": m["region"]["policy"], "codec": m["codec"],
                          "lineage": m.get("lineage") or {}}}

    def teacher_at(self, src, batch, flat, need_cls=True):
        """Rows of the cached teacher at batch-flat anchor indices ``flat``."""
        rows, boxes, classes = src
        r = rows[flat]
        if (r < 0).any():
            bad = flat[r < 0][0]
            img = int(bad // (rows.shape[0] // len(batch["metas"])))
            meta = batch["metas"][img]
            raise CacheError(
                f"{self.url}: sample image_id={meta['image_id']} variant {meta['variant']} lacks "
                f"{int((r < 0).sum())} anchors the losses need (region policy "
                f"{self.manifest['region']['policy']!r} does not cover them)")
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
            boxes.append(t["box"].to(device, non_blocking=True))
            if t["cls"] is not None:
                classes.append(t["cls"].to(device, non_blocking=True))
            offset += n
        box = torch.cat(boxes) if boxes else torch.zeros(0, 4, 1, device=device)
        cls = torch.cat(classes) if classes else None
        return rows, box, cls


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
        with torch.autocast(device.type, dtype=torch.float16, enabled=self.use_amp):
            cls_maps, reg_maps = self.net(batch["img"].to(device))
        head = self.net.bbox_head
        box = head.flatten(reg_maps).float().reshape(-1, 4, self.net.cfg.reg_max + 1)
        return box, head.flatten(cls_maps).float().reshape(-1, self.net.num_classes)

    def teacher_at(self, src, batch, flat, need_cls=True):
        box, cls = src
        return box[flat], (cls[flat] if need_cls else None)


def check_compatible(manifest: dict, url: str, pipe: Pipeline, model_name: str, split,
                     terms: set[str]) -> None:
    """Refuse, before the first step, a cache that cannot serve this student's losses."""
    cfg = pipe.model(model_name)
    geo = manifest["geometry"]
    problems = []

    def differ(what: str, cache_value, ours, fix: str) -> None:
        if cache_value != ours:
            problems.append(f"{what}: the cache has {cache_value!r}, model {model_name!r} "
                            f"has {ours!r} ({fix})")

    differ("reg_max", geo["reg_max"], cfg.reg_max, f"set models.{model_name}.reg_max or dump again")
    differ("strides", list(geo["strides"]), list(cfg.strides), f"set models.{model_name}.strides")
    differ("anchor_scale", geo["anchor_scale"], cfg.anchor_scale,
           f"set models.{model_name}.anchor_scale")
    differ("classes", list(geo["classes"]), list(split.classes), "the cache is for other classes")
    differ("input scales", [list(s) for s in geo["input_scales"]],
           [list(s) for s in pipe.data.train_scales], "set data.train_scales as the dump had it")
    differ("pad_divisor", geo["pad_divisor"], pipe.data.pad_divisor, "set data.pad_divisor")
    data = manifest["data"]
    if data["fingerprint"] != split.fingerprint:
        problems.append(f"data set: the cache was made for data fingerprint {data['fingerprint'][:16]} "
                        f"({data['num_images']} images), this pipeline's training split has "
                        f"{split.fingerprint[:16]} ({len(split.records)} images); dump the teacher "
                        f"on this data set")
    policy = manifest["region"]["policy"]
    missing = terms - SERVES[policy]
    if missing:
        problems.append(f"region policy {policy!r} cannot serve {sorted(missing)}; dump with "
                        f"cache.region='ld' or switch those terms off (distill.<term>=false)")
    if "kd" in terms and not manifest.get("store_cls"):
        problems.append("classification KD needs class logits, but the cache has none "
                        "(cache.store_cls=false); set distill.kd=false or dump again")
    if policy in ("main", "ld"):
        a = cfg.assigner
        served = [(s["topk"], s["ignore_iof_thr"]) for s in manifest["region"]["assigners"]]
        if (a.topk, a.ignore_iof_thr) not in served:
            problems.append(f"assigner: the {policy!r} region was computed for ATSS settings "
                            f"{served} (topk, ignore_iof_thr), model {model_name!r} uses "
                            f"{(a.topk, a.ignore_iof_thr)}; dump with this model in cache.readers")
    if problems:
        raise CacheError(f"cache {url} cannot train model {model_name!r}:\n  - " + "\n  - ".join(problems))
    stored = CacheReader(url).table.shape[0]
    if stored != manifest["num_samples"]:
        raise CacheError(f"cache {url} is incomplete ({stored} of "
                         f"{manifest['num_samples']} samples); rerun the dump-teacher command to finish it")
    log.info("cache %s (%s, %s, teacher %s) is compatible with %s", url, policy, manifest["codec"],
             manifest["teacher"]["model"], model_name)
