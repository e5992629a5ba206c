"""A teacher run at ``2^k`` x its student's input (``cache.teacher_upscale``), stored in the
student's anchor addressing (docs/cache-format.md, section 11).

On an input ``f = 2^k`` times larger, the teacher's level of stride ``f * s`` has the grid of the
student's level of stride ``s`` (the teacher's input is padded to ``f`` x the student's padded
shape), its anchors are the student's times ``f`` (centres ``x * f * s``, sides
``anchor_scale * f * s``) and its edge distances, in stride units, are in the student's bins.  So
the teacher's row at (level of stride ``f * s``, y, x) is an exact target for the student's
anchor at (level of stride ``s``, y, x).  The student's levels whose ``f * s`` the teacher lacks
(its top ``k`` for equal stride lists) get no teacher rows: the distillation terms leave their
anchors out (``ldpipe.distill.criterion``).

:class:`Upscale` is the typed form of the manifest's ``teacher_upscale`` entry; the checks of a
teacher/student pair are :func:`upscale_plan`'s.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ConfigError, Pipeline
from ..models.anchors import make_grid

MAX_FACTOR = 64  # the largest factor the config accepts (2^6)


@dataclass(frozen=True)
class Upscale:
    """A dump's teacher factor and the student-level -> teacher-level correspondence."""

    factor: int  # f = 2^k
    strides: tuple[int, ...]  # the student's strides: the cache's addressing (geometry.strides)
    anchor_scale: float  # the student's (and the teacher's) octave base scale
    teacher_strides: tuple[int, ...]
    levels: tuple[int | None, ...]  # per student level: the teacher's level, None: no counterpart

    def entry(self) -> dict:
        """The manifest's ``teacher_upscale`` entry (JSON)."""
        return {"factor": self.factor, "teacher_strides": list(self.teacher_strides),
                "levels": list(self.levels)}

    @classmethod
    def of_entry(cls, entry: dict, strides, anchor_scale: float) -> "Upscale":
        return cls(int(entry["factor"]), tuple(int(s) for s in strides), float(anchor_scale),
                   tuple(int(s) for s in entry["teacher_strides"]), tuple(entry["levels"]))

    @property
    def served_strides(self) -> tuple[int, ...]:
        """The student strides whose anchors have teacher rows."""
        return tuple(s for s, t in zip(self.strides, self.levels) if t is not None)

    def teacher_pad(self, pad_shape) -> tuple[int, int]:
        """The teacher's padded input shape for a student sample padded to ``pad_shape``."""
        return int(pad_shape[0]) * self.factor, int(pad_shape[1]) * self.factor

    def served_count(self, pad_shape) -> int:
        """Anchors of the served levels of a student grid (a prefix of its flat layout)."""
        grid = make_grid(tuple(pad_shape), self.strides, self.anchor_scale)
        return sum(n for n, t in zip(grid.num_level_anchors, self.levels) if t is not None)

    def teacher_index(self, pad_shape) -> torch.Tensor:
        """``[served_count]`` int64: for each served anchor of the student's own grid (flat
        index ``j``), the flat index of its counterpart in the teacher's own grid (on
        :meth:`teacher_pad`): same ``(y, x)``, teacher level ``levels[l]``."""
        student = make_grid(tuple(pad_shape), self.strides, self.anchor_scale)
        teacher = make_grid(self.teacher_pad(pad_shape), self.teacher_strides, self.anchor_scale)
        offsets = [0]
        for n in teacher.num_level_anchors:
            offsets.append(offsets[-1] + n)
        out = []
        for size, t in zip(student.sizes, self.levels):
            if t is None:
                continue
            if teacher.sizes[t] != size:  # cannot happen for an f x padded input; never guess
                raise ValueError(f"teacher level {t} grid {teacher.sizes[t]} != student grid {size}")
            out.append(torch.arange(offsets[t], offsets[t] + size[0] * size[1]))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def served_strides(m) -> tuple[int, ...] | None:
    """The student strides a manifest ``m``'s rows serve (None: every level, no upscale)."""
    if not m.teacher_upscale:
        return None
    return Upscale.of_entry(m.teacher_upscale, m.geometry.strides, m.geometry.anchor_scale).served_strides


def upscale_line(entry: dict, strides) -> str:
    """``cache info``'s line for a manifest's ``teacher_upscale`` entry."""
    f, ts = entry["factor"], entry["teacher_strides"]
    pairs = ", ".join(f"{s} <- {ts[t]}" for s, t in zip(strides, entry["levels"]) if t is not None)
    none = [s for s, t in zip(strides, entry["levels"]) if t is None]
    return (f"upscale       teacher run at {f}x the student's input; student stride <- teacher "
            f"stride: {pairs}" + (f"; no teacher rows at stride {', '.join(map(str, none))} (left "
                                  "out of the distillation terms)" if none else ""))


