"""COCO evaluation through faster-coco-eval when installed: the same AP as pycocotools."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest

from ldpipe.metrics import COCO_KEYS, coco_metrics
from ldpipe.metrics.coco import coco_backend

pytest.importorskip("faster_coco_eval", reason="faster-coco-eval is in the test extra")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # the benchmarks package


def test_both_back_ends_give_identical_ap():
    from benchmarks.timings.coco_eval_bench import synthetic_case
    records, names, dets = synthetic_case(images=30, classes=4, max_gts=6, dets=15, seed=3)
    a = coco_metrics(records, names, copy.deepcopy(dets), backend="pycocotools")
    b = coco_metrics(records, names, copy.deepcopy(dets), backend="faster-coco-eval")
    assert (a["coco_backend"], b["coco_backend"]) == ("pycocotools", "faster-coco-eval")
    assert 0.05 < a["bbox_mAP"] < 0.95 and a["bbox_mAP_s"] > -1  # a non-trivial case
    for key in COCO_KEYS:  # equal, at most up to the last bit of a float sum
        assert b[key] == pytest.approx(a[key], abs=1e-12), key
    for name in names:
        for k in ("AP", "AP50"):  # means over the precision array: equal up to summation order
            assert b["per_class"][name][k] == pytest.approx(a["per_class"][name][k], abs=1e-12)
        assert a["per_class"][name]["num_gts"] == b["per_class"][name]["num_gts"]
    assert a["num_detections"] == b["num_detections"] == 30 * 15


def test_back_end_choice(monkeypatch):
    assert coco_backend() == "faster-coco-eval"  # auto: installed
    monkeypatch.setenv("LDPIPE_COCO_BACKEND", "pycocotools")
    assert coco_backend() == "pycocotools"
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # as if not installed
    monkeypatch.setenv("LDPIPE_COCO_BACKEND", "auto")
    assert coco_backend() == "pycocotools"
    with pytest.raises(ValueError, match=r"ldpipe\[coco-fast\]"):
        coco_backend("faster-coco-eval")
    with pytest.raises(ValueError, match="must be one of"):
        coco_backend("cocoapi")


def test_benchmark_script_runs(tmp_path):
    out = tmp_path / "b.json"
    subprocess.run([sys.executable, "-m", "benchmarks.timings.coco_eval_bench", "--images", "5",
                    "--reps", "1", "--json", str(out)], check=True, capture_output=True, cwd=ROOT)
    d = json.loads(out.read_text())
    assert d["stats_max_abs_diff"] < 1e-12 and d["speedup"] > 0 and d["per_class_max_abs_diff"] < 1e-12
