"""The benchmark scripts run end to end on tiny settings and report what docs/benchmarks.md reads.

Numbers here are not checked against goals (timings on a shared CPU are noise at this size);
what is checked is that every script runs on the current cache format and models and that
its outputs are consistent with each other.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ("-o", "models.teacher.base_channels=8", "-o", "models.teacher.channels=16",
        "-o", "models.teacher.stacked_convs=1", "-o", "data.train_scales=[[128,128]]",
        "-o", "data.test_scale=[128,128]")


def bench(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.slow
def test_dump_bench_then_ld_error_and_int8_layouts(tmp_path):
    work, out = tmp_path / "db", tmp_path / "db.json"
    bench("benchmarks.timings.dump_bench", "pipelines/demo.toml", "--random", "--synth", "8", "--reps", "1",
          "--policies", "ld", "--codecs", "fp32,int8", "--threads", "1", "--keep",
          "--workdir", str(work), "--json", str(out), *TINY)
    d = json.loads(out.read_text())
    assert d["timing"]["samples"] == 16 and d["timing"]["loop_s"]["ratio"] > 0
    sizes = {(s["policy"], s["codec"]): s for s in d["sizes"]}
    assert sizes["ld", "fp32"]["rows_per_sample"] == sizes["ld", "int8"]["rows_per_sample"] > 0
    assert sizes["ld", "int8"]["vs_dense_fp16"] < 0.5 * sizes["ld", "fp32"]["vs_dense_fp16"]

    fp32 = sizes["ld", "fp32"]["store"]  # the configured ld/int8 one is a timed run's store
    err = json.loads(bench("benchmarks.studies.ld_error", fp32, sizes["ld", "int8"]["store"]))
    assert err["samples"] == 16 and err["edges"] > 0
    for student in ("random", "near"):
        assert 0 <= err[student]["relative_error"] < 0.01
        assert err[student]["ld_reference"] > 0

    parts = bench("benchmarks.studies.dump_parts", "pipelines/demo.toml", fp32, "--images", "4",
                  "-o", f"data.root={work / 'synth'}", *TINY)
    ms = dict(line.strip("|").split("|") for line in parts.splitlines()
              if line.startswith("| ") and not line.startswith("| part"))
    assert set(k.strip() for k in ms) == {"load", "region main", "region ld", "encode", "write"}
    assert all(float(v) > 0 for v in ms.values())

    table = bench("benchmarks.studies.int8_layouts", fp32)
    row = next(line for line in table.splitlines() if line.startswith("| per-edge scale (format)"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "76"  # 4 x 17 codes + 4 x 2 scale bytes per anchor
    assert all(0 < float(c) <= 80 for c in cells[2:6])


@pytest.mark.slow
def test_step_bench_reports_three_modes(tmp_path):
    out = tmp_path / "sb.json"
    bench("benchmarks.timings.step_bench", "--teacher-depth", "18", "--student-depth", "18", "--channels", "16",
          "--stacked-convs", "1", "--base-width", "8", "--size", "128", "--batch", "2", "--steps", "2",
          "--warmup", "1", "--reps", "1", "--threads", "1", "--workdir", str(tmp_path / "w"),
          "--json", str(out))
    d = json.loads(out.read_text())
    assert set(d["summary"]) == {"plain", "cached", "online"}
    for mode in d["summary"].values():
        assert mode["step_ms"] > 0 and mode["peak_rss_mb"] > 0
    assert d["ratios"]["cached/plain"]["time"] > 0 and d["ratios"]["online/plain"]["time"] > 0
    # the same student and batch: cached (int8) and online LD losses agree closely
    cached, online = d["summary"]["cached"]["first_losses"], d["summary"]["online"]["first_losses"]
    assert cached["loss_ld"] == pytest.approx(online["loss_ld"], rel=0.02)


def test_coco_scale_writer_rate_and_loader_rate_run_tiny(tmp_path):
    """The scale benchmarks on tiny settings: their JSON has what docs/benchmarks.md reads."""
    d = json.loads(bench("benchmarks.timings.coco_scale", "--images", "24", "--per-unit", "8", "--full-units", "1",
                         "--reads", "5").strip().splitlines()[-1])
    assert d["samples"] == 48 and d["units"] == 6 and d["verify_ok"] and d["info_samples"] == 48
    assert d["open_s"] > 0 and d["rss_mb"] is not None and d["reads"] == 5
    assert 2500 <= d["read_rows_per_sample"] <= 4200  # the reads come from the full-size unit
    assert 0 < d["read_p50_ms"] <= d["read_p99_ms"]
    idx = json.loads(bench("benchmarks.timings.coco_scale", "--images", "500", "--index-only").strip().splitlines()[-1])
    assert idx["samples"] == 1000 and idx["open_s"] > 0
    w = json.loads(bench("benchmarks.timings.writer_rate", "--units", "2", "--per-unit", "2", "--threads", "1,2",
                         "--classes", "3").strip().splitlines()[-1])
    assert w["samples"] == 4 and set(w["by_threads"]) == {"1", "2"}
    assert all(r["rows_per_s"] > 0 for r in w["by_threads"].values()) and w["needed_rows_per_s"] > 0
    r = json.loads(bench("benchmarks.timings.loader_rate", "--images", "4", "--classes", "3", "--workers", "0,2",
                         "--batch", "2", "--reads", "8").strip().splitlines()[-1])
    assert [x["workers"] for x in r["by_workers"]] == [0, 2]
    assert all(x["samples"] == 6 and x["samples_per_s"] > 0 for x in r["by_workers"])  # 8 - first batch


def test_programme_schedule_and_stage_split(tmp_path):
    """benchmarks.timings.programme: a training epoch is one batch pass over the *images* (one variant
    drawn per image), so 60 iterations of 2 over 10 images are 12 epochs and every student
    reads 6x the 20 dumped samples; each stage's loop time comes from the dump's summary line
    or the run's epoch records."""
    from benchmarks.timings.programme import PIPELINE, loop_seconds, pipeline_overrides, schedule

    from ldpipe.config import load_pipeline
    assert schedule(60, 2, 10) == (12, 5) and schedule(300, 2, 100) == (6, 50)
    assert schedule(61, 2, 10) == (13, 5) and schedule(4, 3, 10) == (1, 4)
    pipe = load_pipeline(PIPELINE, pipeline_overrides(str(tmp_path), 64, 8, 16, 60, 2, 10))
    assert pipe.train.epochs == 12 and pipe.train.max_iters_per_epoch == 5
    assert pipe.data.root == str(tmp_path) and pipe.data.train_scales == [[64, 64]]
    assert {n: (m.depth, m.base_channels, m.channels) for n, m in pipe.models.items()} == {
        "teacher": (101, 8, 16), "s18": (18, 8, 16), "s34": (34, 8, 16), "s50": (50, 8, 16)}
    defaults = load_pipeline(PIPELINE).raw  # the file's values are the options' defaults
    assert load_pipeline(PIPELINE, pipeline_overrides("data/synth", 128, 8, 32, 300, 2, 100)).raw == defaults
    assert pipe.train.epochs * pipe.train.max_iters_per_epoch * pipe.train.batch_size == 6 * (2 * 10)
    dump_out = 'progress\n{"cache": "c", "samples": 20, "rank_images": 20, "seconds": 8.25, "cache_id": "x"}\n'
    assert loop_seconds(["dump-teacher", "p"], dump_out) == (8.25, 20)
    with pytest.raises(ValueError):
        loop_seconds(["dump-teacher", "p"], "no summary")
    work = tmp_path / "s"
    work.mkdir()
    (work / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {"type": "epoch", "iter": 5, "time_s": 6.5}, {"type": "train", "iter": 5, "time_s": 99},
        {"type": "epoch", "iter": 10, "time_s": 7.0})))
    assert loop_seconds(["train-student", "p", "--work-dir", str(work)], "") == (13.5, 10)


