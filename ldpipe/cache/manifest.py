"""The cache manifest: what made the cache and what it can serve, as a typed record.

Stored as the root group's ``ldpipe_cache`` attribute (JSON).  :meth:`Manifest.parse`
reads and version-checks it once; everything else reads typed fields.  The
*identity* fields decide whether a rerun may resume into an existing store;
``cache_id`` is a hash of them (the cache fingerprint that chains and students record).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import sys
import typing
from dataclasses import dataclass, field

import numpy as np

from ..errors import LdpipeError
from ..provenance import versions
from ..config import MAX_INT8_BOX_STEP, AssignerConfig, DataConfig, ModelConfig, Pipeline
from ..models.anchors import Grid, make_grid
from ..models.detector import HEADS, backbone_label
from .codec import CODEC_TABLE, codec_for
from .headspec import head_part_problem
from .plain import plain_value, short as _short  # noqa: F401 (plain_value: re-exported)
from .region import entry_setting
from .upscale import entry_problem as upscale_problem

FORMAT = "ldpipe-teacher-cache"
FORMAT_VERSION = 2
VIEWS_FORMAT_VERSION = 3  # a cache of seeded views (its ``views`` entry): version-2 readers refuse it
IDENTITY = ("teacher", "geometry", "data", "region", "codec", "compressor", "store_cls",
            "samples_per_shard", "chunk_rows")
# identity fields added later, absent from the manifests of caches made before them (their identity, id unchanged)
LATER_IDENTITY = ("codec_clip", "codec_step", "cls_values", "head_part", "teacher_upscale", "views")
# bounds of a sane manifest (check_numbers): a damaged or hostile one must not divide by zero or allocate terabytes
MAX_REG_MAX = 1024
MAX_CLASSES = 100_000
MAX_SAMPLES = 1 << 40
# columns of the per-sample table (``units/*/samples`` and ``index/samples``)
SAMPLE_FIELDS = ("sample", "image_index", "image_id", "variant", "row_start", "row_count",
                 "img_h", "img_w", "pad_h", "pad_w", "flip", "ori_h", "ori_w")
F = {name: i for i, name in enumerate(SAMPLE_FIELDS)}


class CacheError(LdpipeError):
    """A cache is missing, corrupt, incomplete or incompatible; the message says which."""


@dataclass
class TeacherInfo:
    model: str
    # type, backbone, depth, base_width, channels, stacked_convs, reg_max; base_width is the stem
    # width (the pipeline's models.NAME.base_channels), kept under its format-version-2 name
    architecture: dict
    checkpoint_sha256: str


@dataclass
class Geometry:
    """The input geometry and anchor layout the teacher's rows refer to."""

    strides: list[int]
    anchor_scale: float
    reg_max: int
    num_classes: int
    classes: list[str]
    input_scales: list[list[int]]
    pad_divisor: int
    variants: list[dict]  # {"key", "scale_idx", "flip"} per variant, in variant order

    @classmethod
    def of_model(cls, cfg: ModelConfig, data: DataConfig, classes, variants) -> "Geometry":
        """The geometry a model ``cfg`` sees on ``data`` over ``classes`` with the data set's
        ``variants`` (what a dump records and what a student is compared with)."""
        return cls(strides=list(cfg.strides), anchor_scale=cfg.anchor_scale, reg_max=cfg.reg_max,
                   num_classes=len(classes), classes=list(classes),
                   input_scales=[list(s) for s in data.train_scales],
                   pad_divisor=data.pad_divisor,
                   variants=[{"key": v.key, "scale_idx": v.scale_idx, "flip": v.flip} for v in variants])

    def differences(self, other: "Geometry", fields=None) -> list[tuple[str, object, object]]:
        """``(field, ours, theirs)`` for each field (of ``fields``; default all) that differs;
        lists and tuples compare by their items."""
        out = []
        for f in fields or [f.name for f in dataclasses.fields(self)]:
            a, b = plain_value(getattr(self, f)), plain_value(getattr(other, f))
            if a != b:
                out.append((f, getattr(self, f), getattr(other, f)))
        return out

    @property
    def reg_bins(self) -> int:
        return self.reg_max + 1

    def grid(self, pad_shape) -> Grid:
        return make_grid(tuple(int(x) for x in pad_shape), self.strides, self.anchor_scale)


@dataclass
class DataInfo:
    format: str
    split: str
    fingerprint: str
    num_images: int
    image_ids: list[int]


