"""Where the dump's extra CPU time per sample goes (beyond the teacher's forward).

    python -m benchmarks.studies.dump_parts PIPELINE [CACHE] [-o key=value ...] [--images 16] [--codec int8]

One torch thread, as in the loader workers.  Per sample, in milliseconds:

* ``load``: decode + resize + pad one training image (the loader's own work, same for inference);
* ``region main`` / ``region ld``: ``ldpipe.cache.region.region_index`` (ATSS, + VLR for ``ld``),
  done in the loader workers;
* ``encode``: ``ldpipe.cache.store.assemble_unit`` (log-probability rows -> packed codec rows), and
  ``write``: ``ldpipe.cache.store.write_unit`` into ``memory://`` (filters, compression,
  checksums, sha256) - both in the dump's writer thread.

The rows to encode are read from CACHE (any codec; decoded to float32 first), so the
encode/write costs are those of that cache's region on that teacher; without CACHE only
``load`` and the regions are timed.
"""
from __future__ import annotations

import argparse
import time

import torch

from ldpipe.cache import CacheError, CacheReader
from ldpipe.cache.manifest import F
from ldpipe.cache.region import reader_settings, region_index
from ldpipe.cache.store import SampleRows, assemble_unit, open_root, write_unit
from ldpipe.config import CODECS, AssignerConfig, load_pipeline
from ldpipe.data import DetectionDataset, load_split, train_variants


def per_sample_ms(fn, n: int) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) / max(n, 1) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pipeline")
    ap.add_argument("cache", nargs="?", help="a cache of this pipeline's data (its rows are re-encoded)")
    ap.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--codec", default="int8", choices=CODECS)
    ap.add_argument("--model", default="teacher")
    args = ap.parse_args()
    torch.set_num_threads(1)
    pipe = load_pipeline(args.pipeline, args.override)
    cfg = pipe.model(args.model)
    split = load_split(pipe.data, "train")
    ds = DetectionDataset(split, pipe.data, train_variants(pipe.data))
    n = min(args.images, len(ds))
    samples = []
    out = {"load": per_sample_ms(lambda: samples.extend(ds[(i, 0)] for i in range(n)), n)}
    specs = [AssignerConfig(a.topk, a.ignore_iof_thr) for a in reader_settings(pipe, args.model)]
    for policy in ("main", "ld"):
        out[f"region {policy}"] = per_sample_ms(lambda: [
            region_index(policy, s["gt_boxes"], s["ignore_boxes"], s["meta"].pad_shape,
                         cfg.strides, cfg.anchor_scale, specs) for s in samples], n)

    if args.cache:
        reader = CacheReader(args.cache)
        table = reader.table[:pipe.cache.samples_per_shard]
        items = []
        for rec in table:
            d = reader.read(int(rec[F["image_index"]]), int(rec[F["variant"]]))
            g = d["geometry"]
            meta = {"img_shape": g.img_shape, "pad_shape": g.pad_shape, "ori_shape": g.ori_shape,
                    "index": int(rec[F["image_index"]]), "image_id": int(rec[F["image_id"]]),
                    "flip": g.flip, "scale_factor": g.scale_factor}
            items.append(SampleRows(int(rec[F["sample"]]), meta, d["anchor"].to(torch.int32), d["box"],
                                    d["cls"]))
        unit = {}
        out["encode"] = per_sample_ms(lambda: unit.setdefault("u", assemble_unit(items, args.codec, reader.num_variants)),
                                      len(items))
        root = open_root("memory://dump_parts", "w")
        out["write"] = per_sample_ms(lambda: write_unit(root, 0, unit["u"], pipe.cache.compressor, 1024),
                                     len(items))
        rows = sum(int(r[F["row_count"]]) for r in table)
        print(f"{args.pipeline}: {n} images for load/regions; {len(items)} samples "
              f"({rows / max(len(items), 1):.0f} rows each) of {args.cache} for encode/write ({args.codec})")
    else:
        print(f"{args.pipeline}: {n} images for load/regions")
    print("| part | ms per sample |\n|---|---:|")
    for k, v in out.items():
        print(f"| {k} | {v:.1f} |")


if __name__ == "__main__":
    try:
        main()
    except CacheError as exc:
        raise SystemExit(f"error: {exc}") from None
