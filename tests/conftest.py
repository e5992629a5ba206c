"""Shared session fixtures: a tiny synthetic data set, a CPU-sized pipeline, a random teacher.\n\nPlain helpers (paths, tiny models, the CLI runner, the KL of LD): ``tests/helpers.py``."""
from __future__ import annotations

import pytest

# a teacher small enough to run in well under a second per batch on two CPU cores
from helpers import DEMO_PIPELINE, TINY_TEACHER


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> str:
    """12 train / 4 val images of the embedded synthetic set."""
    from helpers import synth_set
    return synth_set(tmp_path_factory.mktemp("synth"), n_train=12, n_val=4, seed=0)


@pytest.fixture(scope="session")
def tiny_overrides(synth_root) -> tuple[str, ...]:
    """Overrides of ``pipelines/demo.toml`` for the tiny set and teacher: 160 px inputs,
    4 samples per cache unit, no loader workers."""
    return (f"data.root={synth_root}", "data.train_scales=[[160,160]]", "data.test_scale=[160,160]",
            *TINY_TEACHER, "cache.samples_per_shard=4", "train.workers=0")


@pytest.fixture(scope="session")
def make_tiny_pipe(tiny_overrides):
    """``make_tiny_pipe("cache.codec=fp32", ...)`` -> the demo pipeline with the tiny overrides."""
    from ldpipe.config import load_pipeline

    def make(*extra: str):
        return load_pipeline(DEMO_PIPELINE, [*tiny_overrides, *extra])

    return make


@pytest.fixture(scope="session")
def tiny_teacher_ckpt(make_tiny_pipe, tmp_path_factory) -> str:
    """A randomly initialised (seed 0) tiny teacher saved as an ldpipe checkpoint."""
    import torch

    from ldpipe.models import build_model
    from ldpipe.models.checkpoint import save_checkpoint
    pipe = make_tiny_pipe()
    torch.manual_seed(0)
    model = build_model(pipe.model("teacher"), 4)  # the synthetic set has 4 classes
    path = str(tmp_path_factory.mktemp("teacher") / "teacher.pth")
    save_checkpoint(path, model, {})
    return path


@pytest.fixture(scope="session")
def trained_tiny_teacher(make_tiny_pipe, tmp_path_factory) -> str:
    """Checkpoint of the tiny teacher trained for 20 epochs (120 steps) on the 12 synthetic
    images (~20 s): its outputs are a trained detector's, peaked where it has learned the
    objects, unlike a random network's near-uniform ones (the codec test checks that)."""
    from ldpipe.engine.train import train
    pipe = make_tiny_pipe("models.teacher.train={}", "train.epochs=20", "train.lr=0.02",
                          "train.steps=[16]", "train.batch_size=2", "train.log_interval=1000")
    return train(pipe, "teacher", str(tmp_path_factory.mktemp("trained-teacher")), device="cpu")
