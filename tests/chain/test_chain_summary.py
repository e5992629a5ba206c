"""The chain's summary PNG carries every trained stage's loss curve (from its metrics.jsonl),
and the chain passes --overwrite / --resume to the trainings it reruns or continues."""
from __future__ import annotations

import json
import os

import matplotlib.image

from ldpipe.chain import Chain, Stage, loss_curve, write_summary
from ldpipe.config import load_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(ROOT, "pipelines", "demo.toml")


def _stage(work_dir, tag, losses, kind="train"):
    d = work_dir / tag
    d.mkdir(parents=True, exist_ok=True)
    (d / "metrics.json").write_text(json.dumps({"bbox_mAP": 0.3, "bbox_mAP_50": 0.5, "bbox_mAP_75": 0.2}))
    if losses is not None:
        with open(d / "metrics.jsonl", "w") as fh:
            for i, loss in enumerate(losses, 1):
                fh.write(json.dumps({"type": kind, "iter": 10 * i, "loss": loss, "loss_cls": 0.1}) + "\n")
            fh.write(json.dumps({"type": "val", "iter": 10, "bbox_mAP": 0.1}) + "\n")
    return str(d / "metrics.json")


def test_summary_png_has_the_loss_curve_of_every_trained_stage(tmp_path):
    pipe = load_pipeline(DEMO)
    rows = [("teacher", "teacher", _stage(tmp_path, "teacher", None)),  # a given checkpoint
            ("baseline student", "student", _stage(tmp_path, "student-baseline", [3.0, 2.0, 1.5])),
            ("LD student", "student", _stage(tmp_path, "student-ld", [4.0, 2.5], kind="epoch"))]
    write_summary(str(tmp_path), rows, pipe)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["loss_curves"] == {
        "baseline student: student-baseline": {"points": 3, "first_iter": 10, "last_iter": 30,
                                               "last_loss": 1.5},
        "LD student: student-ld": {"points": 2, "first_iter": 10, "last_iter": 20, "last_loss": 2.5}}
    assert loss_curve(str(tmp_path / "student-baseline")) == ([10, 20, 30], [3.0, 2.0, 1.5])
    with_curves = matplotlib.image.imread(str(tmp_path / "summary.png"))
    write_summary(str(tmp_path), rows[:1], pipe)  # nothing trained: the bar chart alone
    without = matplotlib.image.imread(str(tmp_path / "summary.png"))
    assert with_curves.shape[1] > 1.5 * without.shape[1]


def test_chain_restarts_a_training_with_overwrite_and_continues_it_with_resume(tmp_path):
    pipe = load_pipeline(DEMO)
    ran = []
    chain = Chain(DEMO, (), pipe, str(tmp_path), run_argv=ran.append, echo=lambda *_: None)
    wd = tmp_path / "teacher"
    stage = Stage("train-teacher", ["train", DEMO, "--work-dir", str(wd)], {"a": 1}, [str(wd / "x")],
                  work_dir=str(wd), extra={"resume_flag": True})
    chain.run_stage(stage)  # first time: a fresh start
    assert ran[-1][-1] == "--overwrite"
    (tmp_path / ".chain" / "train-teacher.done.json").unlink()  # as if killed mid-way
    chain.run_stage(stage)
    assert ran[-1][-1] == "--resume"
    chain.run_stage(Stage(stage.name, stage.argv, {"a": 2}, stage.outputs, work_dir=str(wd),
                          extra={"resume_flag": True}))  # inputs changed: start over
    assert ran[-1][-1] == "--overwrite"
