"""Whether a cache can serve a student: checked before its first training step.

Each problem names the cache's value, the student's value and how to fix it.  A
student may read a cache only if the teacher's rows refer to the anchors, inputs
and classes the student sees, and the stored region covers what its losses read.
"""
from __future__ import annotations

import logging

from ..config import DISTILL_TERMS, REGION_POLICIES, DataConfig, ModelConfig
from ..models.detector import HEADS
from .manifest import CacheError, Geometry, Manifest, plain_value
from .views import views_problems

log = logging.getLogger("ldpipe.cache")

# which loss terms each region policy can serve: all but ``main`` (ATSS positives only)
# hold the valuable localization region that VLR reads; BCKD reads every valid anchor, which
# only ``dense`` stores
BCKD_TERMS = {"bckd_cls", "bckd_box"}
# CrossKD reads every valid anchor too, and the cache's head part and feature statistics
CROSSKD_TERMS = {"crosskd_cls", "crosskd_reg"}
DENSE_TERMS = BCKD_TERMS | CROSSKD_TERMS
SERVES = {policy: ({"ld", "kd"} if policy == "main" else
                   set(DISTILL_TERMS) if policy == "dense" else set(DISTILL_TERMS) - DENSE_TERMS)
          for policy in REGION_POLICIES}
# the terms that read the teacher's class rows (BCKD's box term and CrossKD's KL weight anchors
# by them)
CLS_TERMS = {"kd"} | DENSE_TERMS
# the terms that read raw class logits (their sigmoid)
LOGIT_TERMS = DENSE_TERMS
# the dump-teacher settings a BCKD cache needs (CrossKD: also cache.reused_head_idx)
BCKD_DUMP = "-o cache.region=dense -o cache.cls_values=logits -o cache.codec=fp32 (or fp16)"

# the distillation methods by their [distill] terms (what `cache info` lists)
METHODS = {"LD": ("ld", "vlr", "kd"), "BCKD": ("bckd_cls", "bckd_box"),
           "CrossKD": ("crosskd_cls", "crosskd_reg")}


def served_terms(m: Manifest) -> list[str]:
    """The [distill] terms the stored rows of manifest ``m`` can serve (its region, whether it
    holds class rows and what they are; a student's assigner is checked when it trains)."""
    out = set(SERVES[m.region.policy])
    if not m.store_cls:
        out -= CLS_TERMS
    elif m.cls_values != "logits":
        out -= LOGIT_TERMS
    if not m.head_part:
        out -= CROSSKD_TERMS
    return [t for t in DISTILL_TERMS if t in out]


def served_methods(m: Manifest) -> dict[str, list[str]]:
    """``{method: [its terms this cache serves]}`` for the methods it serves a term of."""
    served = set(served_terms(m))
    return {name: [t for t in terms if t in served] for name, terms in METHODS.items()
            if served & set(terms)}


# the geometry fields a student must share with the cache: (label, how to fix), in check order
# (num_classes follows from classes; the variants are checked per sample by the loader, so
# ``ours`` is built without them)
GEOMETRY_FIXES = {
    "reg_max": ("reg_max", "set models.{model}.reg_max or dump again"),
    "strides": ("strides", "set models.{model}.strides"),
    "anchor_scale": ("anchor_scale", "set models.{model}.anchor_scale"),
    "classes": ("classes", "the cache is for other classes"),
    "input_scales": ("input scales", "set data.train_scales as the dump had it"),
    "pad_divisor": ("pad_divisor", "set data.pad_divisor"),
}