def test_step_divergence_refuses_a_used_workdir(tmp_path, capsys):
    from benchmarks.studies import step_divergence
    (tmp_path / "online").mkdir()
    with pytest.raises(SystemExit) as e:
        step_divergence.main(["p.toml", "--teacher", "t.pth", "--cache", "a=c.zarr", "--workdir", str(tmp_path)])
    assert e.value.code == 2 and "is not empty" in capsys.readouterr().err


def test_step_bench_pipeline_follows_its_options(tmp_path):
    """benchmarks/pipelines/step_bench.toml holds the defaults; the options reach the pipeline
    as -o overrides (a data root with quotes and spaces stays one string)."""
    from benchmarks.timings.step_bench import parse_args
    from benchmarks.timings.step_setup import PIPELINE, pipeline_overrides

    from ldpipe.config import load_pipeline
    root = str(tmp_path / "a \"quoted\" dir")
    args = parse_args(["--size", "128", "--batch", "3", "--amp", "off", "--teacher-depth", "34",
                       "--base-width", "8", "--channels", "16", "--stacked-convs", "1", "--codec", "fp16"])
    pipe = load_pipeline(PIPELINE, pipeline_overrides(args, root))
    assert pipe.name == "step-bench" and pipe.data.root == root and pipe.data.test_scale == [128, 128]
    assert (pipe.train.batch_size, pipe.train.amp, pipe.cache.batch_size) == (3, False, 3)
    assert (pipe.cache.region, pipe.cache.codec) == ("ld", "fp16")
    t, s = pipe.model("teacher"), pipe.model("student")
    assert (t.depth, s.depth) == (34, 18)
    assert all((m.base_channels, m.channels, m.stacked_convs) == (8, 16, 1) for m in (t, s))
    defaults = load_pipeline(PIPELINE).raw  # the file's values are the options' defaults
    assert load_pipeline(PIPELINE, pipeline_overrides(parse_args([]), defaults["data"]["root"])).raw == defaults


