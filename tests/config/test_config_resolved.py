"""The loaded pipeline: resolved once and frozen, vocabularies tied to their implementations,
and the renamed keys (``base_width`` -> ``base_channels``, ``giou_weight`` -> ``box_weight``)."""
from __future__ import annotations

import dataclasses
import os
import typing

import numpy as np
import pytest
import torch

from helpers import TINY_TEACHER as TINY
from helpers import tiny_model_config
from ldpipe import config
from ldpipe.config import ConfigError, legacy_dict, load_pipeline, resolve_model, to_dict

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(ROOT, "pipelines", "demo.toml")


# ---------------------------------------------------------------------- vocabularies
def test_each_vocabulary_is_what_its_dispatch_table_implements():
    """A word without an implementation (or an implementation without its word) fails here."""
    from ldpipe.cache import compat
    from ldpipe.cache.codec import CODEC_TABLE
    from ldpipe.distill.criterion import LD_NORM
    from ldpipe.data.records import LOADERS
    from ldpipe.models.assigner import VLR_D
    from ldpipe.models.detector import BACKBONES, HEADS
    from ldpipe.models.losses import BOX_LOSS
    from ldpipe.models.nms import SUPPRESS
    pairs = {
        "BOX_LOSSES": (config.BOX_LOSSES, BOX_LOSS),
        "HEAD_TYPES": (config.HEAD_TYPES, HEADS),
        "BACKBONE_TYPES": (config.BACKBONE_TYPES, BACKBONES),
        "BACKBONE_DEPTHS": (config.BACKBONE_TYPES, config.BACKBONE_DEPTHS),
        "NMS_KINDS": (config.NMS_KINDS, SUPPRESS),
        "VLR_REGIONS": (config.VLR_REGIONS, VLR_D),
        "DATA_FORMATS": (config.DATA_FORMATS, LOADERS),
        "CODECS (one Codec object each)": (config.CODECS, CODEC_TABLE),
        "LD_NORMS": (config.LD_NORMS, LD_NORM),
        "REGION_POLICIES (terms served)": (config.REGION_POLICIES, compat.SERVES),
    }
    for name, (words, table) in pairs.items():
        assert set(words) == set(table), (name, words, sorted(table))


def test_if_chain_vocabularies_accept_every_word_and_refuse_others():
    """Codecs, region policies, compressors and box norms are branches, not tables: each word
    runs, and a word outside the vocabulary is refused."""
    from ldpipe.cache.codec import decode, encode
    from ldpipe.cache.manifest import CacheError
    from ldpipe.cache.region import region_index
    from ldpipe.cache.store import _compressors
    lp = torch.log_softmax(torch.randn(3, 17), -1)
    for codec in config.CODECS:
        enc = encode(lp, codec)
        assert decode(enc.values, enc.scale, codec).shape == lp.shape, codec
    with pytest.raises(ValueError, match="unknown codec"):
        encode(lp, "int4")
    gt = torch.tensor([[8.0, 8.0, 40.0, 40.0]])
    for policy in config.REGION_POLICIES:
        idx = region_index(policy, gt, None, (64, 64), [8, 16, 32, 64, 128], 8.0, [])
        assert idx.dtype == torch.long and idx.numel() > 0, policy
    with pytest.raises(ValueError, match="unknown region policy"):
        region_index("all", gt, None, (64, 64), [8, 16, 32, 64, 128], 8.0, [])
    for name in config.COMPRESSORS:
        assert _compressors(name), name
    with pytest.raises(CacheError, match="unknown compressor"):
        _compressors("lz4")
    src = open(os.path.join(ROOT, "ldpipe", "models", "gfl_head.py")).read()
    for norm in config.BOX_NORMS:  # the box / DFL divisor branches on each word
        assert f'cfg.box_norm == "{norm}"' in src, norm