def compatibility_problems(m: Manifest, cfg: ModelConfig, data: DataConfig, model_name: str,
                           split, terms: set[str]) -> list[str]:
    """Every reason the cache of manifest ``m`` cannot train student ``model_name`` (its
    config ``cfg``, on the ``data`` section) on ``split`` (``classes``, ``fingerprint``,
    ``records``) with the LD ``terms``."""
    ours = Geometry.of_model(cfg, data, split.classes, [])
    problems = []
    for field, cached, mine in m.geometry.differences(ours, list(GEOMETRY_FIXES)):
        label, fix = GEOMETRY_FIXES[field]
        problems.append(f"{label}: the cache has {plain_value(cached)!r}, model {model_name!r} "
                        f"has {plain_value(mine)!r} ({fix.format(model=model_name)})")
    problems += views_problems(m, data)
    if m.data.fingerprint != split.fingerprint:
        problems.append(f"data set: the cache was made for data fingerprint {m.data.fingerprint[:16]} "
                        f"({m.data.num_images} images), this pipeline's training split has "
                        f"{split.fingerprint[:16]} ({len(split.records)} images); dump the teacher "
                        f"on this data set")
    policy = m.region.policy
    missing = terms - SERVES[policy]
    if missing:
        need = "'dense' (every anchor)" if missing & DENSE_TERMS else "'ld'"
        problems.append(f"region policy {policy!r} cannot serve {sorted(missing)}; dump with "
                        f"cache.region={need} or switch those terms off (distill.<term>=false)")
    if "kd" in terms and not m.store_cls:
        problems.append("classification KD needs class logits, but the cache has none "
                        "(cache.store_cls=false); set distill.kd=false or dump again")
    bckd = sorted(terms & BCKD_TERMS)
    if bckd and not (m.store_cls and m.cls_values == "logits"):
        held = "no class rows" if not m.store_cls else "class log-probabilities, whose sigmoid is lost"
        problems.append(f"BCKD ({', '.join(bckd)}) needs the teacher's raw class logits at every "
                        f"valid anchor, but the cache has {held}; dump again with {BCKD_DUMP}")
    crosskd = sorted(terms & CROSSKD_TERMS)
    if crosskd and not (m.store_cls and m.cls_values == "logits"):
        problems.append(f"CrossKD ({', '.join(crosskd)}) needs the teacher's raw class logits at "
                        f"every valid anchor; dump again with {BCKD_DUMP} -o cache.reused_head_idx=K")
    if crosskd and not m.head_part:
        problems.append(f"CrossKD ({', '.join(crosskd)}) needs the teacher's head part and feature "
                        f"statistics, which this cache lacks; dump again with "
                        f"-o cache.reused_head_idx=K (K = the teacher's stacked_convs - 1 as the "
                        f"CrossKD recipe)")
    elif crosskd:
        p = m.head_part
        problem = _held_problem(cfg, model_name, p["idx"], p["channels"], "the cache's teacher")
        if problem:
            problems.append(problem)
    if terms & CLS_TERMS and m.store_cls:
        problem = class_kd_problem(m.cls_meaning(), m.teacher_head, cfg, model_name)
        if problem:
            problems.append(problem)
    if policy in ("main", "ld"):
        a = cfg.assigner
        specs = m.region.settings()
        served = [(s.topk, s.ignore_iof_thr) for s in specs]
        if (a.topk, a.ignore_iof_thr) not in served:
            problems.append(f"assigner: the {policy!r} region was computed for ATSS settings "
                            f"{served} (topk, ignore_iof_thr), model {model_name!r} uses "
                            f"{(a.topk, a.ignore_iof_thr)}; dump with this model in cache.readers")
        elif policy == "ld" and "vlr" in terms:
            cached = sorted({s.vlr_region for s in specs if (s.topk, s.ignore_iof_thr) ==
                             (a.topk, a.ignore_iof_thr)})
            if a.vlr_region not in cached:
                problems.append(f"VLR region: the cache stores the valuable localization region of "
                                f"the {' / '.join(repr(c) for c in cached)} definition, model "
                                f"{model_name!r} uses {a.vlr_region!r} (assigner.vlr_region); dump "
                                f"again with it, use a cache.region that covers both ('overlap' or "
                                f"'dense'), or set models.{model_name}.assigner.vlr_region")
    return problems


