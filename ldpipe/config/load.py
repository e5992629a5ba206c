"""Reading pipeline files: TOML -> overrides -> typed :class:`Pipeline` -> validation.

A pipeline file is parsed with :mod:`tomllib` and never executed.  Overrides use dotted
paths, ``-o train.epochs=1 -o data.root=/x``; the value is read as a TOML literal when it
parses as one (``1``, ``0.5``, ``true``, ``[640, 480]``) and as a plain string otherwise.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
import tomllib
from pathlib import Path
from typing import Any

from .. import files
from .augment import augment_problems
from .checks import check_values
from .extends import resolve_extends
from .schema import (BACKBONE_DEPTHS, BACKBONE_TYPES, DCN_TYPES, DISTILL_TERMS, MAX_INT8_BOX_STEP,
                     RENAMED, RESNET_DEPTHS, BackboneConfig, ConfigError, ModelConfig, Pipeline,
                     TrainConfig)
from .coerce import _build

log = logging.getLogger("ldpipe.config")


# ---------------------------------------------------------------------- parsing
def parse_value(text: str) -> Any:
    """Read an override value as a TOML literal, else as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _clearable(parts: list[str]) -> bool:
    """Whether ``-o KEY={}`` may clear the table at ``KEY`` (``parts``): a model's own
    schedule table ``models.NAME.train`` (the model then runs ``[train]``), only."""
    return len(parts) == 3 and parts[0] == "models" and parts[2] == "train"


def apply_override(raw: dict, assignment: str, source: str = "<override>") -> None:
    """Set one dotted ``KEY=VALUE`` in ``raw``.  A table value (``{...}``) replaces the table
    at ``KEY`` as a whole, never silently: the keys it drops are logged; an empty table over
    one with values is refused (it would reset the section to its defaults) except for a
    model's own ``models.NAME.train`` table, which it clears (logged)."""
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
    value = parse_value(text.strip())
    old = cur.get(parts[-1])
    if isinstance(value, dict) and isinstance(old, dict) and old:
        dropped = sorted(set(old) - set(value))
        if not value and not _clearable(parts):
            raise ConfigError(f"override {assignment!r} would replace the table {key} of {source} "
                              f"({', '.join(sorted(old))}) with an empty one, resetting it to its "
                              f"defaults; set its keys one by one (-o {key}.KEY=VALUE)")
        if not value:
            log.warning("override %s clears %s (drops %s): model %r runs the [train] schedule",
                        assignment, key, ", ".join(dropped), parts[1])
        elif dropped:
            log.warning("override %s replaces the table %s of %s as a whole: drops %s", assignment,
                        key, source, ", ".join(f"{key}.{k}" for k in dropped))
    cur[parts[-1]] = value


