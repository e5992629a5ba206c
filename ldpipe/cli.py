"""The ``ldpipe`` command line (click)."""
from __future__ import annotations

import errno
import json
import logging
import os
import sys

import click

from .config import ConfigError, load_pipeline
from .errors import LdpipeError, original_message


def _setup_logging(verbose: bool) -> None:
    rank = os.environ.get("RANK", "0")
    level = logging.DEBUG if verbose else (logging.INFO if rank == "0" else logging.WARNING)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


override_option = click.option(
    "-o", "--override", "overrides", multiple=True, metavar="KEY=VALUE",
    help="Override a pipeline value by dotted path (repeatable), e.g. -o train.epochs=1.")
pipeline_arg = click.argument("pipeline", type=click.Path())  # checked by the loader (files.read_bounded)
def _check_device(ctx, param, value: str | None) -> str | None:
    """``--device`` is checked where it is given, for every command, by the one device rule
    (``ldpipe.engine.runtime.resolve_device``): 'tpu', or 'cuda' without CUDA, is one error."""
    if value is not None:
        from .engine.runtime import resolve_device
        try:
            resolve_device(value)
        except ConfigError as exc:
            raise click.BadParameter(str(exc).removeprefix(f"--device {value!r}: ")) from None
    return value


device_option = click.option("--device", default=None, callback=_check_device,
                             help="cpu, cuda or cuda:N (default: cuda when available).")
overwrite_run_option = click.option(
    "--overwrite", is_flag=True,
    help="WORK_DIR holds an earlier run: delete its outputs and start over (default: refuse).")


def _command() -> list[str]:
    """The command line of this invocation (as typed, also when the chain runs it)."""
    ctx = click.get_current_context()
    return list(ctx.meta.get("ldpipe.command", sys.argv))


def _pipe(pipeline: str, overrides: tuple[str, ...]):
    try:
        pipe = load_pipeline(pipeline, overrides)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if pipe.train.threads:
        import torch
        torch.set_num_threads(pipe.train.threads)
    return pipe


class _Group(click.Group):
    """Turns expected errors (bad input: any :class:`~ldpipe.errors.LdpipeError`, a missing
    file, a path below a file or onto a folder, a full or read-only disk) into
    ``Error: <message>`` and exit code 1."""

    def make_context(self, info_name, args, parent=None, **extra):
        argv = ["ldpipe" if info_name in (None, "main", "__main__.py") else info_name, *args]
        ctx = super().make_context(info_name, args, parent=parent, **extra)
        ctx.meta["ldpipe.command"] = argv  # the provenance of a training run records it
        return ctx

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (LdpipeError, FileNotFoundError) as exc:  # also one raised in a loader worker
            raise click.ClickException(original_message(exc)) from None
        except OSError as exc:  # a full disk, a read-only or lost mount: say which path
            if exc.errno in _PATH_ERRNOS:  # a path that cannot be (below a file, a folder, ...)
                where = ": ".join(str(f) for f in (exc.filename, exc.filename2) if f)
                raise click.ClickException(f"{where or 'a path'}: {exc.strerror or exc}") from None
            if exc.errno not in _WRITE_ERRNOS:
                raise
            where = f"{exc.filename}: " if exc.filename else ""
            raise click.ClickException(f"{where}{exc.strerror or exc} (what was written before "
                                       "is kept; free space and rerun to resume)") from None


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG}
_PATH_ERRNOS = {errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ELOOP, errno.ENAMETOOLONG}


@click.group(cls=_Group)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.version_option(package_name="ldpipe")
def main(verbose: bool) -> None:
    """Offline teacher cache and localization distillation for dense detectors."""
    _setup_logging(verbose)


# ---------------------------------------------------------------- data
@main.group()
def data() -> None:
    """Data-set utilities."""


# = ldpipe.data.synth.DEMO_ARGS, written out so the CLI imports nothing heavy
# (tests/test_synth.py checks that they agree)
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
    from .data.synth import synthesize
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
    from .engine.train import train
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
    from .engine.infer import evaluate_checkpoint
    from .metrics import format_table
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
    from .engine.student import train_student
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
    from .chain import Chain
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
    from .engine.dump import dump_teacher
    pipe = _pipe(pipeline, overrides)
    summary = dump_teacher(pipe, model_name, checkpoint, out, split_name, device=device,
                           batch_size=batch_size, workers=workers, amp=amp, overwrite=overwrite)
    if os.environ.get("RANK", "0") == "0":
        click.echo(json.dumps(summary))