def _held_problem(cfg, model_name: str, idx: int, channels: int, teacher: str) -> str | None:
    """Why student ``cfg`` cannot feed its held features to a head part from conv ``idx`` of
    ``channels`` channels, or None."""
    if cfg.head.type != "GFLHead":
        return (f"CrossKD is implemented for GFLHead students; model {model_name!r} has "
                f"{cfg.head.type}")
    if idx >= cfg.stacked_convs:
        return (f"CrossKD: {teacher} reuses its head from conv {idx}, model {model_name!r} has "
                f"{cfg.stacked_convs} stacked convs (it must have conv {idx} to hold its input)")
    held = cfg.head.align_channels or cfg.channels
    if held != channels:
        return (f"CrossKD: {teacher}'s head part takes {channels} channels, model {model_name!r} "
                f"holds {held} (its channels); set models.{model_name}.head.align_channels={channels} "
                f"(1x1 maps trained with the student)")
    return None


def crosskd_pair_problem(teacher_cfg, student_cfg, model_name: str, idx: int,
                         teacher_name: str) -> str | None:
    """An online teacher ``teacher_cfg``'s head part from conv ``idx`` and the student: why
    they cannot pair, or None."""
    if idx < 0:
        return ("CrossKD needs the reused head conv: set cache.reused_head_idx (the CrossKD "
                "recipe: the teacher's stacked_convs - 1)")
    if teacher_cfg.head.type != "GFLHead" or idx >= teacher_cfg.stacked_convs:
        return (f"CrossKD: teacher {teacher_name!r} ({teacher_cfg.head.type}, "
                f"{teacher_cfg.stacked_convs} stacked convs) has no GFLHead conv {idx} to reuse")
    return _held_problem(student_cfg, model_name, idx, teacher_cfg.channels, f"teacher {teacher_name!r}")


def class_kd_problem(teacher_logits: str, teacher_head: str, cfg, model_name: str) -> str | None:
    """Why class KD cannot pair these logits, or None.

    Class KD compares the teacher's and the student's ``gfl_cls`` logits (the LD reference's
    LDHead and LDv2Head both do, each with its own head type on both sides).  For GFL their
    sigmoid is the joint class-IoU score, for GFocalV2 the class score alone (its DGQP quality
    multiplies it), so a teacher of one kind cannot teach a student of the other; the edge
    distributions mean the same for both heads (LD and VLR are unaffected).
    """
    ours = HEADS[cfg.head.type].cls_logits
    if ours == teacher_logits:
        return None
    return (f"class KD: the teacher ({teacher_head}) gives {teacher_logits!r} class logits, model "
            f"{model_name!r} ({cfg.head.type}) has {ours!r} class logits ('joint': their sigmoid is "
            f"the class-IoU score, GFLHead; 'class': the class score the DGQP quality multiplies, "
            f"GFocalHead); set distill.kd=false (LD and VLR still apply) or use a teacher with "
            f"the student's head type")


def check_compatible(m: Manifest, url: str, stored_samples: int, cfg: ModelConfig,
                     data: DataConfig, model_name: str, split, terms: set[str]) -> None:
    """Refuse, with every problem listed, a cache that cannot serve the losses of student
    ``model_name`` (config ``cfg``, data section ``data``)."""
    problems = compatibility_problems(m, cfg, data, model_name, split, terms)
    if problems:
        raise CacheError(f"cache {url} cannot train model {model_name!r}:\n  - " + "\n  - ".join(problems))
    if stored_samples != m.num_samples:
        raise CacheError(f"cache {url} is incomplete ({stored_samples} of {m.num_samples} samples); "
                         "rerun the dump-teacher command to finish it")
    log.info("cache %s (%s, %s, teacher %s) is compatible with %s", url, m.region.policy, m.codec,
             m.teacher.model, model_name)