def test_vocabulary_tuples_are_the_literal_types():
    from ldpipe.config import schema
    for tup, lit in [("REGION_POLICIES", "RegionPolicy"), ("CODECS", "Codec"),
                     ("COMPRESSORS", "Compressor"), ("BOX_LOSSES", "BoxLoss"), ("BOX_NORMS", "BoxNorm"),
                     ("VLR_REGIONS", "VlrRegion"), ("BACKBONE_TYPES", "BackboneType"),
                     ("HEAD_TYPES", "HeadType"), ("NMS_KINDS", "NmsKind"), ("DATA_FORMATS", "DataFormat")]:
        assert getattr(schema, tup) == typing.get_args(getattr(schema, lit)), tup


@pytest.mark.parametrize("override, key, choices", [
    ("models.student.loss.box_loss=diou", "models.student.loss.box_loss", "giou|ciou"),
    ("models.student.loss.box_norm=mean", "models.student.loss.box_norm", "sum|clamp"),
    ("models.teacher.assigner.vlr_region=iou", "models.teacher.assigner.vlr_region", "reference|diou"),
    ("models.teacher.test.nms=soft", "models.teacher.test.nms", "nms|voting_cluster_diounms"),
    ("models.teacher.head.type=1", "models.teacher.head.type", "GFLHead|GFocalHead"),
    ('models.teacher.backbone.type="VGG"', "models.teacher.backbone.type", "ResNet|ResNeXt|Res2Net"),
    ("data.format=yolo", "data.format", "coco|voc"),
    ("cache.region=all", "cache.region", "main|ld|overlap|dense"),
    ("cache.codec=int4", "cache.codec", "fp32|fp16|int8"),
    ("cache.compressor=lz4", "cache.compressor", "zstd|blosc"),
])
def test_a_word_outside_a_vocabulary_names_file_key_value_and_choices(override, key, choices):
    with pytest.raises(ConfigError) as err:
        load_pipeline(DEMO, [override])
    msg = str(err.value)
    value = override.split("=", 1)[1].strip('"')
    assert msg.startswith(DEMO) and f"{key} must be {choices}, got " in msg and value in msg, msg


# ---------------------------------------------------------------------- resolved once, frozen
def test_schedules_and_backbones_are_resolved_by_the_loader(monkeypatch):
    pipe = load_pipeline(DEMO, TINY)
    assert set(pipe.schedules) == set(pipe.models)
    for name in pipe.models:
        assert pipe.train_for(name) is pipe.schedules[name]  # a stored value, not rebuilt
        assert config.is_resolved(pipe.model(name).backbone)
        assert resolve_model(pipe.model(name)) == pipe.model(name)  # nothing left to resolve
    # nothing downstream resolves again: building the model and its manifest entry read the
    # stored backbone
    from ldpipe.cache.manifest import architecture
    from ldpipe.models.detector import build_model

    def refuse(*a, **k):
        raise AssertionError("resolved again")

    monkeypatch.setattr("ldpipe.config.load.resolve_backbone", refuse)
    monkeypatch.setattr("ldpipe.config.resolve_backbone", refuse)
    cfg = pipe.model("teacher")
    assert build_model(cfg, 3).backbone.base_channels == 8
    assert architecture(cfg)["backbone"] == "ResNet-18"


def test_a_model_config_built_in_code_must_be_resolved_first():
    from ldpipe.models.detector import build_model
    with pytest.raises(ValueError, match="resolve_model"):
        build_model(tiny_model_config(), 3)
    cfg = resolve_model(tiny_model_config())
    assert (cfg.backbone.depth, cfg.backbone.base_channels) == (18, 8)
    assert build_model(cfg, 3) is not None


def test_the_loaded_pipeline_is_frozen():
    pipe = load_pipeline(DEMO)
    for obj, attr in [(pipe, "name"), (pipe.train, "epochs"), (pipe.data, "root"),
                      (pipe.model("student"), "depth"), (pipe.model("student").loss, "box_weight"),
                      (pipe.model("student").backbone, "depth"), (pipe.cache, "codec")]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, attr, getattr(obj, attr))
    other = dataclasses.replace(pipe, train=dataclasses.replace(pipe.train, epochs=1))
    assert other.train.epochs == 1 and pipe.train.epochs != 1


