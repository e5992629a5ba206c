"""The ``ldpipe`` command line (click): the commands that train, evaluate, dump, predict and
export; ``cache_commands`` adds ``ldpipe cache ...`` and ``ldpipe config ...``; ``common`` holds
the group, its error handling and the shared options."""
from __future__ import annotations

import json
import os
import sys

import click

from .common import (_command, _pipe, device_option, main, overwrite_run_option,  # noqa: F401
                     override_option, pipeline_arg)


# ---------------------------------------------------------------- data
@main.group()
def data() -> None:
    """Data-set utilities."""


# = ldpipe.data.synth.DEMO_ARGS, written out so the CLI imports nothing heavy
# (tests/data/test_synth.py checks that they agree)
_SYNTH = dict(n_train=400, n_val=200, seed=0, size=192, min_size=12.0, max_size=96.0,
              max_objects=8)


@data.command("synth")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--train", "n_train", default=_SYNTH["n_train"], show_default=True, help="Training images.")
@click.option("--val", "n_val", default=_SYNTH["n_val"], show_default=True, help="Validation images.")
@click.option("--seed", default=_SYNTH["seed"], show_default=True)
@click.option("--size", default=_SYNTH["size"], show_default=True, help="Nominal image side, px.")
@click.option("--min-size", default=_SYNTH["min_size"], show_default=True,
              help="Smallest object long side, px.")
@click.option("--max-size", default=_SYNTH["max_size"], show_default=True,
              help="Largest object long side, px.")
@click.option("--max-objects", default=_SYNTH["max_objects"], show_default=True,
              help="Most objects per image.")
def data_synth(out: str, n_train: int, n_val: int, seed: int, size: int, min_size: float,
               max_size: float, max_objects: int) -> None:
    """Write the embedded synthetic COCO-format data set to OUT (defaults: the demo's set)."""
    from ..data.synth import synthesize
    summary = synthesize(out, n_train=n_train, n_val=n_val, seed=seed, size=size,
                         min_size=min_size, max_size=max_size, max_objects=max_objects)
    click.echo(json.dumps(summary, indent=2, default=str))


# ---------------------------------------------------------------- train / eval
@main.command("train")
@pipeline_arg
@click.option("--model", "model_name", required=True, help="Model name in the pipeline file.")
@click.option("--work-dir", required=True, type=click.Path(file_okay=False))
@click.option("--resume", is_flag=True, help="Continue from WORK_DIR/latest.pth.")
@click.option("--resume-anyway", is_flag=True,
              help="With --resume: continue even if the recorded run differs in kind, model, "
                   "pipeline file or teacher (refused otherwise, naming both).")
@overwrite_run_option
@click.option("--init", "init_from", default=None, help="Initialise weights from a checkpoint.")
@device_option
@override_option
def train_cmd(pipeline, model_name, work_dir, resume, resume_anyway, overwrite, init_from, device,
              overrides):
    """Train a detector without distillation (teachers, baselines)."""
    from ..engine.train import train
    pipe = _pipe(pipeline, overrides)
    path = train(pipe, model_name, work_dir, resume=resume, device=device, init_from=init_from,
                 overwrite=overwrite, command=_command(), resume_anyway=resume_anyway)
    if os.environ.get("RANK", "0") == "0":
        click.echo(f"checkpoint: {path}")


@main.command("eval")
@pipeline_arg
@click.option("--model", "model_name", required=True)
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False))
@click.option("--split", "split_name", default="val", show_default=True)
@click.option("--out", default=None, help="Write metrics JSON here.")
@click.option("--results", default=None, help="Write detections in COCO results format here.")
@click.option("--batch-size", default=4, show_default=True)
@device_option
@override_option
def eval_cmd(pipeline, model_name, checkpoint, split_name, out, results, batch_size, device, overrides):
    """Evaluate a checkpoint (COCO AP via pycocotools; VOC mAP@0.5 for VOC data).

    Under torchrun the ranks share the images and rank 0 prints and writes the metrics."""
    from ..engine.infer import evaluate_checkpoint
    from ..metrics import format_table
    pipe = _pipe(pipeline, overrides)
    metrics = evaluate_checkpoint(pipe, model_name, checkpoint, split_name, out=out,
                                  results=results, device=device, batch_size=batch_size)
    if metrics is None:  # a torchrun rank other than 0: rank 0 reports
        return
    click.echo(format_table(metrics))
    click.echo(f"bbox_mAP: {metrics['bbox_mAP']:.4f}")


