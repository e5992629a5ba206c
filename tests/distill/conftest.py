"""The module fixtures of the distillation tests (test_distill.py, test_vlr_setting.py): an
8-image synthetic set, a random tiny teacher with non-trivial distributions, and its caches in
each codec.  Module scope: each test file dumps its own."""
from __future__ import annotations

import pytest
import torch

from helpers import distill_pipe, synth_set
from ldpipe.engine.dump import dump_teacher
from ldpipe.models import build_model
from ldpipe.models.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return synth_set(tmp_path_factory.mktemp("synth"), n_train=8, n_val=2, seed=3)


@pytest.fixture(scope="module")
def teacher_ckpt(synth, tmp_path_factory):
    pipe = distill_pipe(synth)
    torch.manual_seed(0)
    model = build_model(pipe.model("teacher"), 4)
    # give the random teacher non-trivial distributions
    with torch.no_grad():
        model.bbox_head.gfl_reg.weight.normal_(0, 0.3)
        model.bbox_head.gfl_cls.weight.normal_(0, 0.3)
    path = str(tmp_path_factory.mktemp("teacher") / "teacher.pth")
    save_checkpoint(path, model, {"ldpipe": {"model": "teacher"}})
    return path


@pytest.fixture(scope="module")
def caches(synth, teacher_ckpt, tmp_path_factory):
    out = {}
    base = tmp_path_factory.mktemp("caches")
    for codec in ("fp32", "fp16", "int8"):
        pipe = distill_pipe(synth, f"cache.codec={codec}")
        path = str(base / f"{codec}.zarr")
        dump_teacher(pipe, "teacher", teacher_ckpt, path, progress=False)
        out[codec] = path
    return out
