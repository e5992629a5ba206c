"""``ldpipe benchmark``: images per second of inference, measured as mmdetection's
``tools/analysis_tools/benchmark.py`` measures it.

As there: batch 1, the model in eval mode, the first ``warmup`` images untimed, then each
image timed from handing it to the model (host-to-device copy included) to its detections
(network, decoding, NMS and rescaling to the original image), with ``torch.cuda.synchronize``
before and after on CUDA; the rate is timed images / summed time.  Reading and preprocessing
an image (the data loader's work) is timed apart and reported as ``load_ms_per_image``, not
in the rate.  ``fp16``: fp16 autocast (CUDA only; mmdetection wraps the model in fp16).
With fewer images in the split than ``warmup + images`` the split is cycled.
"""
from __future__ import annotations

import platform
import time

import torch

from ..cache.manifest import architecture
from ..config import ConfigError, DataConfig, ModelConfig
from ..data import TEST_VARIANT, DetectionDataset, boxes_to_original, collate, load_split
from ..models import load_detector
from .runtime import amp_context, resolve_device


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark(cfg: ModelConfig, data: DataConfig, model_name: str, checkpoint: str | None,
              images: int = 200, warmup: int = 5, fp16: bool = False, device: str | None = None,
              split_name: str = "val") -> dict:
    """Inference rate of model ``model_name`` (config ``cfg``; weights from ``checkpoint``,
    None: random init) on split ``split_name`` of the ``data`` section."""
    if images < 1 or warmup < 0:
        raise ConfigError(f"benchmark: --images must be >= 1 and --warmup >= 0, got {images}, {warmup}")
    dev = resolve_device(device)
    if fp16 and dev.type != "cuda":
        raise ConfigError(f"benchmark: --fp16 needs a CUDA device (got {dev.type})")
    split = load_split(data, split_name)
    model, _ = load_detector(cfg, len(split.classes), checkpoint, dev)
    dataset = DetectionDataset(split, data, [TEST_VARIANT])
    infer_s = load_s = 0.0
    with torch.no_grad():
        for i in range(warmup + images):
            t0 = time.perf_counter()
            batch = collate([dataset[i % len(dataset)]])
            _sync(dev)
            t1 = time.perf_counter()
            with amp_context(dev, fp16):
                det = model.predict(batch["img"].to(dev), [m.img_shape for m in batch["metas"]])[0]
            boxes_to_original(det["boxes"].float().cpu(), batch["metas"][0])
            _sync(dev)
            t2 = time.perf_counter()
            if i >= warmup:
                infer_s += t2 - t1
                load_s += t1 - t0
    return {"model": model_name, "architecture": architecture(cfg), "checkpoint": checkpoint or "",
            "device": str(dev), "device_name": (torch.cuda.get_device_name(dev) if dev.type == "cuda"
                                                else cpu_name()),
            "torch_threads": torch.get_num_threads(), "fp16": fp16, "batch_size": 1,
            "test_scale": list(data.test_scale), "nms": cfg.test.nms,
            "warmup": warmup, "images": images, "split_images": len(dataset),
            "images_per_s": images / infer_s, "ms_per_image": 1000 * infer_s / images,
            "load_ms_per_image": 1000 * load_s / images}