def level_map(student_strides, teacher_strides, factor: int, teacher: str = "the teacher",
              student: str = "the student") -> tuple[int | None, ...]:
    """Per student level, the teacher level of stride ``factor`` x its stride (None: absent).

    Refused (:class:`ConfigError`): a student level without a counterpart below one with a
    counterpart (only the top levels may lack one), and no counterpart at all."""
    index = {int(s): i for i, s in enumerate(teacher_strides)}
    levels = tuple(index.get(int(s) * factor) for s in student_strides)
    served = [t is not None for t in levels]
    if not any(served):
        raise ConfigError(f"cache.teacher_upscale={factor}: {teacher} (strides {list(teacher_strides)}) "
                          f"has no level of stride {factor} x any of {student}'s strides "
                          f"{list(student_strides)}; its P(l+k) must exist for the student's P(l)")
    first_gap = served.index(False) if False in served else len(served)
    if any(served[first_gap:]):
        s = int(student_strides[first_gap])
        raise ConfigError(f"cache.teacher_upscale={factor}: {teacher} (strides {list(teacher_strides)}) "
                          f"has no level of stride {s * factor} for {student}'s stride {s}, but has "
                          f"levels above it; only the student's top levels may lack a counterpart")
    return levels


def upscale_plan(pipe: Pipeline, model_name: str, readers: list[str]) -> Upscale | None:
    """The dump of ``model_name`` for the models ``readers`` at ``cache.teacher_upscale``
    (None: 1, off), or a :class:`ConfigError` naming what cannot pair."""
    factor = pipe.cache.teacher_upscale
    if factor == 1:
        return None
    if pipe.cache.reused_head_idx >= 0:
        raise ConfigError(f"cache.teacher_upscale={factor} cannot be combined with "
                          f"cache.reused_head_idx={pipe.cache.reused_head_idx}: CrossKD's head part "
                          "runs on the student's own levels and batch statistics")
    t = pipe.model(model_name)
    first = pipe.model(readers[0])
    for name in readers:
        r = pipe.model(name)
        if (list(r.strides), r.anchor_scale) != (list(first.strides), first.anchor_scale):
            raise ConfigError(f"cache.teacher_upscale: the cache's readers must share one anchor "
                              f"grid; {readers[0]!r} has strides {list(first.strides)} anchor_scale "
                              f"{first.anchor_scale}, {name!r} has {list(r.strides)} {r.anchor_scale}")
    for field in ("reg_max", "anchor_scale"):
        if getattr(t, field) != getattr(first, field):
            raise ConfigError(f"cache.teacher_upscale: {field} of teacher {model_name!r} "
                              f"({getattr(t, field)}) differs from reader {readers[0]!r}'s "
                              f"({getattr(first, field)}); the rows would not be the student's targets")
    levels = level_map(first.strides, t.strides, factor, f"teacher {model_name!r}", f"reader {readers[0]!r}")
    return Upscale(factor, tuple(int(s) for s in first.strides), float(first.anchor_scale),
                   tuple(int(s) for s in t.strides), levels)


def entry_problem(entry, strides) -> tuple[str, object] | None:
    """``(field, value)`` of the first malformed field of a manifest's ``teacher_upscale``
    entry (``strides``: the manifest's geometry.strides), or None (also when absent)."""
    if entry is None:
        return None
    if not isinstance(entry, dict):
        return "teacher_upscale", entry
    f = entry.get("factor")
    if not isinstance(f, int) or isinstance(f, bool) or not 2 <= f <= MAX_FACTOR or f & (f - 1):
        return "teacher_upscale.factor", f
    ts = entry.get("teacher_strides")
    if not isinstance(ts, list) or not ts or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 < s <= 4096 * MAX_FACTOR for s in ts):
        return "teacher_upscale.teacher_strides", ts
    lv = entry.get("levels")
    if not isinstance(lv, list) or len(lv) != len(strides) or not all(
            x is None or (isinstance(x, int) and not isinstance(x, bool) and 0 <= x < len(ts)
                          and ts[x] == f * s) for x, s in zip(lv, strides)):
        return "teacher_upscale.levels", lv
    try:
        if tuple(lv) != level_map(strides, ts, f):
            return "teacher_upscale.levels", lv
    except ConfigError:
        return "teacher_upscale.levels", lv
    return None


__all__ = ["MAX_FACTOR", "Upscale", "entry_problem", "level_map", "served_strides", "upscale_line",
           "upscale_plan"]
