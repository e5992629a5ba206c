"""``ldpipe benchmark``: the inference rate of a model (a run and its fields, not a timing)."""
from __future__ import annotations

import json
from pathlib import Path

from helpers import invoke

DEMO_PIPELINE = str(Path(__file__).resolve().parents[2] / "pipelines" / "demo.toml")


def test_benchmark_reports_a_positive_rate(tiny_overrides, tiny_teacher_ckpt):
    o = [x for kv in tiny_overrides for x in ("-o", kv)]
    res = invoke("benchmark", DEMO_PIPELINE, "--model", "teacher", "--checkpoint",
                 tiny_teacher_ckpt, "--images", "6", "--warmup", "2",
                 "--device", "cpu", *o, "-o", "models.teacher.test.nms=voting_cluster_diounms")
    assert res.exit_code == 0, res.output
    d = json.loads(res.output.strip().splitlines()[-1])
    assert d["images_per_s"] > 0 and d["ms_per_image"] > 0 and d["load_ms_per_image"] > 0
    assert abs(d["images_per_s"] * d["ms_per_image"] - 1000) < 1e-6
    assert (d["images"], d["warmup"], d["batch_size"], d["fp16"]) == (6, 2, 1, False)
    assert d["split_images"] == 4  # 4 validation images, cycled
    assert d["nms"] == "voting_cluster_diounms" and d["device"] == "cpu"
    assert d["architecture"]["depth"] == 18 and d["architecture"]["base_width"] == 8


def test_benchmark_refuses_fp16_on_the_cpu(tiny_overrides):
    o = [x for kv in tiny_overrides for x in ("-o", kv)]
    res = invoke("benchmark", DEMO_PIPELINE, "--model", "teacher", "--fp16",
                 "--device", "cpu", *o)
    assert res.exit_code == 1 and res.output.startswith("Error: benchmark: --fp16 needs a CUDA device")
