"""The cache manifest: what made the cache and what it can serve.

Stored as the root group's ``ldpipe_cache`` attribute.  The *identity* fields
decide whether a rerun may resume into an existing store; ``cache_id`` is a
hash of them (the cache fingerprint that chains and students record).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import sys

from .. import __version__
from ..config import ModelConfig, Pipeline
from .store import FORMAT, FORMAT_VERSION

IDENTITY = ("teacher", "geometry", "data", "region", "codec", "compressor", "store_cls",
            "samples_per_shard", "chunk_rows")


def architecture(cfg: ModelConfig) -> dict:
    return {"type": "GFL", "backbone": f"ResNet-{cfg.depth}", "depth": cfg.depth,
            "base_width": cfg.base_width, "channels": cfg.channels,
            "stacked_convs": cfg.stacked_convs, "reg_max": cfg.reg_max}


def geometry(pipe: Pipeline, cfg: ModelConfig, variants, num_classes: int, classes) -> dict:
    return {
        "strides": list(cfg.strides), "anchor_scale": cfg.anchor_scale, "reg_max": cfg.reg_max,
        "num_classes": num_classes, "classes": list(classes),
        "input_scales": [list(s) for s in pipe.data.train_scales],
        "pad_divisor": pipe.data.pad_divisor,
        "variants": [{"key": v.key, "scale_idx": v.scale_idx, "flip": v.flip} for v in variants],
    }


def versions() -> dict:
    import numcodecs
    import torch
    import zarr
    return {"ldpipe": __version__, "torch": torch.__version__, "zarr": zarr.__version__,
            "numcodecs": numcodecs.__version__, "python": sys.version.split()[0]}


def cache_id(manifest: dict) -> str:
    ident = {k: manifest.get(k) for k in IDENTITY}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def build(pipe: Pipeline, model_name: str, checkpoint: str, checkpoint_sha: str, ckpt_meta: dict,
          split, split_name: str, variants, assigners: list[dict], num_units: int) -> dict:
    cfg = pipe.model(model_name)
    cache = pipe.cache
    lineage_src = (ckpt_meta.get("ldpipe") or {}).get("lineage") or {}
    m = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "teacher": {"model": model_name, "architecture": architecture(cfg),
                    "checkpoint_sha256": checkpoint_sha},
        "geometry": geometry(pipe, cfg, variants, len(split.classes), split.classes),
        "data": {"format": pipe.data.format, "split": split_name, "fingerprint": split.fingerprint,
                 "num_images": len(split.records), "image_ids": [int(i) for i in split.image_ids]},
        "region": {"policy": cache.region, "assigners": assigners},
        "codec": cache.codec,
        "compressor": cache.compressor,
        "store_cls": cache.store_cls,
        "samples_per_shard": cache.samples_per_shard,
        "chunk_rows": 1024,
        "variants": [v.key for v in variants],
        "num_samples": len(split.records) * len(variants),
        "num_units": num_units,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "pipeline": {"source": pipe.source, "name": pipe.name},
        "checkpoint_path": checkpoint,
        "versions": versions(),
        # the cache this teacher was itself trained from (and its own lineage), if any
        "lineage": lineage_src,
    }
    m["cache_id"] = cache_id(m)
    return m


def identity_diff(old: dict, new: dict) -> list[str]:
    """Human lines for each identity field that differs."""
    out = []
    for key in IDENTITY:
        a, b = old.get(key), new.get(key)
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict):
                for sub in sorted(set(a) | set(b)):
                    if a.get(sub) != b.get(sub):
                        out.append(f"{key}.{sub}: cache has {_short(a.get(sub))}, "
                                   f"this run has {_short(b.get(sub))}")
            else:
                out.append(f"{key}: cache has {_short(a)}, this run has {_short(b)}")
    return out


def lineage_chain(manifest: dict) -> list[str]:
    """Readable chain from this cache's teacher back to the root teacher."""
    lines = []
    t = manifest.get("teacher", {})
    lines.append(f"{t.get('model')} ({t.get('architecture', {}).get('backbone')}, "
                 f"sha256 {str(t.get('checkpoint_sha256'))[:12]}) -> this cache "
                 f"{manifest.get('cache_id')}")
    lin = manifest.get("lineage") or {}
    depth = 0
    while lin and depth < 32:
        src = lin.get("cache") or {}
        lines.append(f"  trained from cache {src.get('cache_id')} at {src.get('url')} "
                     f"made by {src.get('teacher_model')} (sha256 {str(src.get('teacher_sha256'))[:12]})")
        lin = src.get("lineage") or {}
        depth += 1
    return lines


def _short(v) -> str:
    s = json.dumps(v, sort_keys=True, default=str)
    return s if len(s) <= 120 else s[:117] + "..."


