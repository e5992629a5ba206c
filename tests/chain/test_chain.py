"""ldpipe chain: all stages run, a rerun skips them, edits rerun what depends on them, kills resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import synth_set, tiny

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(ROOT, "pipelines", "demo.toml")  # teacher -> student (no TA)
TA_SECTION = "\n[models.ta]\ndepth = 18\nbase_channels = 24\nchannels = 48\nstacked_convs = 2\n"


@pytest.fixture(scope="module", autouse=True)
def demo_with_ta(tmp_path_factory):
    """The demo pipeline plus a TA model, so the chain runs teacher -> TA -> student."""
    global DEMO
    path = tmp_path_factory.mktemp("pipe") / "demo_ta.toml"
    path.write_text(open(os.path.join(ROOT, "pipelines", "demo.toml")).read() + TA_SECTION)
    DEMO = str(path)
    yield
    DEMO = os.path.join(ROOT, "pipelines", "demo.toml")


def _args(data: str, *extra: str) -> list[str]:
    kv = [f"data.root={data}", "train.workers=0", "data.train_scales=[[128, 128]]",
          "data.test_scale=[128, 128]", "train.epochs=2", "train.max_iters_per_epoch=2",
          "train.batch_size=4", "models.teacher.train={}", "cache.samples_per_shard=8",
          # the demo's shipped teacher and its three student seeds: off (a tiny teacher is
          # trained here, one student per row)
          'models.teacher.checkpoint=""', "chain.seeds=[]"]
    for m in ("teacher", "ta", "student"):
        kv += tiny(m)
    return [a for x in [*kv, *extra] for a in ("-o", x)]


def _chain(wd, data, *extra, **kw):
    cmd = [sys.executable, "-m", "ldpipe", "chain", DEMO, "--work-dir", str(wd), *_args(data, *extra)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, **kw)


STUDENT_STAGES = ["train-student-baseline", "eval-student-baseline", "train-student-ld", "eval-student-ld"]


def _ran(out: str) -> list[str]:
    """The stages the chain ran in its own process, in order."""
    return [line.split()[2].rstrip(":") for line in out.splitlines() if line.startswith("[chain] run ")]


def _started(out: str) -> list[str]:
    """The stages the chain ran in a second process (``chain.jobs = 2``)."""
    return [line.split()[2] for line in out.splitlines() if line.startswith("[chain] start ")]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synth_set(tmp_path_factory.mktemp("chain") / "synth", n_train=8, n_val=4, seed=2)


def test_chain_runs_skips_and_reruns_only_what_changed(data, tmp_path):
    wd = tmp_path / "w"
    first = _chain(wd, data)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    # the demo's chain.jobs = 2: the baseline student trains in a second process from the start,
    # the students' other stages in child processes too once the last cache is dumped
    lines = first.stdout.splitlines()
    assert lines.index(next(x for x in lines if x.startswith("[chain] start train-student-baseline"))) \
        < lines.index(next(x for x in lines if x.startswith("[chain] run train-teacher")))
    assert lines.index(next(x for x in lines if x.startswith("[chain] run dump-ta"))) \
        < lines.index(next(x for x in lines if x.startswith("[chain] start train-student-ld")))
    assert sorted(_started(first.stdout)) == sorted(STUDENT_STAGES)
    assert _ran(first.stdout) == ["train-teacher", "eval-teacher", "dump-teacher", "train-ta", "eval-ta",
                                  "dump-ta"]
    assert "[chain] done train-student-baseline" in first.stdout
    assert (wd / ".chain" / "train-student-baseline.log").stat().st_size > 0
    summary = json.load(open(wd / "summary.json"))
    assert [r["role"] for r in summary["rows"]] == ["teacher", "TA", "baseline student", "LD student"]
    assert (wd / "summary.md").read_text().count("|") > 20 and (wd / "summary.png").stat().st_size > 1000
    assert sorted(summary["loss_curves"]) == sorted([
        "teacher: teacher", "TA: ta", "baseline student: student-baseline", "LD student: student-ld"])
    assert all(c["points"] > 0 for c in summary["loss_curves"].values())
    runs = [line for line in first.stdout.splitlines()
            if line.startswith(("[chain] run train-", "[chain] start train-"))]
    assert len(runs) == 4 and all(line.endswith(" --overwrite") for line in runs)  # fresh starts
    assert "| LD student |" in first.stdout
    rows = {r["role"]: r for r in summary["rows"]}
    gain = (rows["LD student"]["AP"] - rows["baseline student"]["AP"]) * 100
    assert f"LD student - baseline student: {gain:+.1f} AP" in first.stdout

    # (no wall-time bound: on a loaded 2-core machine even a no-op rerun of the process took
    # 76 s; that nothing ran is what the skip lines and _ran show)
    again = _chain(wd, data)
    assert again.returncode == 0 and _ran(again.stdout) == []
    assert "skipped 10" in again.stdout

    edited = _chain(wd, data, "models.student.stacked_convs=2")
    assert edited.returncode == 0, edited.stderr[-2000:]
    assert sorted(_started(edited.stdout)) == sorted(STUDENT_STAGES) and _ran(edited.stdout) == []

    # the TA cache's lineage names the teacher's cache
    info = subprocess.run([sys.executable, "-m", "ldpipe", "cache", "info", str(wd / "caches" / "ta.zarr")],
                          cwd=ROOT, capture_output=True, text=True)
    assert "trained from cache" in info.stdout


def test_parallel_baseline_is_the_sequential_one(data, tmp_path):
    """chain.jobs = 2 only moves the students' stages into child processes: their weights
    equal those of the same trainings run in sequence (chain.jobs = 1) in this process."""
    import torch
    par = _chain(tmp_path / "par", data, "chain.tas=[]")
    seq = _chain(tmp_path / "seq", data, "chain.tas=[]", "chain.jobs=1")
    assert par.returncode == 0 and seq.returncode == 0, par.stderr[-2000:] + seq.stderr[-2000:]
    assert sorted(_started(par.stdout)) == sorted(STUDENT_STAGES) and _started(seq.stdout) == []
    assert _ran(seq.stdout)[-4:] == STUDENT_STAGES
    for tag in ("student-baseline", "student-ld"):
        a = torch.load(tmp_path / "par" / tag / "latest.pth", weights_only=True)["state_dict"]
        b = torch.load(tmp_path / "seq" / tag / "latest.pth", weights_only=True)["state_dict"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), tag
    bad = _chain(tmp_path / "bad", data, "chain.tas=[]", "chain.jobs=0")
    assert bad.returncode == 1 and "chain.jobs must be an integer >= 1" in bad.stdout + bad.stderr


def test_killed_chain_resumes_without_redoing_the_teacher(data, tmp_path):
    wd = tmp_path / "w"
    cmd = [sys.executable, "-m", "ldpipe", "chain", DEMO, "--work-dir", str(wd),
           *_args(data, "models.ta.train={epochs = 12, max_iters_per_epoch = 2}")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ckpt = wd / "ta" / "epoch_1.pth"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "chain ended before the TA's first epoch"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (wd / ".chain" / "train-ta.done.json").exists()
    rerun = _chain(wd, data, "models.ta.train={epochs = 12, max_iters_per_epoch = 2}")
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    ran = _ran(rerun.stdout)
    assert ran[0] == "train-ta" and "train-teacher" not in ran and "dump-teacher" not in ran
    assert [line for line in rerun.stdout.splitlines()
            if line.startswith("[chain] run train-ta:")][0].endswith(" --resume")
    metrics = [json.loads(x) for x in open(wd / "ta" / "metrics.jsonl") if '"type": "epoch"' in x]
    epochs = [m["epoch"] for m in metrics]
    assert sorted(set(epochs)) == list(range(1, 13)) and len(epochs) <= 13  # resumed, not restarted


def test_given_teacher_checkpoint_is_used_not_trained(data, tmp_path):
    """models.teacher.checkpoint (ldpipe or mmdetection format) replaces the teacher's training."""
    import torch

    from ldpipe.config import load_pipeline
    from ldpipe.models import build_model
    pipe = load_pipeline(DEMO, [_args(data)[i + 1] for i in range(0, len(_args(data)), 2)])
    model = build_model(pipe.model("teacher"), 4)
    ckpt = tmp_path / "given.pth"
    torch.save({"meta": {"CLASSES": ("a", "b", "c", "d")}, "state_dict": model.state_dict()}, ckpt)
    out = _chain(tmp_path / "w", data, f"models.teacher.checkpoint={ckpt}", "chain.tas=[]",
                 "chain.baseline=false")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert _ran(out.stdout) == ["eval-teacher", "dump-teacher"]
    assert _started(out.stdout) == ["train-student-ld", "eval-student-ld"]
    assert f"given checkpoint {ckpt}" in out.stdout