@dataclass
class RegionInfo:
    policy: str
    # {"topk", "ignore_iof_thr", "vlr_region", "models"} the main/ld regions were made for
    # ("vlr_region" absent: a cache from before it was a setting, made with true DIoU), kept as
    # stored; written by region.manifest_entries, read by settings()
    assigners: list[dict]

    def settings(self) -> list[AssignerConfig]:
        """The assigner settings the region was computed for, in entry order."""
        return [entry_setting(e) for e in self.assigners]


@dataclass
class Manifest:
    format: str
    format_version: int
    teacher: TeacherInfo
    geometry: Geometry
    data: DataInfo
    region: RegionInfo
    codec: str
    compressor: str
    store_cls: bool
    samples_per_shard: int
    chunk_rows: int
    variants: list[str]
    num_samples: int
    num_units: int
    created: str
    command: str
    pipeline: dict
    checkpoint_path: str
    versions: dict
    lineage: dict = field(default_factory=dict)  # the cache the teacher was trained from, if any
    cache_id: str = ""
    # the encoder's clip in nats (Codec.clip); None for fp32, and absent from caches written
    # before it was recorded (then the codec's ``legacy_clip`` applies: int8 clipped at 40)
    codec_clip: float | None = None
    # int8: the box rows' smallest quantisation step in nats (cache.int8_box_step); None for other
    # codecs and for step 0 (every row over its own range, as caches before the setting did)
    codec_step: float | None = None
    # what the stored ``cls`` rows are the log-softmax of (docs/cache-format.md, section 3): absent/
    # None = "joint" (GFL teachers, every cache before GFocalV2): logits whose sigmoid is the joint
    # class-IoU score; "class" (GFocalV2): the class score only (the DGQP quality multiplies it)
    cls_logits: str | None = None
    # the stored ``cls`` rows (cache.cls_values): None = log-softmax over the classes (every cache
    # before BCKD); "logits" = the raw logits (BCKD reads their sigmoid)
    cls_values: str | None = None
    # CrossKD: {"idx", "channels", "levels", "stacked_convs", "sha256": {parameter: sha256}} of the
    # head_part/ arrays, whose units hold featstats (docs/cache-format.md, section 10); None = neither
    head_part: dict | None = None
    teacher_upscale: dict | None = None  # a teacher at 2^k x the student's input (cache.upscale)
    # {"schedule", "count", "seed", "augment", "sha256"} of stored views (ldpipe.cache.views); None: fixed variants
    views: dict | None = None

    # ------------------------------------------------------------ (de)serialising
    @classmethod
    def parse(cls, raw, url: str) -> "Manifest":
        """The manifest of the cache at ``url``, or a :class:`CacheError` naming what is wrong."""
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise CacheError(f"{url} is not an ldpipe teacher cache (no {FORMAT!r} manifest)")
        version = raw.get("format_version")
        if version not in (FORMAT_VERSION, VIEWS_FORMAT_VERSION) or (version == VIEWS_FORMAT_VERSION) != isinstance(raw.get("views"), dict):
            raise CacheError(f"{url}: cache format version {version}{' with views' if raw.get('views') else ''} is not "
                             f"supported (this ldpipe reads version {FORMAT_VERSION}, and {VIEWS_FORMAT_VERSION} with views)")
        m = _build(cls, raw, "", url)
        check_numbers(m, url)
        return m

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for key in ("codec_clip", "codec_step", "cls_logits", "cls_values", "head_part", "teacher_upscale",
                    "views"):
            if d[key] is None:
                del d[key]
        return d

    def clip(self) -> float | None:
        """The encoder's clip (legacy caches: what the ldpipe that wrote them used)."""
        if self.codec_clip is not None:
            return self.codec_clip
        coder = CODEC_TABLE.get(self.codec)
        return coder.legacy_clip if coder is not None else None

    @property
    def box_step(self) -> float:
        """The int8 box rows' smallest step (0: per-row range, as caches without it)."""
        return float(self.codec_step or 0.0)

    def cls_meaning(self) -> str:
        """``"joint"`` or ``"class"``: what the ``cls`` rows are (see ``cls_logits``)."""
        return self.cls_logits or "joint"

    @property
    def has_head_stats(self) -> bool:
        """Whether the cache holds the teacher head part and per-sample feature statistics."""
        return self.head_part is not None

    @property
    def teacher_head(self) -> str:
        """The teacher's head type (absent from the architecture: ``GFLHead``)."""
        return (self.teacher.architecture.get("head") or {}).get("type", "GFLHead")

    # ------------------------------------------------------------ identity
    def identity(self) -> dict:
        d = self.to_dict()
        return {k: d[k] for k in IDENTITY + LATER_IDENTITY if k in d}

    def compute_id(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]

    def identity_diff(self, new: "Manifest") -> list[str]:
        """Human lines for each identity field that differs (``self``: the existing cache)."""
        out = []
        old_id, new_id = self.identity(), new.identity()
        for key in [*IDENTITY, *LATER_IDENTITY]:
            a, b = old_id.get(key), new_id.get(key)
            if a == b:
                continue
            if isinstance(a, dict) and isinstance(b, dict):
                for sub in sorted(set(a) | set(b)):
                    if a.get(sub) != b.get(sub):
                        out.append(f"{key}.{sub}: cache has {_short(a.get(sub))}, "
                                   f"this run has {_short(b.get(sub))}")
            elif key == "codec_step" and self.codec == new.codec == "int8":
                out.append(f"codec_step (cache.int8_box_step): cache has {self.box_step:g} nat"
                           f"{' (written before the setting existed)' if a is None else ''}, this run "
                           f"has {new.box_step:g}; to resume it, -o cache.int8_box_step={self.box_step:g}")
            else:
                out.append(f"{key}: cache has {_short(a)}, this run has {_short(b)}")
        return out

    # ------------------------------------------------------------ reading helpers
    @property
    def num_variants(self) -> int:
        return len(self.variants)

    def row_bytes(self) -> int:
        """Decoded bytes of one stored row (anchor index + box + class values)."""
        coder = codec_for(self.codec)
        extra, item = coder.trailer, coder.bytes_per_value
        cls = (self.geometry.num_classes + extra) * item if self.store_cls else 0
        return 4 + 4 * (self.geometry.reg_bins + extra) * item + cls

    def sample_label(self, rec: np.ndarray) -> str:
        v = int(rec[F["variant"]])
        key = self.variants[v] if 0 <= v < len(self.variants) else f"#{v}"
        return f"sample {int(rec[F['sample']])} (image {int(rec[F['image_id']])}, variant {key})"

    def lineage_chain(self) -> list[str]:
        """Readable chain from this cache's teacher back to the root teacher."""
        t = self.teacher
        lines = [f"{t.model} ({t.architecture.get('backbone')}, sha256 {str(t.checkpoint_sha256)[:12]})"
                 f" -> this cache {self.cache_id}"]
        lin, depth = self.lineage or {}, 0
        for src in (lin.get("ensemble") or []):  # a merged cache (ldpipe.cache.merge): its sources
            lines.append(f"  averages cache {src.get('cache_id')} at {src.get('url')} made by "
                         f"{src.get('teacher_model')} (sha256 {str(src.get('teacher_sha256'))[:12]})")
        while lin and lin.get("cache") and depth < 32:
            src = lin.get("cache") or {}
            lines.append(f"  trained from cache {src.get('cache_id')} at {src.get('url')} "
                         f"made by {src.get('teacher_model')} (sha256 {str(src.get('teacher_sha256'))[:12]})")
            lin = src.get("lineage") or {}
            depth += 1
        return lines

    def lineage_entry(self, url: str) -> dict:
        """What a model trained from this cache records as its lineage."""
        return {"cache": {"url": url, "cache_id": self.cache_id, "teacher_model": self.teacher.model,
                          "teacher_sha256": self.teacher.checkpoint_sha256,
                          "region": self.region.policy, "codec": self.codec,
                          "lineage": self.lineage or {}}}