BENCH = ROOT / "benchmarks"


def test_benchmark_modules_stay_small():
    """The repository's 400-line rule holds in benchmarks/ too."""
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in BENCH.rglob("*.py")}
    assert len(sizes) > 15 and not {f: n for f, n in sizes.items() if n > 400}, sizes


def test_benchmark_pipelines_load():
    """Every pipeline file under benchmarks/ loads on its own (its values are its script's defaults)."""
    from ldpipe.config import load_pipeline
    files = sorted(BENCH.rglob("*.toml"))
    assert {p.name for p in files} >= {"synth_data.toml", "step_bench.toml", "programme.toml"}
    for path in files:
        if path.name != "synth_data.toml":  # a [data] section only: the others extend it
            pipe = load_pipeline(path)
            assert pipe.bases and pipe.models, path
        else:
            assert load_pipeline(path).data.format == "coco"


def test_view_draws_reports_the_views_and_their_size(synth_root):
    """``benchmarks.studies.view_draws``: K views per image drawn, their inputs against the
    fixed variants' (a Resize to half the fixed scale: about a quarter of the pixels)."""
    out = json.loads(bench("benchmarks.studies.view_draws", str(ROOT / "pipelines" / "demo.toml"),
                           "-o", f"data.root={synth_root}", "-o", "data.train_scales=[[320,320]]",
                           "-o", 'data.augment=[{type="Resize", img_scale=[[160,160]]}, {type="RandomFlip"}]',
                           "--count", "3").strip().splitlines()[-1])
    assert out["augment"] == ["Resize", "RandomFlip"] and out["views"] == 3 * out["images"] == 36
    assert 0.2 < out["pixels_ratio"] < 0.35 and out["draw_ms_per_view"] > 0


@pytest.mark.slow
def test_method_costs_times_every_method_from_its_own_cache(tmp_path):
    """benchmarks.timings.method_costs: plain / LD v2 / BCKD / CrossKD steps from an ld cache, a
    dense raw-logit cache and a CrossKD one; the report's ratios, teacher-side parameters (the
    head part: CrossKD only) and bytes per sample are consistent."""
    import torch

    from helpers import synth_set
    from ldpipe.config import load_pipeline
    from ldpipe.models import build_model
    from ldpipe.models.checkpoint import save_checkpoint
    data = synth_set(tmp_path / "synth", n_train=8, n_val=2, seed=1)
    over = [f"data.root={data}", *TINY[1::2], "models.teacher.stacked_convs=2",
            "models.student.stacked_convs=2", "train.batch_size=2", "train.workers=0",
            "cache.samples_per_shard=4", 'models.teacher.checkpoint=""']
    args = [a for kv in over for a in ("-o", kv)]
    pipe = load_pipeline(ROOT / "pipelines" / "demo.toml", over)
    torch.manual_seed(0)
    ckpt = str(tmp_path / "teacher.pth")
    save_checkpoint(ckpt, build_model(pipe.model("teacher"), 4), {})
    dense = ["-o", "cache.region=dense", "-o", "cache.cls_values=logits", "-o", "cache.codec=fp16"]
    caches = {}
    for name, extra in (("ld", []), ("bckd", dense), ("crosskd", [*dense, "-o", "cache.reused_head_idx=1"])):
        caches[name] = str(tmp_path / f"{name}.zarr")
        bench("ldpipe", "dump-teacher", "pipelines/demo.toml", "--checkpoint", ckpt, "--out", caches[name],
              *args, *extra)
    out = tmp_path / "mc.json"
    bench("benchmarks.timings.method_costs", "pipelines/demo.toml", "--ld", caches["ld"], "--bckd",
          caches["bckd"], "--crosskd", caches["crosskd"], "--batches", "2", "--rounds", "2",
          "--json", str(out), *args)
    m = json.loads(out.read_text())["methods"]
    assert set(m) == {"plain", "ld_v2", "bckd", "crosskd"}
    assert m["plain"]["ratio"] == 1.0 and all(v["step_s"] > 0 for v in m.values())
    assert m["crosskd"]["teacher_params"] > 0 == m["plain"]["teacher_params"] == m["ld_v2"]["teacher_params"] \
        == m["bckd"]["teacher_params"]
    by = {k: v["cache_bytes_per_sample"] for k, v in m.items()}
    assert by["plain"] == 0 < by["ld_v2"] < by["bckd"] <= by["crosskd"]
