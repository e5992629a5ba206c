"""The demo's shipped teacher (pipelines/weights/demo_teacher.pth): the file is the one its
README names (sha256), loads with weights_only into the demo's teacher as configured, and is
the checkpoint the demo's chain takes instead of training a teacher."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ldpipe.config import load_pipeline
from ldpipe.models import build_model
from ldpipe.models.checkpoint import file_sha256, load_weights

REPO = Path(__file__).resolve().parents[2]
WEIGHTS = REPO / "pipelines" / "weights"


def test_shipped_teacher_matches_its_readme_and_loads_into_the_demo_teacher(monkeypatch):
    readme = (WEIGHTS / "README.md").read_text()
    sha = re.search(r"\*\*sha256\*\*: `([0-9a-f]{64})`", readme).group(1)
    assert file_sha256(str(WEIGHTS / "demo_teacher.pth")) == sha
    monkeypatch.chdir(REPO)  # the pipeline names the file relative to the repository root
    pipe = load_pipeline(REPO / "pipelines" / "demo.toml")
    assert pipe.model("teacher").checkpoint == "pipelines/weights/demo_teacher.pth"
    model = build_model(pipe.model("teacher"), 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    load_weights(model, pipe.model("teacher").checkpoint)  # strict: names and shapes match
    after = model.state_dict()
    assert all(v.dtype == before[k].dtype for k, v in after.items())  # fp16 file, fp32 model
    assert sum(not torch.equal(before[k], after[k]) for k in after) > 0.9 * len(after)
    assert 0.8e6 < sum(p.numel() for p in model.parameters()) < 0.9e6
