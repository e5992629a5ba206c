"""Reading pipeline files: TOML -> overrides -> typed :class:`Pipeline` -> validation.

A pipeline file is parsed with :mod:`tomllib` and never executed.  Overrides use dotted
paths, ``-o train.epochs=1 -o data.root=/x``; the value is read as a TOML literal when it
parses as one (``1``, ``0.5``, ``true``, ``[640, 480]``) and as a plain string otherwise.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import tomllib
from pathlib import Path
from typing import Any

from .checks import check_values
from .extends import resolve_extends
from .schema import HEAD_TYPES
from .schema import (BOX_LOSSES, BOX_NORMS, CODECS, COMPRESSORS, DATA_FORMATS, DISTILL_TERMS,
                     REGION_POLICIES, RESNET_DEPTHS, VLR_REGIONS, ConfigError, Pipeline, _build)
from .schema import BACKBONE_DEPTHS, BACKBONE_TYPES, DCN_TYPES, BackboneConfig, ModelConfig
from .schema import MAX_INT8_BOX_STEP, NMS_KINDS


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
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a pipeline file (binary, not UTF-8 TOML text)") from None
    except (IsADirectoryError, PermissionError) as exc:
        raise ConfigError(f"{path}: cannot read the pipeline file ({exc.strerror})") from None
    raw = copy.deepcopy(raw)
    raw = resolve_extends(raw, path, bases := [])
    for assignment in overrides:
        apply_override(raw, assignment, path)
    pipe = _build(Pipeline, raw, "", path)
    pipe.source = path
    pipe.raw = raw
    pipe.bases = bases
    pipe.overridden = override_paths(overrides)
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
        section = pipe.raw.get("models", {}).get(name) if pipe.raw else None
        m.backbone = resolve_backbone(m, f"models.{name}", src,
                                      set(section) if isinstance(section, dict) else None)
        m.depth, m.base_width = m.backbone.depth, m.backbone.base_channels
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
        if "threads" in m.train:
            raise ConfigError(f"{src}: models.{name}.train.threads: the thread count is process-wide; "
                              f"set train.threads in [train]")
        _validate_head(src, name, m)
        if m.test.nms not in NMS_KINDS:
            raise ConfigError(f"{src}: models.{name}.test.nms must be {_alternatives(NMS_KINDS)}, "
                              f"got {m.test.nms!r}")
        if not 0.0 <= m.test.nms_iou <= 1.0:
            raise ConfigError(f"{src}: models.{name}.test.nms_iou must be in [0, 1], got {m.test.nms_iou}")
        t = pipe.train_for(name)  # validates per-model overrides
        if t.keep_checkpoints < 0:
            raise ConfigError(f"{src}: train.keep_checkpoints for model {name!r} must be >= 0 "
                              f"(0 keeps all), got {t.keep_checkpoints}")
        for key in ("checkpoint_interval", "val_interval"):
            if getattr(t, key) < 0:
                raise ConfigError(f"{src}: train.{key} for model {name!r} must be >= 0 "
                                  f"(0 = off), got {getattr(t, key)}")
    if pipe.train.threads < 0:
        raise ConfigError(f"{src}: train.threads must be >= 0 (0 = torch's default), got {pipe.train.threads}")
    for key, allowed in (("region", REGION_POLICIES), ("codec", CODECS), ("compressor", COMPRESSORS)):
        value = getattr(pipe.cache, key)
        if value not in allowed:
            raise ConfigError(f"{src}: cache.{key} must be {_alternatives(allowed)}, got {value!r}")
    step = pipe.cache.int8_box_step
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0 <= step <= MAX_INT8_BOX_STEP:
        raise ConfigError(f"{src}: cache.int8_box_step must be a number of nats in [0, {MAX_INT8_BOX_STEP:g}] "
                          f"(0 = each row over its own range), got {step!r}")
    check_values(pipe)


# ---------------------------------------------------------------------- the backbone table
_FLAT = {"depth": "depth", "base_channels": "base_width"}  # table key -> the flat shorthand
_DCN_KEYS = ("type", "deform_groups", "fallback_on_stride")
_TYPE_DEFAULTS = {"ResNet": {}, "ResNeXt": {"groups": 1, "base_width": 4},
                  "Res2Net": {"base_width": 26, "scales": 4}}


def resolve_backbone(m: ModelConfig, where: str = "model", source: str = "<config>",
                     given: set[str] | None = None) -> BackboneConfig:
    """``m.backbone`` with every value filled in and checked (idempotent).

    The flat ``depth`` / ``base_width`` keys are the shorthand of ``backbone.depth`` /
    ``backbone.base_channels``; a flat key given together with a different table value is an
    error naming both.  ``given``: the flat keys the file (with its overrides) wrote; ``None``
    (a config built in code): those whose value differs from the default.
    """
    b = dataclasses.replace(m.backbone)
    bw = f"{where}.backbone"
    if b.type not in BACKBONE_TYPES:
        raise ConfigError(f"{source}: {bw}.type must be {_alternatives(BACKBONE_TYPES)}, got {b.type!r}")
    defaults = ModelConfig()
    for key, flat in _FLAT.items():
        flat_value, table_value = getattr(m, flat), getattr(b, key)
        flat_given = (flat in given) if given is not None else flat_value != getattr(defaults, flat)
        if table_value is None:
            setattr(b, key, flat_value)
        elif flat_given and flat_value != table_value:
            raise ConfigError(f"{source}: {where}.{flat} = {flat_value} conflicts with "
                              f"{bw}.{key} = {table_value} (give one of them)")
    # name the key the value came from: the table's or its flat shorthand
    named = {k: f"{bw}.{k}" if getattr(m.backbone, k) is not None else f"{where}.{f}"
             for k, f in _FLAT.items()}
    if b.depth not in BACKBONE_DEPTHS[b.type]:
        raise ConfigError(f"{source}: {named['depth']} of a {b.type} must be "
                          f"{_alternatives(BACKBONE_DEPTHS[b.type])}, got {b.depth}")
    if b.base_channels < (2 if b.type == "Res2Net" else 1):
        raise ConfigError(f"{source}: {named['base_channels']} must be >= 1 (2 for Res2Net's deep "
                          f"stem), got {b.base_channels}")
    own = _TYPE_DEFAULTS[b.type]
    for key in ("groups", "base_width", "scales"):
        value = getattr(b, key)
        if value is None:
            setattr(b, key, own.get(key))
        elif key not in own:
            hint = " (the stem width is base_channels)" if key == "base_width" else ""
            raise ConfigError(f"{source}: {bw}.{key} is not a {b.type} setting{hint}")
        elif value < (2 if key == "scales" else 1):
            raise ConfigError(f"{source}: {bw}.{key} must be >= {2 if key == 'scales' else 1}, got {value}")
    if len(b.stage_with_dcn) != 4:
        raise ConfigError(f"{source}: {bw}.stage_with_dcn must list 4 stages, got {b.stage_with_dcn}")
    b.dcn = _resolve_dcn(b.dcn, f"{bw}.dcn", source)
    if b.dcn is not None and b.depth in (18, 34):
        raise ConfigError(f"{source}: {bw}.dcn needs a Bottleneck ResNet (depth 50 or 101), "
                          f"got depth {b.depth} (mmdetection's BasicBlock has no DCN either)")
    if b.frozen_stages is None:
        b.frozen_stages = 1 if m.pretrained else -1
    if not -1 <= b.frozen_stages <= 4:
        raise ConfigError(f"{source}: {bw}.frozen_stages must be -1..4, got {b.frozen_stages}")
    if b.norm_eval is None:
        b.norm_eval = bool(m.pretrained)
    return b


def _resolve_dcn(dcn, where: str, source: str) -> dict | None:
    """``"DCN"`` / ``"DCNv2"`` / mmdetection's table -> ``{type, deform_groups, fallback_on_stride}``."""
    if dcn is None:
        return None
    table = {"type": dcn} if isinstance(dcn, str) else dcn
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: {where} must be {_alternatives(DCN_TYPES)} or a table, got {dcn!r}")
    for key in table:
        if key not in _DCN_KEYS:
            raise ConfigError(f"{source}: unknown key '{where}.{key}' (known: {', '.join(_DCN_KEYS)})")
    out = {"type": table.get("type"), "deform_groups": table.get("deform_groups", 1),
           "fallback_on_stride": table.get("fallback_on_stride", False)}
    if out["type"] not in DCN_TYPES:
        raise ConfigError(f"{source}: {where}.type must be {_alternatives(DCN_TYPES)}, got {out['type']!r}")
    groups = out["deform_groups"]
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ConfigError(f"{source}: {where}.deform_groups must be an integer >= 1, got {groups!r}")
    if out["fallback_on_stride"] is not False:  # every mmdetection DCN config has false
        raise ConfigError(f"{source}: {where}.fallback_on_stride = true is not supported "
                          f"(mmdetection 2.x applies it to the first DCN block only), got "
                          f"{out['fallback_on_stride']!r}")
    return out


def _validate_head(src: str, name: str, m) -> None:
    """``[models.NAME.head]``: a known type, and DGQP sizes that fit the distribution."""
    h = m.head
    if h.type not in HEAD_TYPES:
        raise ConfigError(f"{src}: models.{name}.head.type must be {_alternatives(HEAD_TYPES)}, "
                          f"got {h.type!r}")
    if h.type == "GFocalHead":
        if not 1 <= h.reg_topk <= m.reg_max + 1:
            raise ConfigError(f"{src}: models.{name}.head.reg_topk must be in 1..reg_max+1 "
                              f"({m.reg_max + 1}), got {h.reg_topk}")
        if h.reg_channels < 1:
            raise ConfigError(f"{src}: models.{name}.head.reg_channels must be >= 1, "
                              f"got {h.reg_channels}")


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


def override_paths(assignments) -> list[str]:
    """Dotted leaf paths set by ``KEY=VALUE`` overrides (a table value names its leaves)."""
    out: list[str] = []

    def leaves(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                leaves(f"{prefix}.{k}", v)
        else:
            out.append(prefix)

    for assignment in assignments:
        if "=" in assignment:
            key, text = assignment.split("=", 1)
            leaves(key.strip(), parse_value(text.strip()))
    return out