def _build(cls, raw: dict, where: str, url: str):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        path = f"{where}.{f.name}" if where else f.name
        if f.name not in raw:
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                continue
            raise CacheError(f"{url}: the manifest lacks {path!r} (damaged or not written by ldpipe)")
        value, tp = raw[f.name], hints[f.name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise CacheError(f"{url}: manifest field {path!r} is not a table")
            value = _build(tp, value, path, url)
        kwargs[f.name] = value
    return cls(**kwargs)


def check_numbers(m: "Manifest", url: str) -> None:
    """Refuse a manifest whose numbers no writer produces (zero strides, huge sizes, ...)."""
    geo = m.geometry

    def bad(what: str, value) -> typing.NoReturn:
        raise CacheError(f"{url}: the manifest's {what} is {value!r}, which no dump writes "
                         "(damaged or edited manifest)")

    strides = geo.strides
    if not isinstance(strides, list) or not strides or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 < s <= 4096 for s in strides):
        bad("geometry.strides", strides)
    for what, value, low, high in (("geometry.reg_max", geo.reg_max, 1, MAX_REG_MAX),
                                   ("geometry.num_classes", geo.num_classes, 1, MAX_CLASSES),
                                   ("geometry.pad_divisor", geo.pad_divisor, 1, 4096),
                                   ("samples_per_shard", m.samples_per_shard, 1, MAX_SAMPLES),
                                   ("chunk_rows", m.chunk_rows, 1, 1 << 30),
                                   ("data.num_images", m.data.num_images, 0, MAX_SAMPLES),
                                   ("num_samples", m.num_samples, 0, MAX_SAMPLES),
                                   ("num_units", m.num_units, 0, MAX_SAMPLES)):
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            bad(what, value)
    if not isinstance(geo.anchor_scale, (int, float)) or not 0 < geo.anchor_scale < 1e4:
        bad("geometry.anchor_scale", geo.anchor_scale)
    if not m.variants or m.num_samples != m.data.num_images * len(m.variants):
        bad("num_samples", m.num_samples)
    if m.num_units != math.ceil(m.num_samples / m.samples_per_shard):
        bad("num_units", m.num_units)
    step = m.codec_step
    if step is not None and (isinstance(step, bool) or not isinstance(step, (int, float))
                             or not 0 <= step <= MAX_INT8_BOX_STEP):
        bad("codec_step", step)
    if m.cls_values not in (None, "logits"):
        bad("cls_values", m.cls_values)
    if (problem := head_part_problem(m.head_part) or upscale_problem(m.teacher_upscale, strides)):
        bad(*problem)
    if m.views is not None and m.views.get("count") != len(m.variants):
        bad("views.count", m.views.get("count"))


