"""dump_bench's set-up and its two timed runs: the pipeline, a truncated split, a random teacher,
pure inference over the dump's own batches, and a dump into a fresh store."""
from __future__ import annotations

import dataclasses
import hashlib

from ..common import now, sync


# ------------------------------------------------------------------ set-up helpers
def load_pipe(args, *extra: str):
    from ldpipe.config import load_pipeline
    return load_pipeline(args.pipeline, list(args.override) + list(extra))


def truncated_split(pipe, split_name: str, n: int):
    from ldpipe.data import load_split
    split = load_split(pipe.data, split_name)
    if n <= 0 or n >= len(split.records):
        return split
    fp = hashlib.sha256(f"{split.fingerprint}:first{n}".encode()).hexdigest()
    return dataclasses.replace(split, records=split.records[:n], image_ids=split.image_ids[:n],
                               fingerprint=fp)


def random_checkpoint(pipe, model_name: str, num_classes: int, path: str, spread: float, seed: int):
    import torch
    from ldpipe.models import build_model
    from ldpipe.models.checkpoint import save_checkpoint
    torch.manual_seed(seed)
    model = build_model(pipe.model(model_name), num_classes)
    if spread > 0:
        with torch.no_grad():
            for conv in (model.bbox_head.gfl_reg, model.bbox_head.gfl_cls):
                fan_in = conv.weight[0].numel()
                conv.weight.normal_(0.0, spread / fan_in ** 0.5)
    save_checkpoint(path, model, {"ldpipe": {"model": model_name, "random": True}})


def amp_arg(args):
    return {"auto": None, "on": True, "off": False}[args.amp]


# ------------------------------------------------------------------ the two timed runs
def run_inference(pipe, model_name: str, ckpt: str, split, device, batches: list, workers: int,
                  amp) -> dict:
    """Forward passes only, over ``batches`` (the (image, variant) batches the dump made)."""
    import torch
    from ldpipe.data import DetectionDataset, collate, train_variants
    from ldpipe.engine.runtime import amp_context, worker_init
    from ldpipe.models import build_model
    from ldpipe.models.checkpoint import load_weights

    t0 = now()
    cfg = pipe.model(model_name)
    variants = train_variants(pipe.data)
    model = build_model(cfg, len(split.classes))
    load_weights(model, ckpt)
    model.to(device).eval()
    loader = torch.utils.data.DataLoader(
        DetectionDataset(split, pipe.data, variants), batch_sampler=batches, num_workers=workers,
        collate_fn=collate, pin_memory=device.type == "cuda", worker_init_fn=worker_init)
    use_amp = (device.type == "cuda") if amp is None else (amp and device.type == "cuda")
    n = 0
    t_loop = now()
    with torch.no_grad():
        for batch in loader:
            img = batch["img"].to(device, non_blocking=True)
            with amp_context(device, use_amp):
                model(img)
            n += img.shape[0]
    sync(device)
    t1 = now()
    return {"total_s": t1 - t0, "loop_s": t1 - t_loop, "samples": n}


def run_dump(pipe, model_name: str, ckpt: str, split, out: str, device, batch_size: int,
             workers: int, amp, split_name: str = "train") -> dict:
    """A dump of ``split`` into a fresh store; also returns its (image, variant) batches."""
    import math
    from ldpipe.data import train_variants
    from ldpipe.engine.dump import dump_teacher, unit_batches
    per_unit = pipe.cache.samples_per_shard
    variants = train_variants(pipe.data)
    units = list(range(math.ceil(len(split.records) * len(variants) / per_unit)))
    batches = unit_batches(pipe.data, split, variants, units, per_unit, batch_size or pipe.cache.batch_size)
    t0 = now()
    summary = dump_teacher(pipe, model_name, ckpt, out, split_name, device=device.type,
                           batch_size=batch_size, workers=workers, amp=amp, progress=False,
                           split=split)
    t1 = now()
    return {"total_s": t1 - t0, "loop_s": float(summary["seconds"]), "samples": summary["samples"],
            "batches": batches}
