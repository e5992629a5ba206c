"""Range checks on pipeline values and run arguments, each a one-line :class:`ConfigError`.

Types are checked while building the dataclasses (``coerce._build``); these are the values
that type-check but would fail deep inside a run (a zero batch size, a negative scale).
"""
from __future__ import annotations

from .schema import ConfigError, Pipeline


def check_values(pipe: Pipeline) -> None:
    """Refuse sizes, counts and fractions no run can use, naming file and key."""
    src, d = pipe.source, pipe.data
    for i, scale in enumerate(d.train_scales):
        if any(v <= 0 for v in scale):
            raise ConfigError(f"{src}: data.train_scales[{i}] = {scale} must be positive")
    if any(v <= 0 for v in d.test_scale):
        raise ConfigError(f"{src}: data.test_scale = {d.test_scale} must be positive")
    if d.pad_divisor < 1:
        raise ConfigError(f"{src}: data.pad_divisor must be >= 1, got {d.pad_divisor}")
    if len(d.std) != 3 or any(v <= 0 for v in d.std) or len(d.mean) != 3:
        raise ConfigError(f"{src}: data.mean / data.std must be 3 values, std positive; "
                          f"got {d.mean} / {d.std}")
    if not 0.0 <= d.max_dropped_boxes <= 1.0:
        raise ConfigError(f"{src}: data.max_dropped_boxes is a fraction in [0, 1], "
                          f"got {d.max_dropped_boxes}")
    for name in pipe.models:
        t, own = pipe.schedules[name], pipe.models[name].train

        def where(key: str) -> str:
            return f"models.{name}.train.{key}" if key in own else f"train.{key} (model {name!r})"

        for key, low in (("batch_size", 1), ("workers", 0), ("epochs", 1), ("log_interval", 1),
                         ("max_iters_per_epoch", 0), ("warmup_iters", 0)):
            if getattr(t, key) < low:
                raise ConfigError(f"{src}: {where(key)} must be >= {low}, got {getattr(t, key)}")
        if t.lr < 0:
            raise ConfigError(f"{src}: {where('lr')} must be >= 0 (0 = the linear scaling rule), "
                              f"got {t.lr}")
        m = pipe.models[name]
        if not m.strides or any(s <= 0 for s in m.strides):
            raise ConfigError(f"{src}: models.{name}.strides must be positive, got {m.strides}")
        for key in ("base_channels", "channels"):
            if getattr(m, key) < 1:
                raise ConfigError(f"{src}: models.{name}.{key} must be >= 1, got {getattr(m, key)}")
        if m.anchor_scale <= 0:
            raise ConfigError(f"{src}: models.{name}.anchor_scale must be > 0, got {m.anchor_scale}")
    c = pipe.cache
    for key in ("samples_per_shard", "chunk_rows", "batch_size"):
        if getattr(c, key) < 1:
            raise ConfigError(f"{src}: cache.{key} must be >= 1, got {getattr(c, key)}")


def check_run_args(batch_size: int | None = None, workers: int | None = None) -> None:
    """Command-line ``--batch-size`` (>= 1) and ``--workers`` (>= 0; 0 loads in-process)."""
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    if workers is not None and workers < 0:
        raise ConfigError(f"--workers must be >= 0 (0 loads in the main process), got {workers}")


__all__ = ["check_run_args", "check_values"]
