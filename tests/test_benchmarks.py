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

ROOT = Path(__file__).resolve().parents[1]
TINY = ("-o", "models.teacher.base_width=8", "-o", "models.teacher.channels=16",
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
    bench("benchmarks.dump_bench", "pipelines/demo.toml", "--random", "--synth", "8", "--reps", "1",
          "--policies", "ld", "--codecs", "fp32,int8", "--threads", "1", "--keep",
          "--workdir", str(work), "--json", str(out), *TINY)
    d = json.loads(out.read_text())
    assert d["timing"]["samples"] == 16 and d["timing"]["loop_s"]["ratio"] > 0
    sizes = {(s["policy"], s["codec"]): s for s in d["sizes"]}
    assert sizes["ld", "fp32"]["rows_per_sample"] == sizes["ld", "int8"]["rows_per_sample"] > 0
    assert sizes["ld", "int8"]["vs_dense_fp16"] < 0.5 * sizes["ld", "fp32"]["vs_dense_fp16"]

    fp32 = sizes["ld", "fp32"]["store"]  # the configured ld/int8 one is a timed run's store
    err = json.loads(bench("benchmarks.ld_error", fp32, sizes["ld", "int8"]["store"]))
    assert err["samples"] == 16 and err["edges"] > 0
    for student in ("random", "near"):
        assert 0 <= err[student]["relative_error"] < 0.01
        assert err[student]["ld_reference"] > 0

    parts = bench("benchmarks.dump_parts", "pipelines/demo.toml", fp32, "--images", "4",
                  "-o", f"data.root={work / 'synth'}", *TINY)
    ms = dict(line.strip("|").split("|") for line in parts.splitlines()
              if line.startswith("| ") and not line.startswith("| part"))
    assert set(k.strip() for k in ms) == {"load", "region main", "region ld", "encode", "write"}
    assert all(float(v) > 0 for v in ms.values())

    table = bench("benchmarks.int8_layouts", fp32)
    row = next(line for line in table.splitlines() if line.startswith("| per-edge scale (format)"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "76"  # 4 x 17 codes + 4 x 2 scale bytes per anchor
    assert all(0 < float(c) <= 80 for c in cells[2:6])


@pytest.mark.slow
def test_step_bench_reports_three_modes(tmp_path):
    out = tmp_path / "sb.json"
    bench("benchmarks.step_bench", "--teacher-depth", "18", "--student-depth", "18", "--channels", "16",
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