@main.command("train-student")
@pipeline_arg
@click.option("--model", "model_name", default="student", show_default=True)
@click.option("--cache", default=None, help="Teacher cache made by dump-teacher (path or URL).")
@click.option("--work-dir", required=True, type=click.Path(file_okay=False))
@click.option("--online-teacher", default=None, type=click.Path(dir_okay=False),
              help="Instead of a cache: run this teacher checkpoint every step (for comparison).")
@click.option("--teacher-model", default="teacher", show_default=True,
              help="Pipeline model of the online teacher.")
@click.option("--resume", is_flag=True, help="Continue from WORK_DIR/latest.pth.")
@click.option("--resume-anyway", is_flag=True,
              help="With --resume: continue even if the recorded run differs in kind, model, "
                   "pipeline file or teacher (refused otherwise, naming both).")
@overwrite_run_option
@device_option
@override_option
def train_student_cmd(pipeline, model_name, cache, work_dir, online_teacher, teacher_model, resume,
                      resume_anyway, overwrite, device, overrides):
    """Train a student with localization distillation from a teacher cache."""
    from ..engine.student import train_student
    if (cache is None) == (online_teacher is None):
        raise click.UsageError("give --cache CACHE, or --online-teacher CKPT for the online mode")
    pipe = _pipe(pipeline, overrides)
    path = train_student(pipe, model_name, work_dir, cache=cache, online_teacher=online_teacher,
                         teacher_model=teacher_model, resume=resume, device=device,
                         overwrite=overwrite, command=_command(), resume_anyway=resume_anyway)
    if os.environ.get("RANK", "0") == "0":
        click.echo(f"checkpoint: {path}")


@main.command("chain")
@pipeline_arg
@click.option("--work-dir", required=True, type=click.Path(file_okay=False))
@device_option
@override_option
def chain_cmd(pipeline, work_dir, device, overrides):
    """Run teacher -> (TA) -> student (+ baseline) and summarise, skipping unchanged stages."""
    from ..chain import Chain
    pipe = _pipe(pipeline, overrides)
    chain = Chain(pipeline, overrides, pipe, work_dir, device=device, echo=click.echo,
                  run_argv=lambda argv: main.main(args=argv, prog_name="ldpipe", standalone_mode=False))
    summary = chain.run()
    click.echo(f"[chain] ran {len(chain.ran)} stage(s), skipped {len(chain.skipped)}")
    click.echo(summary["table"])
    click.echo(f"[chain] summary: {os.path.join(work_dir, 'summary.md')} (.json, .png)")


# ---------------------------------------------------------------- teacher cache
@main.command("dump-teacher")
@pipeline_arg
@click.option("--model", "model_name", default="teacher", show_default=True,
              help="Model to dump (a teacher or a TA).")
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False),
              help="ldpipe or mmdetection checkpoint of that model.")
@click.option("--out", required=True, help="Cache path or fsspec URL (e.g. memory://c, s3://b/c).")
@click.option("--split", "split_name", default="train", show_default=True)
@click.option("--batch-size", type=int, default=None, help="Default: cache.batch_size.")
@click.option("--workers", type=int, default=None, help="Loader workers (default: train.workers).")
@click.option("--amp/--no-amp", default=None, help="fp16 autocast on CUDA (default on).")
@click.option("--overwrite", is_flag=True, help="Replace an existing cache made differently.")
@device_option
@override_option
def dump_teacher_cmd(pipeline, model_name, checkpoint, out, split_name, batch_size, workers, amp,
                     overwrite, device, overrides):
    """Run the teacher once over the data and cache its bbox-edge distributions."""
    from ..engine.dump import dump_teacher
    pipe = _pipe(pipeline, overrides)
    summary = dump_teacher(pipe, model_name, checkpoint, out, split_name, device=device,
                           batch_size=batch_size, workers=workers, amp=amp, overwrite=overwrite)
    if os.environ.get("RANK", "0") == "0":
        click.echo(json.dumps(summary))