def test_cache_id_reads_missing_only_for_a_missing_cache(tmp_path, monkeypatch):
    """No cache (absent, or a folder that is not one) reads as "missing"; a bug inside the
    reader propagates instead of silently rerunning every stage after the dump."""
    from ldpipe.chain import runner as chain_mod
    from ldpipe.config import load_pipeline
    pipe = load_pipeline(DEMO, [])
    ch = chain_mod.Chain(DEMO, (), pipe, str(tmp_path / "wd"), run_argv=lambda argv: None)
    (tmp_path / "not_a_cache").mkdir()
    assert ch._cache_id(str(tmp_path / "absent.zarr")) == "missing"
    assert ch._cache_id(str(tmp_path / "not_a_cache")) == "missing"

    class Broken:
        def __init__(self, url):
            pass

        @property
        def manifest(self):
            raise TypeError("a programming error")

    monkeypatch.setattr(chain_mod, "CacheReader", Broken)
    with pytest.raises(TypeError, match="a programming error"):
        ch._cache_id(str(tmp_path / "absent.zarr"))


def test_seeds_train_each_student_row_once_per_seed(data, tmp_path):
    """chain.seeds = [3, 5]: a baseline and an LD student per seed, each trained with its
    train.seed (the same weights as a plain train-student run with that seed), and a summary
    with every seed, the means and the paired per-seed gain."""
    import torch
    wd = tmp_path / "w"
    out = _chain(wd, data, "chain.tas=[]", "chain.seeds=[3, 5]")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    expected = [f"{k}-student-{r}-s{s}" for k in ("train", "eval") for r in ("baseline", "ld") for s in (3, 5)]
    assert sorted(_started(out.stdout)) == sorted(expected)
    starts = [ln for ln in out.stdout.splitlines() if ln.startswith("[chain] start train-student-")]
    assert len(starts) == 4 and all(f"-o train.seed={ln.split()[2].rsplit('-s', 1)[1]} " in ln for ln in starts)
    summary = json.load(open(wd / "summary.json"))
    assert [(r["role"], r["seed"]) for r in summary["rows"]] == [
        ("teacher", None), ("baseline student", 3), ("baseline student", 5), ("LD student", 3), ("LD student", 5)]
    ap = {(r["role"], r["seed"]): r["AP"] * 100 for r in summary["rows"]}
    roles = {s["role"]: s for s in summary["roles"]}
    ld = [ap[("LD student", s)] for s in (3, 5)]
    base = [ap[("baseline student", s)] for s in (3, 5)]
    assert roles["LD student"]["AP"] == pytest.approx(sum(ld) / 2)
    assert roles["LD student"]["AP_std"] == pytest.approx(abs(ld[0] - ld[1]) / 2 ** 0.5)
    check = summary["gain_check"]
    assert check["per_seed"] == pytest.approx({"3": ld[0] - base[0], "5": ld[1] - base[1]})
    assert check["above_every_baseline_seed"] == (sum(ld) / 2 > max(base))
    assert "| LD student | student |" in out.stdout and "per seed (3, 5)" in out.stdout
    # the seed reaches the training: the seed-5 LD student is a plain train-student with seed 5
    alone = subprocess.run([sys.executable, "-m", "ldpipe", "train-student", DEMO, "--model", "student",
                            "--cache", str(wd / "caches" / "teacher.zarr"), "--work-dir", str(tmp_path / "alone"),
                            *_args(data, "chain.tas=[]", "train.seed=5")],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert alone.returncode == 0, alone.stderr[-2000:]
    a = torch.load(wd / "student-ld-s5" / "latest.pth", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "alone" / "latest.pth", weights_only=True)["state_dict"]
    c = torch.load(wd / "student-ld-s3" / "latest.pth", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)
    again = _chain(wd, data, "chain.tas=[]", "chain.seeds=[3, 5]")
    assert again.returncode == 0 and _started(again.stdout) == [] and _ran(again.stdout) == []
    bad = _chain(tmp_path / "bad", data, "chain.tas=[]", "chain.seeds=[1, 1]")
    assert bad.returncode == 1 and "chain.seeds must be a list of distinct integers" in bad.stdout + bad.stderr


@pytest.mark.parametrize("recipe", ["bckd", "crosskd"])
def test_chain_runs_the_bckd_and_crosskd_recipes(data, tmp_path, recipe):
    """`chain` runs any method: with BCKD's or CrossKD's terms and the dense raw-logit cache they
    read (CrossKD: with the teacher's head part), the student trains from the dumped cache."""
    off = ["distill.ld=false", "distill.vlr=false", "distill.kd=false", "cache.region=dense",
           "cache.cls_values=logits", "cache.codec=fp16", "chain.tas=[]", "chain.baseline=false"]
    terms = {"bckd": ["distill.bckd_cls=true", "distill.bckd_box=true"],
             "crosskd": ["distill.crosskd_cls=true", "distill.crosskd_reg=true", "cache.reused_head_idx=0"]}
    out = _chain(tmp_path / "w", data, *off, *terms[recipe])
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert _started(out.stdout) == ["train-student-ld", "eval-student-ld"]
    losses = [json.loads(x) for x in open(tmp_path / "w" / "student-ld" / "metrics.jsonl") if '"epoch"' in x]
    want = {"bckd": ("loss_bckd_cls", "loss_bckd_box"), "crosskd": ("loss_crosskd_cls", "loss_crosskd_reg")}
    assert all(k in losses[-1] and losses[-1][k] == losses[-1][k] for k in want[recipe])  # present, not NaN
    assert "loss_ld" not in losses[-1]
    summary = json.load(open(tmp_path / "w" / "summary.json"))  # the row is named after its method
    assert [r["role"] for r in summary["rows"]] == ["teacher", {"bckd": "BCKD", "crosskd": "CrossKD"}[recipe] + " student"]
    info = subprocess.run([sys.executable, "-m", "ldpipe", "cache", "info", str(tmp_path / "w" / "caches" / "teacher.zarr")],
                          cwd=ROOT, capture_output=True, text=True)
    assert ("CrossKD" in info.stdout) == (recipe == "crosskd")
