"""``ldpipe cache ...`` (info, verify, diff, show, merge, plan) and ``ldpipe config show``: the
commands that inspect caches and pipeline files, registered on :data:`ldpipe.cli.main`."""
from __future__ import annotations

import json

import click

from .common import _pipe, device_option, main, override_option, pipeline_arg


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
    from ..cache.info import format_info, info
    result = info(cache)
    click.echo(json.dumps(result, indent=2, default=str) if as_json else format_info(result))


@cache_group.command("verify")
@click.argument("cache")
@json_option
@click.pass_context
def cache_verify_cmd(ctx, cache, as_json):
    """Decode every array, check checksums, commits and the index; exit 1 on any problem."""
    from ..cache.verify import format_verify, verify
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
    from ..cache.diff import diff, format_diff
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
    from ..config.resolve import show
    click.echo(show(_pipe(pipeline, overrides)), nl=False)


@cache_group.command("show")
@pipeline_arg
@click.argument("cache")
@click.option("--image", "image_id", required=True, type=int,
              help="Image id (COCO id; VOC: position in the split), as data.image_ids of the manifest.")
@click.option("--variant", default=None, help="Variant key (s0n, s0f, ...; a view cache: v0, v1, ...) or index; default: the first.")
@click.option("--anchors", default=None,
              help="Comma-separated own-grid anchor indices; default: positives of the largest GT box.")
@click.option("--num-anchors", default=3, show_default=True, help="How many default anchors.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG to write.")
@override_option
def cache_show_cmd(pipeline, cache, image_id, variant, anchors, num_anchors, out, overrides):
    """Picture one cached sample: the image, its GT boxes and the teacher's four edge
    distributions at chosen anchors (what LD transfers).  PIPELINE supplies the images."""
    from ..engine.show import parse_anchors, show_sample
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
    from ..cache.merge import merge
    click.echo(json.dumps(merge(list(caches), out, overwrite=overwrite)))


@cache_group.command("plan")
@pipeline_arg
@click.option("--model", "model_name", default="teacher", show_default=True,
              help="Model to dump (a teacher or a TA).")
@click.option("--checkpoint", default=None, type=click.Path(dir_okay=False),
              help="Its checkpoint (default: a random-init teacher; the bytes estimate is rougher).")
@click.option("--split", "split_name", default="train", show_default=True)
@click.option("--out", default=None, help="Where the cache will go: looked at (free space, a cache "
              "there already), nothing written.")
@click.option("--pilot-images", default=16, show_default=True,
              help="At least this many images (those of whole, seeded batches of the dump, at "
                   "least 8 batches) are dumped for real, every sample of each, to measure bytes "
                   "and time.")
@click.option("--count-samples", default=2000, show_default=True,
              help="Samples whose stored rows are counted (all when there are no more).")
@click.option("--seed", default=0, show_default=True, help="Picks the pilot images (and a random teacher).")
@click.option("--batch-size", type=int, default=None, help="Default: cache.batch_size.")
@click.option("--workers", type=int, default=None, help="Loader workers (default: train.workers).")
@click.option("--amp/--no-amp", default=None, help="fp16 autocast on CUDA (default on).")
@device_option
@json_option
@override_option
def cache_plan_cmd(pipeline, model_name, checkpoint, split_name, out, pilot_images, count_samples,
                   seed, batch_size, workers, amp, device, as_json, overrides):
    """Before a dump: its samples, the bytes the cache will take and the dump time, from a
    short real dump of a few images (into a temporary folder, removed)."""
    from ..engine.plan import format_plan, plan_cache
    pipe = _pipe(pipeline, overrides)
    plan = plan_cache(pipe, model_name, checkpoint, split_name, pilot_images=pilot_images,
                      count_samples=count_samples, seed=seed, device=device,
                      batch_size=batch_size, workers=workers, amp=amp, out=out)
    click.echo(json.dumps(plan.to_json(), indent=2) if as_json else format_plan(plan))