# ---------------------------------------------------------------- predict / export
def _unit_interval(ctx, param, value: float) -> float:
    """A score threshold: a number in [0, 1] (NaN and infinities are refused by name)."""
    if not 0.0 <= value <= 1.0:  # also false for NaN
        raise click.BadParameter(f"{value!r} is not a score in [0, 1]")
    return value


@main.command("predict")
@pipeline_arg
@click.option("--model", "model_name", required=True, help="Model name in the pipeline file.")
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for one PNG per image and detections.json.")
@click.option("--score-thr", default=0.3, show_default=True, type=float, callback=_unit_interval,
              help="Draw and list detections scoring at least this (0 to 1).")
@click.argument("images", nargs=-1, required=True)
@device_option
@override_option
def predict_cmd(pipeline, model_name, checkpoint, out_dir, score_thr, images, device, overrides):
    """Detect objects in IMAGES (files or folders); draw them into OUT."""
    from ..engine.predict import JSON_NAME, predict_images
    pipe = _pipe(pipeline, overrides)
    result = predict_images(pipe, model_name, checkpoint, list(images), out_dir,
                            score_thr=score_thr, device=device)
    n = sum(len(e["detections"]) for e in result["images"])
    click.echo(f"{len(result['images'])} image(s), {n} detection(s) >= {score_thr}: "
               f"{os.path.join(out_dir, JSON_NAME)}")


@main.command("export")
@pipeline_arg
@click.option("--model", "model_name", required=True, help="Model name in the pipeline file.")
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["pth", "safetensors", "onnx"]), default=None,
              help="Default: from the suffix of OUT (.pth, .safetensors, .onnx).")
@click.option("--fp16", is_flag=True, help="Store floating-point weights in half precision (pth, safetensors).")
@click.option("--dynamo", is_flag=True,
              help="ONNX through torch.export (needs onnxscript) instead of the TorchScript exporter.")
@override_option
def export_cmd(pipeline, model_name, checkpoint, out, fmt, fp16, dynamo, overrides):
    """A weights-only checkpoint (pth / safetensors) or an ONNX graph of the raw outputs,
    checked against torch with onnxruntime."""
    from ..engine.export import export_checkpoint
    pipe = _pipe(pipeline, overrides)
    click.echo(json.dumps(export_checkpoint(pipe, model_name, checkpoint, out, fmt=fmt, fp16=fp16,
                                                 dynamo=dynamo)))


# ---------------------------------------------------------------- benchmark
@main.command("benchmark")
@pipeline_arg
@click.option("--model", "model_name", required=True, help="Model name in the pipeline file.")
@click.option("--checkpoint", default=None, type=click.Path(dir_okay=False),
              help="Weights (default: random initialisation; the rate does not depend on them).")
@click.option("--images", default=200, show_default=True, help="Timed images (batch 1).")
@click.option("--warmup", default=5, show_default=True, help="Untimed images first.")
@click.option("--fp16", is_flag=True, help="fp16 autocast (CUDA only).")
@click.option("--split", "split_name", default="val", show_default=True)
@device_option
@override_option
def benchmark_cmd(pipeline, model_name, checkpoint, images, warmup, fp16, split_name, device, overrides):
    """Images/s of inference as mmdetection's tools/benchmark.py (data loading apart); JSON."""
    from ..engine.bench import benchmark
    pipe = _pipe(pipeline, overrides)
    click.echo(json.dumps(benchmark(pipe.model(model_name), pipe.data, model_name, checkpoint,
                                    images=images, warmup=warmup, fp16=fp16, device=device,
                                    split_name=split_name)))


from . import cache_commands  # noqa: E402,F401  (registers ``ldpipe cache ...`` and ``ldpipe config ...``)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