# ---------------------------------------------------------------------- renamed keys
@pytest.mark.parametrize("override, old, new", [
    ("models.student.base_width=8", "models.student.base_width", "models.student.base_channels"),
    ("models.teacher.loss.giou_weight=1.0", "models.teacher.loss.giou_weight",
     "models.teacher.loss.box_weight"),
])
def test_renamed_keys_name_the_new_key(override, old, new):
    with pytest.raises(ConfigError) as err:
        load_pipeline(DEMO, [override])
    assert str(err.value) == f"{DEMO}: {old} was renamed: use {new}"


def test_renamed_keys_in_a_file_name_the_new_key(tmp_path):
    path = tmp_path / "old.toml"
    path.write_text('extends = "%s"\n[models.teacher]\nbase_width = 32\n' % DEMO.replace("\\", "/"))
    with pytest.raises(ConfigError, match=r"old\.toml: models\.teacher\.base_width was renamed: "
                                          r"use models\.teacher\.base_channels"):
        load_pipeline(str(path))
    # the backbone table keeps mmdetection's base_width (ResNeXt's width per group)
    pipe = load_pipeline(DEMO, ["models.teacher.depth=50",
                                'models.teacher.backbone={type="ResNeXt", groups=2, base_width=4}'])
    assert pipe.model("teacher").backbone.base_width == 4


def test_box_weight_weights_the_box_loss():
    pipe = load_pipeline(DEMO, ["models.student.loss.box_weight=0.5"])
    assert pipe.model("student").loss.box_weight == 0.5


def test_stored_dicts_keep_the_names_from_before_the_rename():
    """The chain's stage stamps hash the model section under the old key names (a chain run
    before the rename skips its finished stages), and a cache manifest's architecture keeps
    ``base_width`` for the stem width (its identity and cache id are unchanged)."""
    from ldpipe.cache.manifest import architecture
    cfg = load_pipeline(DEMO).model("student")
    old = legacy_dict(cfg)
    assert list(old) == ["depth", "base_width", "channels", "stacked_convs", "norm_groups", "reg_max",
                         "strides", "anchor_scale", "pretrained", "checkpoint", "backbone", "assigner",
                         "head", "loss", "test", "train"]
    assert list(old["loss"]) == ["qfl_beta", "qfl_weight", "dfl_weight", "giou_weight", "box_loss",
                                 "box_norm"]
    assert old["base_width"] == cfg.base_channels and old["loss"]["giou_weight"] == cfg.loss.box_weight
    assert old["backbone"] == to_dict(cfg.backbone)  # the table's own names never changed
    assert architecture(cfg)["base_width"] == cfg.base_channels


def test_a_checkpoint_written_before_the_rename_still_loads(tmp_path):
    """Its meta holds the model config under the old names; loading reads only the weights
    and the classes from it."""
    from ldpipe.engine.predict import open_detector
    from ldpipe.models.checkpoint import save_checkpoint
    from ldpipe.models.detector import build_model
    pipe = load_pipeline(DEMO, TINY)
    cfg = pipe.model("teacher")
    torch.manual_seed(0)
    model = build_model(cfg, 3)
    meta = {"ldpipe": {"model": "teacher", "config": legacy_dict(cfg), "classes": ["a", "b", "c"]}}
    path = str(tmp_path / "old.pth")
    save_checkpoint(path, model, meta)
    loaded, classes, got = open_detector(pipe, "teacher", path, torch.device("cpu"))
    assert classes == ["a", "b", "c"] and got["ldpipe"]["config"]["base_width"] == 8
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with torch.no_grad():
        assert np.isfinite(loaded(torch.zeros(1, 3, 64, 64)).cls.numpy()).all()
