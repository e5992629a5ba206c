"""The pipeline file's schema: its vocabularies and the typed dataclasses it parses into.

``ldpipe.config.coerce._build`` turns a plain dict into one of these dataclasses, checking every
key, type and vocabulary word and naming the file and the dotted key of anything wrong
(``ldpipe.config.load`` reads the file).
"""
from __future__ import annotations

import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..errors import LdpipeError
from .augment import AugmentStep, ViewsConfig

# The vocabularies of the pipeline file, defined once as the Literal types of the fields that
# take them (``_coerce`` refuses any other word, naming file, key, value and the choices); the
# tuples are derived from them.  The modules that implement them import these (ldpipe.cache.region,
# ldpipe.cache.codec, ldpipe.cache.store, ldpipe.models.*); tests/config/test_config_resolved.py ties each
# to its dispatch table, so a word without an implementation (or the reverse) fails there.
DataFormat = Literal["coco", "voc"]
RegionPolicy = Literal["main", "ld", "overlap", "dense"]
Codec = Literal["fp32", "fp16", "int8"]
Compressor = Literal["zstd", "blosc"]
BoxLoss = Literal["giou", "ciou"]
BoxNorm = Literal["sum", "clamp"]
VlrRegion = Literal["reference", "diou"]
BackboneType = Literal["ResNet", "ResNeXt", "Res2Net"]  # mmdetection's names
HeadType = Literal["GFLHead", "GFocalHead"]  # GFL (v1) and GFocalV2 (its DGQP branch)
# test-time suppression (ldpipe.models.nms): greedy NMS, or the LD reference's Score-voting Cluster-DIoU-NMS
NmsKind = Literal["nms", "voting_cluster_diounms"]
# distill.ld_norm: how the LD and VLR terms reduce over a process's batch (ldpipe.distill.criterion)
LdNorm = Literal["sum", "image"]
# cache.cls_values: what a cache's class rows hold - the log-softmax over classes (what class KD
# reads; the default) or the raw logits (BCKD reads their per-class sigmoid, which a log-softmax
# has lost: ldpipe.distill.bckd)
ClsValues = Literal["log_probs", "logits"]

DATA_FORMATS = typing.get_args(DataFormat)
RESNET_DEPTHS = (18, 34, 50, 101)
REGION_POLICIES = typing.get_args(RegionPolicy)
CODECS = typing.get_args(Codec)
COMPRESSORS = typing.get_args(Compressor)
# cache.int8_box_step: default and largest value, in nats (ldpipe.cache.codec)
INT8_BOX_STEP = 0.125
MAX_INT8_BOX_STEP = 1.0  # half of it moves a value by 0.05 at T = 10
# the [distill] switches (ldpipe.config.enabled_terms reads them by name): LD's three terms,
# BCKD's two (ldpipe.distill.bckd) and CrossKD's two (ldpipe.distill.crosskd)
DISTILL_TERMS = ("ld", "vlr", "kd", "bckd_cls", "bckd_box", "crosskd_cls", "crosskd_reg")
BOX_LOSSES = typing.get_args(BoxLoss)
BOX_NORMS = typing.get_args(BoxNorm)
VLR_REGIONS = typing.get_args(VlrRegion)
BACKBONE_TYPES = typing.get_args(BackboneType)  # [models.NAME.backbone] type
BACKBONE_DEPTHS = {"ResNet": (18, 34, 50, 101), "ResNeXt": (50, 101), "Res2Net": (50, 101)}
DCN_TYPES = ("DCN", "DCNv2")  # mmcv's DeformConv2dPack / ModulatedDeformConv2dPack
HEAD_TYPES = typing.get_args(HeadType)
NMS_KINDS = typing.get_args(NmsKind)
LD_NORMS = typing.get_args(LdNorm)
CLS_VALUES = typing.get_args(ClsValues)


class ConfigError(LdpipeError):
    """A pipeline file or override is invalid; the message names file and key."""


@dataclass(frozen=True)
class DataConfig:
    """Where the images and annotations are, and the geometry of the inputs."""

    format: DataFormat = "coco"
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
    # data quality (README, "Data quality"): leave out images no decoder reads, counted, instead
    # of stopping a run (train, eval; a dump always stops); the fraction of a split's annotated
    # boxes that may be dropped (degenerate, or naming no image) before loading it is an error
    skip_undecodable_images: bool = False
    max_dropped_boxes: float = 0.5
    # random training augmentation, [[data.augment]] tables in mmdetection's vocabulary applied
    # in order (ldpipe.config.augment); empty (default): the fixed train_scales x flip variants
    augment: list[AugmentStep] = field(default_factory=list)

    def resolve(self, path: str) -> str:
        """A data path relative to ``root`` (absolute paths and URLs kept)."""
        if not path or "://" in path or os.path.isabs(path):
            return path
        return str(Path(self.root) / path)


