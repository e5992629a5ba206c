"""Pipeline files: declarative TOML parsed into typed dataclasses.

A pipeline file describes a whole experiment: the data set, the named models
(``teacher``, ``ta``, ``student``, ...), the training schedule, and the cache and
chain settings.  It is parsed with :mod:`tomllib` and never executed.  Unknown
keys are errors that name the key and the file.

Overrides use dotted paths, ``-o train.epochs=1 -o data.root=/x``; the value is
read as a TOML literal when it parses as one (``1``, ``0.5``, ``true``,
``[640, 480]``) and as a plain string otherwise.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


# The vocabularies of the pipeline file, defined once (the modules that implement them
# import these: ldpipe.cache.region, ldpipe.cache.codec, ldpipe.cache.store).
DATA_FORMATS = ("coco", "voc")
RESNET_DEPTHS = (18, 34, 50, 101)
REGION_POLICIES = ("main", "ld", "overlap", "dense")
CODECS = ("fp32", "fp16", "int8")
COMPRESSORS = ("zstd", "blosc")
DISTILL_TERMS = ("ld", "vlr", "kd")
BOX_LOSSES = ("giou", "ciou")
BOX_NORMS = ("sum", "clamp")
VLR_REGIONS = ("reference", "diou")


class ConfigError(ValueError):
    """A pipeline file or override is invalid; the message names file and key."""


@dataclass
class DataConfig:
    """Where the images and annotations are, and the geometry of the inputs."""

    format: str = "coco"  # "coco" or "voc"
    root: str = "."  # relative paths below are resolved against it
    # COCO: annotation JSON and image folder per split.  VOC: split names of
    # ImageSets/Main/<split>.txt (the *_images keys are unused).
    train: str = "annotations/train.json"
    val: str = "annotations/val.json"
    train_images: str = "images/train"
    val_images: str = "images/val"
    classes: list[str] = field(default_factory=list)  # VOC: required; COCO: from JSON
    train_scales: list[list[int]] = field(default_factory=lambda: [[1333, 800]])
    test_scale: list[int] = field(default_factory=lambda: [1333, 800])
    flip: bool = True  # horizontal-flip variant during training
    pad_divisor: int = 32
    mean: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])
    std: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])
    to_rgb: bool = True


@dataclass
class TrainConfig:
    """Schedule; the ``train`` section holds defaults a model may override."""

    epochs: int = 12
    batch_size: int = 2  # per process
    lr: float = 0.0  # 0 = 0.01 * total_batch / 16 (the linear scaling rule)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 500
    warmup_ratio: float = 0.001
    steps: list[int] = field(default_factory=lambda: [8, 11])  # epochs where lr *= gamma
    gamma: float = 0.1
    grad_clip: float = 0.0  # max grad norm; 0 disables
    workers: int = 2
    seed: int = 0
    amp: bool = True  # used on CUDA only
    log_interval: int = 10
    max_iters_per_epoch: int = 0  # 0 = whole epoch; >0 truncates (smoke runs)
    keep_checkpoints: int = 0  # keep the newest N epoch_*.pth (with optimizer state); 0 = all


@dataclass
class AssignerConfig:
    topk: int = 9
    ignore_iof_thr: float = -1.0  # >0: anchors covered by ignore boxes are neither pos nor neg
    # how the valuable localization region (VLR) decides membership, 0.25 thr <= D < thr:
    # "reference" - D as the LD reference code computes it (its IoU calculator in "diou" mode
    # takes the anchor's area as the union: intersection / area(anchor) - rho^2 / c^2);
    # "diou" - true DIoU, the paper's wording.  The VLR weights are the IoU either way.
    vlr_region: str = "reference"


@dataclass
class LossConfig:
    qfl_beta: float = 2.0
    qfl_weight: float = 1.0
    dfl_weight: float = 0.25
    giou_weight: float = 2.0  # weight of the box loss (GIoU or CIoU)
    # "giou" (the COCO recipes) or "ciou" (the LD reference's VOC recipe: its CIoULoss)
    box_loss: str = "giou"
    # divisor of the box and DFL losses: "sum" = sum of the positives' weights + 1e-6, as the
    # LD reference's GFL and LD heads; "clamp" = max(sum, 1), as later mmdetection GFLHeads
    box_norm: str = "sum"


@dataclass
class TestConfig:
    score_thr: float = 0.05
    nms_pre: int = 1000
    nms_iou: float = 0.6
    max_per_img: int = 100


@dataclass
class ModelConfig:
    """A GFL detector.  Defaults equal mmdetection's ``gfl_r50_fpn_1x_coco``."""

    depth: int = 50  # ResNet-18/34/50/101
    base_width: int = 64  # ResNet stem/stage width (64 = torchvision)
    channels: int = 256  # FPN and head channels
    stacked_convs: int = 4
    norm_groups: int = 32  # GroupNorm groups in the head (capped at channels)
    reg_max: int = 16
    strides: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128])
    anchor_scale: float = 8.0  # octave base scale
    pretrained: str = ""  # local path to ImageNet ResNet weights (optional)
    checkpoint: str = ""  # a given checkpoint (chains: take instead of training)
    assigner: AssignerConfig = field(default_factory=AssignerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    test: TestConfig = field(default_factory=TestConfig)
    train: dict = field(default_factory=dict)  # overrides of the top-level train section


@dataclass
class DistillConfig:
    """LD losses read from the cache (names and defaults as the LD paper)."""

    ld: bool = True
    ld_weight: float = 0.25
    ld_T: float = 10.0
    vlr: bool = True
    vlr_weight: float = 0.25
    vlr_T: float = 10.0
    kd: bool = True
    kd_weight: float = 10.0
    kd_T: float = 2.0


@dataclass
class CacheConfig:
    region: str = "ld"  # one of REGION_POLICIES
    codec: str = "int8"  # one of CODECS
    store_cls: bool = True
    compressor: str = "zstd"  # one of COMPRESSORS
    samples_per_shard: int = 64
    batch_size: int = 4
    readers: list[str] = field(default_factory=list)  # models whose assigner sets the regions


@dataclass
class Pipeline:
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    models: dict[str, ModelConfig] = field(default_factory=dict)
    distill: DistillConfig = field(default_factory=DistillConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    chain: dict = field(default_factory=dict)
    name: str = ""
    source: str = ""  # path of the file it was read from (set by the loader)
    raw: dict = field(default_factory=dict, repr=False)  # the merged dict, for hashing

    # ------------------------------------------------------------------ helpers
    @property
    def classes(self) -> list[str]:
        return list(self.data.classes)

    def model(self, name: str) -> ModelConfig:
        if name not in self.models:
            known = ", ".join(sorted(self.models)) or "none"
            raise ConfigError(f"{self.source}: no model {name!r} (declared: {known})")
        return self.models[name]

    def train_for(self, name: str) -> TrainConfig:
        """The schedule of one model: the ``train`` section with its overrides."""
        model = self.model(name)
        merged = dataclasses.asdict(self.train)
        for key, value in model.train.items():
            if key not in merged:
                raise ConfigError(f"{self.source}: unknown key models.{name}.train.{key}")
            merged[key] = value
        return _build(TrainConfig, merged, f"models.{name}.train", self.source)

    def resolve(self, path: str) -> str:
        """A data path relative to ``data.root`` (absolute paths and URLs kept)."""
        if not path or "://" in path or os.path.isabs(path):
            return path
        return str(Path(self.data.root) / path)


# ---------------------------------------------------------------------- parsing
def parse_value(text: str) -> Any:
    """Read an override value as a TOML literal, else as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(raw: dict, assignment: str, source: str = "<override>") -> None:
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} is not KEY=VALUE")
    key, text = assignment.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"override {assignment!r}: bad key {key!r}")
    cur = raw
    for part in parts[:-1]:
        nxt = cur.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {assignment!r}: {part!r} is not a section in {source}")
        cur = nxt
    cur[parts[-1]] = parse_value(text.strip())


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(tp: Any, value: Any, where: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {where} must be a table, got {value!r}")
        return _build(tp, value, where, source)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {where} must be a table, got {value!r}")
        args = typing.get_args(tp)
        if args and _is_dataclass_type(args[1]):
            return {k: _coerce(args[1], v, f"{where}.{k}", source) for k, v in value.items()}
        return dict(value)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {where} must be a list, got {value!r}")
        (inner,) = typing.get_args(tp) or (Any,)
        return [_coerce(inner, v, f"{where}[{i}]", source) for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {where} must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {where} must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {where} must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {where} must be a string, got {value!r}")
        return value
    return value


def _build(cls: type, values: dict, where: str, source: str):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        if key not in known or key in ("source", "raw"):
            raise ConfigError(f"{source}: unknown key {path!r}")
        kwargs[key] = _coerce(hints[key], value, path, source)
    return cls(**kwargs)


def load_pipeline(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Pipeline:
    """Read a pipeline file, apply dotted overrides and validate it."""
    path = str(path)
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"pipeline file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    raw = copy.deepcopy(raw)
    for assignment in overrides:
        apply_override(raw, assignment, path)
    pipe = _build(Pipeline, raw, "", path)
    pipe.source = path
    pipe.raw = raw
    if not pipe.name:
        pipe.name = Path(path).stem
    validate(pipe)
    return pipe


def validate(pipe: Pipeline) -> None:
    src = pipe.source
    d = pipe.data
    if d.format not in DATA_FORMATS:
        raise ConfigError(f"{src}: data.format must be {_alternatives(DATA_FORMATS)}, got {d.format!r}")
    if d.format == "voc" and not d.classes:
        raise ConfigError(f"{src}: data.classes is required for VOC data")
    if not d.train_scales or any(len(s) != 2 for s in d.train_scales):
        raise ConfigError(f"{src}: data.train_scales must be a list of [long, short] pairs")
    if len(d.test_scale) != 2:
        raise ConfigError(f"{src}: data.test_scale must be [long, short]")
    for name, m in pipe.models.items():
        if m.depth not in RESNET_DEPTHS:
            raise ConfigError(f"{src}: models.{name}.depth must be {_alternatives(RESNET_DEPTHS)}, "
                              f"got {m.depth}")
        if m.reg_max < 1:
            raise ConfigError(f"{src}: models.{name}.reg_max must be >= 1, got {m.reg_max}")
        for key, allowed in (("box_loss", BOX_LOSSES), ("box_norm", BOX_NORMS)):
            value = getattr(m.loss, key)
            if value not in allowed:
                raise ConfigError(f"{src}: models.{name}.loss.{key} must be {_alternatives(allowed)}, "
                                  f"got {value!r}")
        if m.assigner.vlr_region not in VLR_REGIONS:
            raise ConfigError(f"{src}: models.{name}.assigner.vlr_region must be "
                              f"{_alternatives(VLR_REGIONS)}, got {m.assigner.vlr_region!r}")
        t = pipe.train_for(name)  # validates per-model overrides
        if t.keep_checkpoints < 0:
            raise ConfigError(f"{src}: train.keep_checkpoints for model {name!r} must be >= 0 "
                              f"(0 keeps all), got {t.keep_checkpoints}")
    for key, allowed in (("region", REGION_POLICIES), ("codec", CODECS), ("compressor", COMPRESSORS)):
        value = getattr(pipe.cache, key)
        if value not in allowed:
            raise ConfigError(f"{src}: cache.{key} must be {_alternatives(allowed)}, got {value!r}")


def enabled_terms(pipe: Pipeline) -> set[str]:
    """The LD loss terms switched on in ``[distill]``."""
    return {term for term in DISTILL_TERMS if getattr(pipe.distill, term)}


def _alternatives(values) -> str:
    return "|".join(str(v) for v in values)


def to_dict(obj: Any) -> Any:
    """Dataclass (or container of them) to plain JSON-able data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if f.name != "raw"}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


__all__ = [
    "BOX_LOSSES", "BOX_NORMS", "CODECS", "COMPRESSORS", "DATA_FORMATS", "DISTILL_TERMS",
    "REGION_POLICIES", "RESNET_DEPTHS", "VLR_REGIONS",
    "enabled_terms", "AssignerConfig", "CacheConfig", "ConfigError", "DataConfig", "DistillConfig",
    "LossConfig", "ModelConfig", "Pipeline", "TestConfig", "TrainConfig",
    "apply_override", "load_pipeline", "parse_value", "to_dict",
]