# ---------------------------------------------------------------------- building
def architecture(cfg: ModelConfig) -> dict:
    # "ResNet-50" for a plain ResNet (as format version 2 always wrote), else e.g. "ResNeXt-101-32x4d-DCN(c4-c5)"
    # "base_width": the stem width under the name every version-2 manifest has (identity, cache id)
    arch = {"type": "GFL", "backbone": backbone_label(cfg.backbone), "depth": cfg.depth,
            "base_width": cfg.base_channels, "channels": cfg.channels,
            "stacked_convs": cfg.stacked_convs, "reg_max": cfg.reg_max}
    if cfg.head.type != "GFLHead" or cfg.head.align_channels:  # absent: a GFLHead, as before
        arch["head"] = {k: v for k, v in dataclasses.asdict(cfg.head).items() if k != "align_channels" or v}
    return arch


#: the libraries whose versions a manifest records (besides ldpipe and python)
MANIFEST_LIBRARIES = ("torch", "zarr", "numcodecs")


def build(pipe: Pipeline, model_name: str, checkpoint: str, checkpoint_sha: str, ckpt_meta: dict,
          split, split_name: str, variants, assigners: list[dict], num_units: int) -> Manifest:
    """The manifest of a dump of ``model_name`` over ``split`` (records, classes, fingerprint)."""
    cfg = pipe.model(model_name)
    cache = pipe.cache
    m = Manifest(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        teacher=TeacherInfo(model_name, architecture(cfg), checkpoint_sha),
        geometry=Geometry.of_model(cfg, pipe.data, split.classes, variants),
        data=DataInfo(pipe.data.format, split_name, split.fingerprint, len(split.records),
                      [int(i) for i in split.image_ids]),
        region=RegionInfo(cache.region, assigners),
        codec=cache.codec,
        compressor=cache.compressor,
        store_cls=cache.store_cls,
        samples_per_shard=cache.samples_per_shard,
        chunk_rows=cache.chunk_rows,
        variants=[v.key for v in variants],
        num_samples=len(split.records) * len(variants),
        num_units=num_units,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join(sys.argv),
        pipeline={"source": pipe.source, "name": pipe.name},
        checkpoint_path=checkpoint,
        versions=versions(MANIFEST_LIBRARIES),
        # the cache this teacher was itself trained from (and its own lineage), if any
        lineage=(ckpt_meta.get("ldpipe") or {}).get("lineage") or {},
    )
    m.codec_clip = codec_for(cache.codec).clip
    # step 0 is what caches before the setting did: no field, so their identity (and id) is kept
    m.codec_step = float(cache.int8_box_step) if cache.codec == "int8" and cache.int8_box_step > 0 else None
    if cache.store_cls and cache.cls_values != "log_probs":
        m.cls_values = cache.cls_values
    if HEADS[cfg.head.type].cls_logits != "joint":
        m.cls_logits = HEADS[cfg.head.type].cls_logits
    m.cache_id = m.compute_id()
    return m

