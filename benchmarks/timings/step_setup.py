"""step_bench's set-up (the parent process): a synthetic data set, the pipeline, a random teacher
saved as a checkpoint and a cache dumped from it; the children read it all from the returned dict."""
from __future__ import annotations

import os

from ..common import now


PIPELINE = """\
name = "step-bench"

[data]
format = "coco"
root = "{root}"
train = "annotations/train.json"
val = "annotations/val.json"
train_images = "images/train"
val_images = "images/val"
train_scales = [[{size}, {size}]]
test_scale = [{size}, {size}]
flip = true

[train]
batch_size = {batch}
workers = 0
amp = {amp}

[models.teacher]
depth = {teacher_depth}
base_width = {base_width}
channels = {channels}
stacked_convs = {stacked_convs}

[models.student]
depth = {student_depth}
base_width = {base_width}
channels = {channels}
stacked_convs = {stacked_convs}

[cache]
region = "{region}"
codec = "{codec}"
samples_per_shard = 64
batch_size = {batch}
"""


# ------------------------------------------------------------------ set-up (parent)
def make_setup(args, work: str, device) -> dict:
    import torch
    from ldpipe.engine.dump import dump_teacher
    from ldpipe.config import load_pipeline
    from ldpipe.data import load_split, synthesize
    from ldpipe.models import build_model
    from ldpipe.models.checkpoint import save_checkpoint

    root = os.path.join(work, "synth")
    n_train = args.batch * args.distinct_batches
    synthesize(root, n_train=n_train, n_val=1, seed=args.seed, size=args.size)
    toml = os.path.join(work, "step_bench.toml")
    with open(toml, "w") as fh:
        fh.write(PIPELINE.format(root=root, size=args.size, batch=args.batch,
                                 amp="true" if args.amp == "auto" else "false",
                                 teacher_depth=args.teacher_depth, student_depth=args.student_depth,
                                 base_width=args.base_width, channels=args.channels,
                                 stacked_convs=args.stacked_convs, region=args.region, codec=args.codec))
    pipe = load_pipeline(toml)
    split = load_split(pipe, "train")
    torch.manual_seed(args.seed + 1)
    teacher = build_model(pipe.model("teacher"), len(split.classes))
    with torch.no_grad():  # non-flat teacher distributions (GFL's init gives near-uniform ones)
        for conv in (teacher.bbox_head.gfl_reg, teacher.bbox_head.gfl_cls):
            conv.weight.normal_(0.0, 3.0 / conv.weight[0].numel() ** 0.5)
    ckpt = os.path.join(work, "teacher.pth")
    save_checkpoint(ckpt, teacher, {"ldpipe": {"model": "teacher", "random": True}})
    del teacher
    cache = os.path.join(work, "cache.zarr")
    t0 = now()
    summary = dump_teacher(pipe, "teacher", ckpt, cache, device=device.type, workers=0, progress=False)
    dump_s = now() - t0
    return {"pipeline": toml, "teacher_ckpt": ckpt, "cache": cache, "device": device.type,
            "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
            "distinct_batches": args.distinct_batches, "seed": args.seed, "threads": args.threads,
            "dump_s": dump_s, "dump_samples": summary["samples"]}
