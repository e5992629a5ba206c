"""``[[data.augment]]``: random training augmentation, in mmdetection's vocabulary.

Each table of the list is one step, applied in the order given; its ``type`` picks the step and
its other keys are that transform's arguments under mmdetection's names and with their meaning:

* ``Resize`` (mmdetection 2.x): ``img_scale`` (a list of ``[long, short]`` scales, keep-ratio),
  ``multiscale_mode`` ``"range"`` (two scales: the long and the short edge each drawn uniformly
  between the scales' long and short edges) or ``"value"`` (one of the scales), ``keep_ratio``;
* ``RandomFlip`` (2.x): ``flip_ratio``, ``direction`` (``horizontal`` | ``vertical`` | ``diagonal``);
* ``RandomCrop`` (2.x): ``crop_size`` ``[h, w]``, ``crop_type`` (``absolute``, ``absolute_range``,
  ``relative``, ``relative_range``), ``allow_negative_crop``;
* ``Mosaic`` (mmdetection 3 / YOLOX): ``img_scale`` ``[h, w]``, ``center_ratio_range``,
  ``pad_val``, ``prob``;
* ``MixUp`` (mmdetection 3 / YOLOX): ``img_scale`` ``[h, w]``, ``ratio_range``, ``flip_ratio``,
  ``pad_val``, ``max_iters``.

The steps are frozen typed records (a tagged union on ``type``: ``ldpipe.config.coerce`` builds
the one the word names); :func:`augment_problems` checks their values, one line per bad entry.
What they do to the pixels and boxes is ``ldpipe.data.augment``; what one draw of them is, a
*view*, ``ldpipe.data.views``.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal, Union

ResizeMode = Literal["range", "value"]
FlipDirection = Literal["horizontal", "vertical", "diagonal"]
CropType = Literal["absolute", "absolute_range", "relative", "relative_range"]
AugmentType = Literal["Resize", "RandomFlip", "RandomCrop", "Mosaic", "MixUp"]
AUGMENT_TYPES = typing.get_args(AugmentType)
CROP_TYPES = typing.get_args(CropType)
FLIP_DIRECTIONS = typing.get_args(FlipDirection)


@dataclass(frozen=True)
class ResizeStep:
    type: Literal["Resize"] = "Resize"
    img_scale: list[list[int]] = field(default_factory=lambda: [[1333, 800]])
    multiscale_mode: ResizeMode = "range"
    keep_ratio: bool = True  # false: resize to exactly [w, h] = the drawn scale


@dataclass(frozen=True)
class FlipStep:
    type: Literal["RandomFlip"] = "RandomFlip"
    flip_ratio: float = 0.5
    direction: FlipDirection = "horizontal"


@dataclass(frozen=True)
class CropStep:
    type: Literal["RandomCrop"] = "RandomCrop"
    crop_size: list[float] = field(default_factory=lambda: [384.0, 600.0])  # [h, w]
    crop_type: CropType = "absolute"
    # false: a crop that keeps no GT box is drawn again (mmdetection drops the sample and loads
    # another image; a view keeps its image: docs/cache-format.md, "Views")
    allow_negative_crop: bool = False


@dataclass(frozen=True)
class MosaicStep:
    type: Literal["Mosaic"] = "Mosaic"
    img_scale: list[int] = field(default_factory=lambda: [640, 640])  # [h, w] of one tile
    center_ratio_range: list[float] = field(default_factory=lambda: [0.5, 1.5])
    pad_val: float = 114.0
    prob: float = 1.0


@dataclass(frozen=True)
class MixUpStep:
    type: Literal["MixUp"] = "MixUp"
    img_scale: list[int] = field(default_factory=lambda: [640, 640])  # [h, w]
    ratio_range: list[float] = field(default_factory=lambda: [0.5, 1.5])
    flip_ratio: float = 0.5  # as mmdetection 3: the partner is flipped when U(0, 1) > flip_ratio
    pad_val: float = 114.0
    max_iters: int = 15  # draws of a partner with at least one GT box


ViewSchedule = Literal["pool", "epochs"]
VIEW_SCHEDULES = typing.get_args(ViewSchedule)


@dataclass(frozen=True)
class ViewsConfig:
    """``[cache.views]``: which views of ``[[data.augment]]`` a dump draws and stores.

    ``"pool"`` (FKD): ``count`` views per image; the student draws one per image and epoch,
    seeded by its ``train.seed``, so each view serves about ``epochs / count`` epochs.
    ``"epochs"`` (SRe2L): one view per image per epoch for ``count`` epochs; epoch ``e`` of the
    student reads view ``e`` (a student asking for more epochs is refused).  Either way the dump
    costs ``count`` teacher passes and ``count`` samples of rows per image.  ``seed`` seeds the
    draws (the epoch schedule's views are those ``ldpipe train`` draws with ``train.seed = seed``).
    """

    schedule: ViewSchedule = "pool"
    count: int = 8
    seed: int = 0


AugmentStep = Union[ResizeStep, FlipStep, CropStep, MosaicStep, MixUpStep]
STEP_TYPES = {cls.type: cls for cls in typing.get_args(AugmentStep)}


def _pair(value, whole: bool = False, positive: bool = True) -> bool:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return False
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        if whole and not float(v).is_integer():
            return False
        if positive and not v > 0:
            return False
    return True


def step_problem(step: AugmentStep) -> str | None:
    """What is wrong with one step's values (types and words were checked when it was built)."""
    if isinstance(step, ResizeStep):
        if not step.img_scale or not all(_pair(s, whole=True) for s in step.img_scale):
            return f"img_scale must be a list of [long, short] pixel pairs, got {step.img_scale!r}"
        if step.multiscale_mode == "range" and len(step.img_scale) not in (1, 2):
            return (f"multiscale_mode 'range' takes one or two scales (the range's ends), got "
                    f"{len(step.img_scale)}: use multiscale_mode = \"value\" to pick one of several")
    elif isinstance(step, FlipStep):
        if not 0.0 <= step.flip_ratio <= 1.0:
            return f"flip_ratio must be in [0, 1], got {step.flip_ratio}"
    elif isinstance(step, CropStep):
        absolute = step.crop_type.startswith("absolute")
        if not _pair(step.crop_size, whole=absolute):
            return (f"crop_size must be [h, w] of {'whole pixels > 0' if absolute else 'fractions'}"
                    f" for crop_type {step.crop_type!r}, got {step.crop_size!r}")
        if not absolute and not all(0 < v <= 1 for v in step.crop_size):
            return f"crop_size of crop_type {step.crop_type!r} must be in (0, 1], got {step.crop_size!r}"
        if step.crop_type == "absolute_range" and step.crop_size[0] > step.crop_size[1]:
            return f"crop_size of crop_type 'absolute_range' is [min, max], got {step.crop_size!r}"
    elif isinstance(step, (MosaicStep, MixUpStep)):
        if not _pair(step.img_scale, whole=True):
            return f"img_scale must be [h, w] in whole pixels > 0, got {step.img_scale!r}"
        if not 0.0 <= step.pad_val <= 255.0:
            return f"pad_val must be in [0, 255], got {step.pad_val}"
        rng = step.center_ratio_range if isinstance(step, MosaicStep) else step.ratio_range
        name = "center_ratio_range" if isinstance(step, MosaicStep) else "ratio_range"
        if not _pair(rng) or rng[0] > rng[1]:
            return f"{name} must be [low, high] with 0 < low <= high, got {rng!r}"
        if isinstance(step, MosaicStep) and not 0.0 <= step.prob <= 1.0:
            return f"prob must be in [0, 1], got {step.prob}"
        if isinstance(step, MixUpStep):
            if not 0.0 <= step.flip_ratio <= 1.0:
                return f"flip_ratio must be in [0, 1], got {step.flip_ratio}"
            if step.max_iters < 1:
                return f"max_iters must be >= 1, got {step.max_iters}"
    return None


def augment_problems(steps) -> list[str]:
    """One ``data.augment[i] (Type): problem`` line per bad step."""
    out = []
    for i, step in enumerate(steps):
        problem = step_problem(step)
        if problem:
            out.append(f"data.augment[{i}] ({step.type}): {problem}")
    return out


__all__ = ["VIEW_SCHEDULES", "ViewSchedule", "ViewsConfig", "AUGMENT_TYPES", "AugmentStep", "AugmentType", "CROP_TYPES", "CropStep", "CropType",
           "FLIP_DIRECTIONS", "FlipDirection", "FlipStep", "MixUpStep", "MosaicStep", "ResizeMode",
           "ResizeStep", "STEP_TYPES", "augment_problems", "step_problem"]