# ---------------------------------------------------------------- cache inspection
@main.group("cache")
def cache_group() -> None:
    """Inspect teacher caches (CACHE is a path or an fsspec URL such as memory://c)."""


json_option = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")


@cache_group.command("info")
@click.argument("cache")
@json_option
def cache_info_cmd(cache, as_json):
    """Counts, sizes and compression, regions, teacher entropy and lineage of CACHE."""
    from .cache.info import format_info, info
    result = info(cache)
    click.echo(json.dumps(result, indent=2, default=str) if as_json else format_info(result))


@cache_group.command("verify")
@click.argument("cache")
@json_option
@click.pass_context
def cache_verify_cmd(ctx, cache, as_json):
    """Decode every array, check checksums, commits and the index; exit 1 on any problem."""
    from .cache.verify import format_verify, verify
    result = verify(cache)
    click.echo(json.dumps(result, indent=2, default=str) if as_json else format_verify(result))
    if not result["ok"]:
        ctx.exit(1)


@cache_group.command("diff")
@click.argument("a")
@click.argument("b")
@click.option("--T", "-T", "--temperature", "temperature", default=10.0, show_default=True,
              type=float, help="Temperature of the edge-distribution KL.")
@json_option
def cache_diff_cmd(a, b, temperature, as_json):
    """Compare two caches over the samples they share (a report; exit 0)."""
    from .cache.diff import diff, format_diff
    result = diff(a, b, temperature)
    click.echo(json.dumps(result, indent=2, default=str) if as_json else format_diff(result))


# ---------------------------------------------------------------- pipeline files
@main.group("config")
def config_group() -> None:
    """Pipeline files."""


@config_group.command("show")
@pipeline_arg
@override_option
def config_show_cmd(pipeline, overrides):
    """Print the resolved pipeline (after extends and -o overrides) as TOML."""
    from .config.resolve import show
    click.echo(show(_pipe(pipeline, overrides)), nl=False)
# ---------------------------------------------------------------- predict / export / cache show
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
    from .engine.predict import JSON_NAME, predict_images
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
    from .engine.export import export_checkpoint
    pipe = _pipe(pipeline, overrides)
    click.echo(json.dumps(export_checkpoint(pipe, model_name, checkpoint, out, fmt=fmt, fp16=fp16,
                                                 dynamo=dynamo)))


@cache_group.command("show")
@pipeline_arg
@click.argument("cache")
@click.option("--image", "image_id", required=True, type=int,
              help="Image id (COCO id; VOC: position in the split), as data.image_ids of the manifest.")
@click.option("--variant", default=None, help="Variant key (s0n, s0f, ...) or index; default: the first.")
@click.option("--anchors", default=None,
              help="Comma-separated own-grid anchor indices; default: positives of the largest GT box.")
@click.option("--num-anchors", default=3, show_default=True, help="How many default anchors.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG to write.")
@override_option
def cache_show_cmd(pipeline, cache, image_id, variant, anchors, num_anchors, out, overrides):
    """Picture one cached sample: the image, its GT boxes and the teacher's four edge
    distributions at chosen anchors (what LD transfers).  PIPELINE supplies the images."""
    from .engine.show import parse_anchors, show_sample
    pipe = _pipe(pipeline, overrides)
    result = show_sample(pipe, cache, image_id, out, variant=variant, anchors=parse_anchors(anchors),
                         num_anchors=num_anchors)
    click.echo(f"{out}: image {image_id} variant {result['variant']}, anchors {result['anchors']}")
@cache_group.command("merge")
@click.argument("caches", nargs=-1, required=True)
@click.option("--out", required=True, help="Path or fsspec URL of the merged cache.")
@click.option("--overwrite", is_flag=True, help="Replace an existing cache made differently.")
def cache_merge_cmd(caches, out, overwrite):
    """Average the teachers of CACHES (same data, geometry, region, codec) into one cache."""
    from .cache.merge import merge
    click.echo(json.dumps(merge(list(caches), out, overwrite=overwrite)))


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
    from .engine.bench import benchmark
    pipe = _pipe(pipeline, overrides)
    click.echo(json.dumps(benchmark(pipe, model_name, checkpoint, images=images, warmup=warmup,
                                    fp16=fp16, device=device, split_name=split_name)))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