@dataclass(frozen=True)
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
    # torch intra-op threads of every ldpipe process of this pipeline (0 = torch's default: one
    # per core).  CPU results depend on it (another summation order), so a pipeline whose numbers
    # are quoted pins it; set in [train] only (process-wide, not per model)
    threads: int = 0
    checkpoint_interval: int = 0  # also a resumable iter_N.pth every N iterations; 0 = off
    val_interval: int = 0  # evaluate on data.val every N epochs and keep best.pth; 0 = off
    tensorboard: bool = False  # scalars under WORK_DIR/tensorboard (pip install ldpipe[tensorboard])


@dataclass(frozen=True)
class AssignerConfig:
    """ATSS + VLR settings of a model; also what a cache's ``main`` / ``ld`` region was computed
    for (the manifest's ``region.assigners``, ``ldpipe.cache.region``).  Frozen: a dict key."""

    topk: int = 9
    ignore_iof_thr: float = -1.0  # >0: anchors covered by ignore boxes are neither pos nor neg
    # how the valuable localization region (VLR) decides membership, 0.25 thr <= D < thr:
    # "reference" - D as the LD reference code computes it (its IoU calculator in "diou" mode
    # takes the anchor's area as the union: intersection / area(anchor) - rho^2 / c^2);
    # "diou" - true DIoU, the paper's wording.  The VLR weights are the IoU either way.
    vlr_region: VlrRegion = "reference"


@dataclass(frozen=True)
class LossConfig:
    qfl_beta: float = 2.0
    qfl_weight: float = 1.0
    dfl_weight: float = 0.25
    box_weight: float = 2.0  # weight of the box loss, GIoU or CIoU (mmdetection's loss_bbox weight)
    # "giou" (the COCO recipes) or "ciou" (the LD reference's VOC recipe: its CIoULoss)
    box_loss: BoxLoss = "giou"
    # divisor of the box and DFL losses: "sum" = sum of the positives' weights + 1e-6, as the
    # LD reference's GFL and LD heads; "clamp" = max(sum, 1), as later mmdetection GFLHeads
    box_norm: BoxNorm = "sum"


@dataclass(frozen=True)
class TestConfig:
    score_thr: float = 0.05
    nms_pre: int = 1000
    nms_iou: float = 0.6
    max_per_img: int = 100
    # "nms" (class-wise IoU NMS) or "voting_cluster_diounms" (the LD reference's Score-voting
    # Cluster-DIoU-NMS, ldpipe.models.nms); nms_iou is its iou_threshold either way
    nms: NmsKind = "nms"


@dataclass(frozen=True)
class BackboneConfig:
    """``[models.NAME.backbone]``: the backbone in mmdetection's vocabulary (its ``ResNet``,
    ``ResNeXt`` and ``Res2Net`` arguments, same names and meaning).

    ``None`` = not given: ``depth`` and ``base_channels`` then come from the model's flat
    ``depth`` / ``base_channels`` shorthand, the rest from the type's defaults (resolved once,
    by the loader: :func:`ldpipe.config.load.resolve_backbone`; a loaded model's backbone has
    every value filled in).
    """

    type: BackboneType = "ResNet"
    depth: int | None = None  # None: the flat models.NAME.depth
    base_channels: int | None = None  # stem/first-stage width (mmdet: 64); None: the flat one
    groups: int | None = None  # ResNeXt cardinality (mmdet default 1)
    base_width: int | None = None  # ResNeXt: width per group (4); Res2Net: width per scale (26)
    scales: int | None = None  # Res2Net scales (4)
    # None, "DCN", "DCNv2" or mmdet's table {type = "DCN", deform_groups = 1, fallback_on_stride = false}
    dcn: str | dict | None = None
    stage_with_dcn: list[bool] = field(default_factory=lambda: [False, False, False, False])
    frozen_stages: int | None = None  # None: 1 with `pretrained`, else -1
    norm_eval: bool | None = None  # None: true with `pretrained`, else false


@dataclass(frozen=True)
class HeadConfig:
    """``[models.NAME.head]``: the head type, in the GFocalV2 reference's vocabulary.

    ``"GFLHead"`` (default) is GFL; ``"GFocalHead"`` adds GFocalV2's distribution-guided
    quality predictor (DGQP): the top ``reg_topk`` probabilities of each edge distribution
    (and their mean, ``add_mean``) feed ``reg_channels`` hidden units whose sigmoid output
    multiplies the class sigmoid.  The other head settings stay flat keys of the model.
    """

    type: HeadType = "GFLHead"
    reg_topk: int = 4  # GFocalHead only
    reg_channels: int = 64  # GFocalHead only
    add_mean: bool = True  # GFocalHead only
    # CrossKD with a teacher whose head is wider than this model's: > 0 adds two 1x1 convs
    # (``align_cls`` / ``align_reg``, trained with the student, unused at test time) that map
    # the student's held head features to this many channels (the teacher's) before they enter
    # the teacher's head part.  0 (default): the features enter as they are (equal widths, as
    # in the CrossKD reference, whose heads are all 256 wide)
    align_channels: int = 0


