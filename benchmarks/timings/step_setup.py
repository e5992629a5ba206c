"""step_bench's set-up (the parent process): a synthetic data set, the pipeline, a random teacher
saved as a checkpoint and a cache dumped from it; the children read it all from the returned dict."""
from __future__ import annotations

import os

from ..common import PIPELINES, now, override


PIPELINE = str(PIPELINES / "step_bench.toml")  # extends synth_data.toml; values: the defaults


def pipeline_overrides(args, root: str) -> list[str]:
    """The ``-o`` overrides that make ``PIPELINE`` this run's: data root and input size, batch,
    AMP, both models' depths and widths, the cache's region and codec."""
    size, batch = args.size, args.batch
    out = [override("data.root", root), override("data.train_scales", [[size, size]]),
           override("data.test_scale", [size, size]), override("train.batch_size", batch),
           override("train.amp", args.amp == "auto")]
    for name, depth in (("teacher", args.teacher_depth), ("student", args.student_depth)):
        out += [override(f"models.{name}.depth", depth), override(f"models.{name}.base_channels", args.base_width),
                override(f"models.{name}.channels", args.channels),
                override(f"models.{name}.stacked_convs", args.stacked_convs)]
    return out + [override("cache.region", args.region), override("cache.codec", args.codec),
                  override("cache.batch_size", batch)]


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
    overrides = pipeline_overrides(args, root)
    pipe = load_pipeline(PIPELINE, overrides)
    split = load_split(pipe.data, "train")
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
    return {"pipeline": PIPELINE, "overrides": overrides, "teacher_ckpt": ckpt, "cache": cache, "device": device.type,
            "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
            "distinct_batches": args.distinct_batches, "seed": args.seed, "threads": args.threads,
            "dump_s": dump_s, "dump_samples": summary["samples"]}
