"""The chain's summary PNG carries every trained stage's loss curve (from its metrics.jsonl),
and the chain passes --overwrite / --resume to the trainings it reruns or continues."""
from __future__ import annotations

import json
import os

import matplotlib.image

import pytest

from ldpipe.chain import Chain, Row, Stage, loss_curve, write_summary
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


def test_seeded_summary_gives_mean_std_every_seed_and_the_gain_check(tmp_path):
    import statistics
    pipe = load_pipeline(DEMO)

    def row(role, tag, seed, ap):
        d = tmp_path / tag
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps({"bbox_mAP": ap, "bbox_mAP_50": ap + 0.2,
                                                    "bbox_mAP_75": ap - 0.05}))
        return Row(role, "student", str(d / "metrics.json"), seed)

    base = {0: 0.30, 1: 0.34, 2: 0.29}
    ld = {0: 0.355, 1: 0.36, 2: 0.33}
    rows = [row("baseline student", f"b{s}", s, v) for s, v in base.items()] + \
           [row("LD student", f"l{s}", s, v) for s, v in ld.items()]
    out = write_summary(str(tmp_path), rows, pipe)
    stats = {s["role"]: s for s in out["roles"]}
    assert stats["LD student"]["AP"] == pytest.approx(statistics.fmean(v * 100 for v in ld.values()))
    assert stats["baseline student"]["AP_std"] == pytest.approx(statistics.stdev(v * 100 for v in base.values()))
    check = out["gain_check"]
    assert check["gain"]["AP"] == pytest.approx(statistics.fmean(ld.values()) * 100 - statistics.fmean(base.values()) * 100)
    assert check["per_seed"] == pytest.approx({"0": 5.5, "1": 2.0, "2": 4.0})
    assert check["above_margin"] and check["above_every_baseline_seed"]  # 34.8 > 34.0
    assert "| LD student | student |" in out["table"] and "35.5 / 36.0 / 33.0" in out["table"]
    assert "above every baseline seed (best 34.0): yes" in out["table"]
    # a lucky baseline seed above the distilled mean: the check says so
    rows[1] = row("baseline student", "b1x", 1, 0.36)
    out = write_summary(str(tmp_path), rows, pipe)
    assert out["gain_check"]["above_margin"] and not out["gain_check"]["above_every_baseline_seed"]
    assert "above every baseline seed (best 36.0): NO" in out["table"]
    assert (tmp_path / "summary.png").stat().st_size > 1000


def test_pool_runs_jobs_in_order_a_few_at_a_time_and_stops_on_a_failure(tmp_path):
    """StagePool: each job's stages in order, at most `slots` child processes at once; a failed
    stage is raised by join() and the other running children are killed."""
    import subprocess
    import sys
    import time

    from ldpipe.chain.pool import StagePool
    from ldpipe.chain.runner import _Background
    pipe = load_pipeline(DEMO)
    log = tmp_path / "log.txt"

    class Fake(Chain):
        def start_stage(self, stage):
            code = stage.argv[0]
            proc = subprocess.Popen([sys.executable, "-c", code])
            fh = open(tmp_path / f"{stage.name}.log", "w")
            return _Background(stage, proc, fh, str(tmp_path / f"{stage.name}.log"), time.perf_counter())

    chain = Fake(DEMO, (), pipe, str(tmp_path), run_argv=None, echo=lambda *_: None)

    def step(name, code):
        return lambda: Stage(name, [code], {}, [])

    def mark(text, sleep=0.3):
        return f"import time; open({str(log)!r}, 'a').write({text!r} + ' start\\n'); time.sleep({sleep}); " \
               f"open({str(log)!r}, 'a').write({text!r} + ' end\\n')"

    pool = StagePool(chain, 1, poll_s=0.02)
    pool.submit([step("a1", mark("a1")), step("a2", mark("a2"))])
    pool.submit([step("b1", mark("b1"))])
    pool.submit([step("c1", mark("c1"))], [step("d1", mark("d1"))], first=True)  # ahead of b, in order
    pool.join()
    order = ["a1", "a2", "c1", "d1", "b1"]
    assert log.read_text().split("\n")[:-1] == [f"{n} {e}" for n in order for e in ("start", "end")]
    assert chain.ran == order

    pool = StagePool(chain, 2, poll_s=0.02)
    pool.submit([step("slow", "import time; time.sleep(60)")])
    pool.submit([step("bad", "import sys; sys.exit(3)"), step("never", "pass")])
    t0 = time.perf_counter()
    with pytest.raises(Exception, match="stage bad failed \\(exit code 3\\)"):
        pool.join()
    assert time.perf_counter() - t0 < 30 and "never" not in chain.ran  # the slow child was killed


def test_the_distilled_row_is_named_after_its_method_and_checked_against_the_baseline(tmp_path):
    from ldpipe.chain.summary import method_role
    assert method_role({"ld", "vlr", "kd"}) == "LD student"
    assert method_role({"bckd_cls", "bckd_box"}) == "BCKD student"
    assert method_role({"crosskd_cls", "ld"}) == "LD + CrossKD student"
    pipe = load_pipeline(DEMO)
    rows = []
    for role, tag, ap in (("baseline student", "b", 0.30), ("BCKD student", "k", 0.33)):
        d = tmp_path / tag
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps({"bbox_mAP": ap, "bbox_mAP_50": ap, "bbox_mAP_75": ap}))
        rows.append(Row(role, "student", str(d / "metrics.json")))
    out = write_summary(str(tmp_path), rows, pipe)
    assert out["gain_check"]["role"] == "BCKD student"
    assert out["gain_check"]["gain"]["AP"] == pytest.approx(3.0)
    assert "BCKD student - baseline student: +3.0 AP" in out["table"]