@dataclass(frozen=True)
class ModelConfig:
    """A GFL detector.  Defaults equal mmdetection's ``gfl_r50_fpn_1x_coco``."""

    depth: int = 50  # ResNet-18/34/50/101
    base_channels: int = 64  # stem/first-stage width (64 = torchvision; mmdetection's base_channels)
    channels: int = 256  # FPN and head channels
    stacked_convs: int = 4
    norm_groups: int = 32  # GroupNorm groups in the head (capped at channels)
    reg_max: int = 16
    strides: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128])
    anchor_scale: float = 8.0  # octave base scale
    pretrained: str = ""  # local path to ImageNet ResNet weights (optional)
    checkpoint: str = ""  # a given checkpoint (chains: take instead of training)
    # mmdetection's backbone vocabulary; the flat depth / base_channels above are its shorthand
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    assigner: AssignerConfig = field(default_factory=AssignerConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    test: TestConfig = field(default_factory=TestConfig)
    # overrides of the top-level train section, as the file wrote them (a plain dict, not to be
    # changed: the model's schedule is Pipeline.schedules[NAME], merged once by the loader)
    train: dict = field(default_factory=dict)


@dataclass(frozen=True)
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
    # "sum": LD and VLR summed over every image of the process's batch, as the LD reference
    # (its per-image weight grows with images per GPU: its README keeps them <= 3); "image":
    # that sum divided by the batch's images, so a term per image does not depend on it
    ld_norm: LdNorm = "sum"
    # BCKD (Yang et al., ICCV 2023; TinyTigerPan/BCKD), off by default; its recipe sets
    # ld_weight = vlr_weight = 0 and keeps class KD off.  Both terms read every valid anchor
    # (a cache with cache.region = "dense" and cache.cls_values = "logits"):
    # bckd_cls - binary classification distillation: BCE of the student's sigmoid scores
    #   against the teacher's, each class weighted by |sigma_t - sigma_s| ^ bckd_beta
    #   (the reference's NovelKDLoss, loss_kd, weight 1.0);
    # bckd_box - 1 - GIoU between the boxes decoded from the student's and the teacher's
    #   expected edge distances, each anchor weighted by max_c |sigma_t - sigma_s| (its
    #   loss_score_kd, a GIoULoss of weight 4.0); both / the number of positives
    bckd_cls: bool = False
    bckd_cls_weight: float = 1.0
    bckd_beta: float = 1.0
    bckd_box: bool = False
    bckd_box_weight: float = 4.0
    # CrossKD (Wang et al., CVPR 2024; jbwang1997/CrossKD, its GFL recipe
    # crosskd_r50_gflv1_r101-2x-ms_fpn_1x_coco.py), off by default: the student's head features
    # after conv ``cache.reused_head_idx`` (pre-activation), rescaled per channel to the
    # teacher's batch mean/std there, run through the teacher's remaining head convs and
    # prediction layers (frozen; from the cache), and those predictions distilled against the
    # teacher's own at every valid anchor (a cache dumped with cache.reused_head_idx >= 0,
    # cache.region = "dense", cache.cls_values = "logits"):
    # crosskd_cls - KD quality focal loss (BCE against the teacher's sigmoid, times
    #   |sigma_reused - sigma_t| ^ crosskd_beta), / the GFL positives normaliser (weight 1.0);
    # crosskd_reg - KL at T = crosskd_T on every edge distribution, weighted by the teacher's
    #   max class sigmoid, / 4 / the sum of those weights (weight 4.0 in the reference config;
    #   its paper's Table lists no box IoU term for GFL, and its config has none)
    crosskd_cls: bool = False
    crosskd_cls_weight: float = 1.0
    crosskd_beta: float = 1.0
    crosskd_reg: bool = False
    crosskd_reg_weight: float = 4.0
    crosskd_T: float = 1.0


@dataclass(frozen=True)
class CacheConfig:
    region: RegionPolicy = "ld"
    codec: Codec = "int8"
    # int8: the box rows' smallest quantisation step in nats (ldpipe.cache.codec; 0 = each row
    # over its own range, as caches before it); a common step lets neighbouring rows compress
    int8_box_step: float = INT8_BOX_STEP
    store_cls: bool = True
    # the class rows: "log_probs" (log-softmax over classes, what class KD reads) or "logits"
    # (raw logits: serves class KD and BCKD; fp32 or fp16 only, int8 stores values <= 0)
    cls_values: ClsValues = "log_probs"
    compressor: Compressor = "zstd"
    samples_per_shard: int = 64
    # rows per compressed chunk inside a unit's arrays: a read decodes every chunk its sample's
    # rows touch (docs/benchmarks.md, "Reading")
    chunk_rows: int = 1024
    batch_size: int = 4
    readers: list[str] = field(default_factory=list)  # models whose assigner sets the regions
    # CrossKD: >= 0 also stores the teacher's head part after conv ``reused_head_idx`` (convs
    # idx.. and the prediction layers, with its scales) and, per sample, the per-channel sums
    # and squared sums of its pre-activation head features after conv idx (per level and
    # tower), from which any batch's mean/std is combined exactly; -1 (default): neither.
    # The reference's reused_teacher_head_idx (3 of 4 convs: idx = stacked_convs - 1)
    reused_head_idx: int = -1
    writer_threads: int = 2  # dump: threads that encode, compress, checksum and commit units
    # a teacher run at this power-of-two factor (2^k) x the student's input: its level P(l+k)
    # is stored as the student's P(l) (same grid, anchors and edge-bin units); the student's top
    # k levels get no teacher rows (docs/cache-format.md, section 11).  1 (default): off
    teacher_upscale: int = 1
    # with [[data.augment]]: the views a dump draws and stores (ldpipe.config.augment.ViewsConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)


@dataclass(frozen=True)
class Pipeline:
    """A loaded pipeline file: every section typed, each model's schedule and backbone
    resolved once by the loader (:func:`ldpipe.config.load.load_pipeline`) and frozen.

    The dataclasses are frozen (no attribute can be set after loading: build another one
    with :func:`dataclasses.replace` or load again with overrides); their lists and dicts are
    plain containers that nothing may change either (they stay picklable and JSON-able).
    """

    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    models: dict[str, ModelConfig] = field(default_factory=dict)
    distill: DistillConfig = field(default_factory=DistillConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    chain: dict = field(default_factory=dict)
    name: str = ""
    source: str = ""  # path of the file it was read from (set by the loader)
    raw: dict = field(default_factory=dict, repr=False)  # the merged dict as read (extends, -o)
    bases: list[str] = field(default_factory=list)  # files it extends, in merge order (loader)
    overridden: list[str] = field(default_factory=list)  # dotted keys set by -o (loader)
    # each model's schedule: [train] < models.NAME.train < -o train.KEY < -o models.NAME.train.KEY
    # (merged by the loader, :func:`ldpipe.config.load.schedule_of`)
    schedules: dict[str, TrainConfig] = field(default_factory=dict, repr=False)

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
        """The schedule of one model (``schedules[name]``, merged by the loader)."""
        self.model(name)
        if name not in self.schedules:  # a Pipeline built in code, not by the loader
            raise ConfigError(f"{self.source or '<pipeline>'}: no schedule for model {name!r} "
                              "(schedules are merged by ldpipe.config.load_pipeline)")
        return self.schedules[name]

    def resolve(self, path: str) -> str:
        """A data path relative to ``data.root`` (:meth:`DataConfig.resolve`)."""
        return self.data.resolve(path)


# keys renamed in ldpipe 0.x (issue 21): (section, old key) -> new key.  A pipeline file or
# override that spells the old key is refused, naming the new one; dicts that ldpipe itself
# stored before the rename (chain stamps) keep the old names (ldpipe.config.load.legacy_names).
RENAMED: dict[tuple[str, str], str] = {
    ("ModelConfig", "base_width"): "base_channels",  # the stem width: the backbone table's name
    ("LossConfig", "giou_weight"): "box_weight",  # it weights CIoU too
}

__all__ = [
    "BACKBONE_DEPTHS", "BACKBONE_TYPES", "DCN_TYPES", "BackboneConfig",
    "BOX_LOSSES", "BOX_NORMS", "CODECS", "COMPRESSORS", "DATA_FORMATS", "DISTILL_TERMS",
    "REGION_POLICIES", "RESNET_DEPTHS", "VLR_REGIONS", "NMS_KINDS", "LD_NORMS", "CLS_VALUES",
    "AssignerConfig", "CacheConfig", "ConfigError", "DataConfig", "DistillConfig",
    "LossConfig", "ModelConfig", "Pipeline", "TestConfig", "TrainConfig",
]
__all__ += ["HEAD_TYPES", "HeadConfig", "INT8_BOX_STEP", "MAX_INT8_BOX_STEP", "RENAMED"]
__all__ += ["BackboneType", "BoxLoss", "BoxNorm", "ClsValues", "Codec", "Compressor", "DataFormat",
            "HeadType",
            "NmsKind", "RegionPolicy", "VlrRegion"]