def load_pipeline(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Pipeline:
    """Read a pipeline file, apply dotted overrides, resolve and validate it.

    Resolved here, once: each model's backbone table (:func:`resolve_backbone`, with the flat
    ``depth`` / ``base_channels`` set to its values) and each model's schedule
    (:func:`schedule_of`, stored in ``Pipeline.schedules``); the result is frozen."""
    path = str(path)
    try:
        raw = tomllib.loads(files.read_bounded(path, files.PIPELINE_FILE_BOUND, "pipeline file",
                                               ConfigError).decode())
    except FileNotFoundError:
        raise ConfigError(f"pipeline file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a pipeline file (binary, not UTF-8 TOML text)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the pipeline file ({exc.strerror})") from None
    raw = copy.deepcopy(raw)
    raw = resolve_extends(raw, path, bases := [])
    for assignment in overrides:
        apply_override(raw, assignment, path)
    pipe = _build(Pipeline, raw, "", path)
    pipe = dataclasses.replace(pipe, source=path, raw=raw, bases=bases,
                               overridden=override_paths(overrides), name=pipe.name or Path(path).stem)
    models = {}
    for name, m in pipe.models.items():
        section = raw.get("models", {}).get(name)
        models[name] = resolve_model(m, f"models.{name}", path,
                                     set(section) if isinstance(section, dict) else None)
    pipe = dataclasses.replace(pipe, models=models)
    pipe = dataclasses.replace(pipe, schedules={name: schedule_of(pipe, name) for name in models})
    validate(pipe)
    return pipe


def schedule_of(pipe: Pipeline, name: str) -> TrainConfig:
    """The schedule of one model: the ``train`` section with its overrides, by precedence
    ``[train] < models.NAME.train < -o train.KEY < -o models.NAME.train.KEY``."""
    model = pipe.model(name)
    merged = dataclasses.asdict(pipe.train)
    cli = {p.split(".")[1] for p in pipe.overridden if p.startswith("train.")}
    own = {p.split(".")[3] for p in pipe.overridden
           if p.startswith(f"models.{name}.train.") and len(p.split(".")) > 3}
    for key, value in model.train.items():
        if key not in merged:
            raise ConfigError(f"{pipe.source}: unknown key models.{name}.train.{key}")
        if key in cli and key not in own:
            continue
        merged[key] = value
    return _build(TrainConfig, merged, f"models.{name}.train", pipe.source)


def validate(pipe: Pipeline) -> None:
    """Checks across keys of a resolved pipeline (the vocabularies and types were checked
    while building it: ``coerce._coerce``)."""
    src = pipe.source
    d = pipe.data
    if d.format == "voc" and not d.classes:
        raise ConfigError(f"{src}: data.classes is required for VOC data")
    if not d.train_scales or any(len(s) != 2 for s in d.train_scales):
        raise ConfigError(f"{src}: data.train_scales must be a list of [long, short] pairs")
    if len(d.test_scale) != 2:
        raise ConfigError(f"{src}: data.test_scale must be [long, short]")
    for problem in augment_problems(d.augment)[:1]:  # the first bad step, named
        raise ConfigError(f"{src}: {problem}")
    if pipe.cache.views.count < 1:
        raise ConfigError(f"{src}: cache.views.count must be >= 1 (views per image, or epochs), "
                          f"got {pipe.cache.views.count}")
    for name, m in pipe.models.items():
        if m.depth not in RESNET_DEPTHS:
            raise ConfigError(f"{src}: models.{name}.depth must be {_alternatives(RESNET_DEPTHS)}, "
                              f"got {m.depth}")
        if m.reg_max < 1:
            raise ConfigError(f"{src}: models.{name}.reg_max must be >= 1, got {m.reg_max}")
        if "threads" in m.train:
            raise ConfigError(f"{src}: models.{name}.train.threads: the thread count is process-wide; "
                              f"set train.threads in [train]")
        _validate_head(src, name, m)
        if not 0.0 <= m.test.nms_iou <= 1.0:
            raise ConfigError(f"{src}: models.{name}.test.nms_iou must be in [0, 1], got {m.test.nms_iou}")
        t = pipe.schedules[name]
        if t.keep_checkpoints < 0:
            raise ConfigError(f"{src}: train.keep_checkpoints for model {name!r} must be >= 0 "
                              f"(0 keeps all), got {t.keep_checkpoints}")
        for key in ("checkpoint_interval", "val_interval"):
            if getattr(t, key) < 0:
                raise ConfigError(f"{src}: train.{key} for model {name!r} must be >= 0 "
                                  f"(0 = off), got {getattr(t, key)}")
    if pipe.train.threads < 0:
        raise ConfigError(f"{src}: train.threads must be >= 0 (0 = torch's default), got {pipe.train.threads}")
    step = pipe.cache.int8_box_step
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0 <= step <= MAX_INT8_BOX_STEP:
        raise ConfigError(f"{src}: cache.int8_box_step must be a number of nats in [0, {MAX_INT8_BOX_STEP:g}] "
                          f"(0 = each row over its own range), got {step!r}")
    if pipe.cache.reused_head_idx < -1:
        raise ConfigError(f"{src}: cache.reused_head_idx must be -1 (off) or a head conv index "
                          f">= 0, got {pipe.cache.reused_head_idx}")
    up = pipe.cache.teacher_upscale
    if isinstance(up, bool) or not isinstance(up, int) or not 1 <= up <= 64 or up & (up - 1):
        raise ConfigError(f"{src}: cache.teacher_upscale must be a power of two (1 = off, 2, 4, "
                          f"..., 64), got {up!r}")
    for name, m in pipe.models.items():
        if m.head.align_channels < 0:
            raise ConfigError(f"{src}: models.{name}.head.align_channels must be >= 0 (0 = off), "
                              f"got {m.head.align_channels}")
    if pipe.cache.cls_values == "logits" and pipe.cache.codec == "int8":
        raise ConfigError(f"{src}: cache.cls_values='logits' needs cache.codec 'fp32' or 'fp16' "
                          "(int8 stores values <= 0: log-probabilities)")
    check_values(pipe)


# ---------------------------------------------------------------------- the backbone table
_FLAT = ("depth", "base_channels")  # table keys that have a flat shorthand of the same name
_DCN_KEYS = ("type", "deform_groups", "fallback_on_stride")
_TYPE_DEFAULTS = {"ResNet": {}, "ResNeXt": {"groups": 1, "base_width": 4},
                  "Res2Net": {"base_width": 26, "scales": 4}}


def resolve_model(m: ModelConfig, where: str = "model", source: str = "<config>",
                  given: set[str] | None = None) -> ModelConfig:
    """``m`` with its backbone resolved (:func:`resolve_backbone`) and the flat ``depth`` /
    ``base_channels`` set to the backbone's values: what the loader stores for each model.
    A :class:`ModelConfig` built in code goes through this before :func:`build_model`."""
    b = resolve_backbone(m, where, source, given)
    return dataclasses.replace(m, backbone=b, depth=b.depth, base_channels=b.base_channels)


def resolve_backbone(m: ModelConfig, where: str = "model", source: str = "<config>",
                     given: set[str] | None = None) -> BackboneConfig:
    """``m.backbone`` with every value filled in and checked (idempotent).

    The flat ``depth`` / ``base_channels`` keys are the shorthand of ``backbone.depth`` /
    ``backbone.base_channels``; a flat key given together with a different table value is an
    error naming both.  ``given``: the flat keys the file (with its overrides) wrote; ``None``
    (a config built in code): those whose value differs from the default.
    """
    vals = {f.name: getattr(m.backbone, f.name) for f in dataclasses.fields(BackboneConfig)}
    bw = f"{where}.backbone"
    if vals["type"] not in BACKBONE_TYPES:
        raise ConfigError(f"{source}: {bw}.type must be {_alternatives(BACKBONE_TYPES)}, "
                          f"got {vals['type']!r}")
    kind = vals["type"]
    defaults = ModelConfig()
    for key in _FLAT:
        flat_value, table_value = getattr(m, key), vals[key]
        flat_given = (key in given) if given is not None else flat_value != getattr(defaults, key)
        if table_value is None:
            vals[key] = flat_value
        elif flat_given and flat_value != table_value:
            raise ConfigError(f"{source}: {where}.{key} = {flat_value} conflicts with "
                              f"{bw}.{key} = {table_value} (give one of them)")
    # name the key the value came from: the table's or its flat shorthand
    named = {k: f"{bw}.{k}" if getattr(m.backbone, k) is not None else f"{where}.{k}" for k in _FLAT}
    if vals["depth"] not in BACKBONE_DEPTHS[kind]:
        raise ConfigError(f"{source}: {named['depth']} of a {kind} must be "
                          f"{_alternatives(BACKBONE_DEPTHS[kind])}, got {vals['depth']}")
    if vals["base_channels"] < (2 if kind == "Res2Net" else 1):
        raise ConfigError(f"{source}: {named['base_channels']} must be >= 1 (2 for Res2Net's deep "
                          f"stem), got {vals['base_channels']}")
    own = _TYPE_DEFAULTS[kind]
    for key in ("groups", "base_width", "scales"):
        value = vals[key]
        if value is None:
            vals[key] = own.get(key)
        elif key not in own:
            hint = " (the stem width is base_channels)" if key == "base_width" else ""
            raise ConfigError(f"{source}: {bw}.{key} is not a {kind} setting{hint}")
        elif value < (2 if key == "scales" else 1):
            raise ConfigError(f"{source}: {bw}.{key} must be >= {2 if key == 'scales' else 1}, got {value}")
    if len(vals["stage_with_dcn"]) != 4:
        raise ConfigError(f"{source}: {bw}.stage_with_dcn must list 4 stages, got {vals['stage_with_dcn']}")
    vals["stage_with_dcn"] = list(vals["stage_with_dcn"])
    vals["dcn"] = _resolve_dcn(vals["dcn"], f"{bw}.dcn", source)
    if vals["dcn"] is not None and vals["depth"] in (18, 34):
        raise ConfigError(f"{source}: {bw}.dcn needs a Bottleneck ResNet (depth 50 or 101), "
                          f"got depth {vals['depth']} (mmdetection's BasicBlock has no DCN either)")
    if vals["frozen_stages"] is None:
        vals["frozen_stages"] = 1 if m.pretrained else -1
    if not -1 <= vals["frozen_stages"] <= 4:
        raise ConfigError(f"{source}: {bw}.frozen_stages must be -1..4, got {vals['frozen_stages']}")
    if vals["norm_eval"] is None:
        vals["norm_eval"] = bool(m.pretrained)
    return BackboneConfig(**vals)


def is_resolved(b: BackboneConfig) -> bool:
    """Whether ``b`` went through :func:`resolve_backbone` (every value it fills is set)."""
    return None not in (b.depth, b.base_channels, b.frozen_stages, b.norm_eval)


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
    """``[models.NAME.head]``: DGQP sizes that fit the distribution."""
    h = m.head
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


def data_entry(d) -> dict:
    """``to_dict`` of a :class:`DataConfig` without an empty ``augment`` list: what the chain's
    stage stamps hash, so a stamp written before ``data.augment`` existed still matches."""
    out = to_dict(d)
    if not out.get("augment"):
        out.pop("augment", None)
    return out


def legacy_dict(obj: Any) -> Any:
    """:func:`to_dict` with the keys renamed in issue 21 (``schema.RENAMED``) under their old
    names: for hashes of stored dicts that must not change with the rename (the chain's stage
    stamps, so a chain run before it skips its finished stages as before)."""
    if dataclasses.is_dataclass(obj):
        old = {new: o for (cls, o), new in RENAMED.items() if cls == type(obj).__name__}
        return {old.get(f.name, f.name): legacy_dict(getattr(obj, f.name))
                for f in dataclasses.fields(obj) if f.name != "raw"}
    if isinstance(obj, dict):
        return {k: legacy_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [legacy_dict(v) for v in obj]
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
