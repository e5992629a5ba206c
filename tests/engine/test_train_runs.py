"""Long runs: used work dirs are refused (or --overwrite), provenance in the work dir and the
checkpoints, mid-epoch checkpoints that resume bitwise, validation with best.pth, train.log
and TensorBoard scalars."""
from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import torch
from click.testing import CliRunner

from ldpipe.cli import main as cli
from ldpipe.config.resolve import resolved_dict
from ldpipe.distill import GFLCriterion
from ldpipe.config import ConfigError
from ldpipe.engine.runtime import resolve_device
from ldpipe.engine.train import LoopState, TrainJob, train
from ldpipe.engine.workdir import WorkDirError, check_work_dir
from ldpipe.models import checkpoint
from ldpipe.models.checkpoint import file_sha256, load_file
from ldpipe.provenance import git_state

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(ROOT, "pipelines", "demo.toml")
SHORT = ("train.batch_size=2", "train.max_iters_per_epoch=3", "train.warmup_iters=2",
         "train.log_interval=1", "models.teacher.train={}")


def _records(work_dir, kind="train") -> list[dict]:
    with open(os.path.join(work_dir, "metrics.jsonl")) as fh:
        return [r for r in map(json.loads, fh) if r["type"] == kind]


def _args(tiny_overrides, *extra):
    return [a for kv in (*tiny_overrides, *SHORT, "train.epochs=1", *extra) for a in ("-o", kv)]


def test_used_work_dir_is_refused_and_old_checkpoints_stay(tiny_overrides, tmp_path):
    """Must show: rerunning ``ldpipe train`` into a used work dir without --resume leaves the
    old checkpoints untouched; --overwrite replaces the run (and only the run's files)."""
    wd = tmp_path / "w"
    base = ["train", DEMO, "--model", "teacher", "--work-dir", str(wd), "--device", "cpu"]
    runner = CliRunner()
    res = runner.invoke(cli, [*base, *_args(tiny_overrides)])
    assert res.exit_code == 0, res.output
    before = {p.name: file_sha256(str(p)) for p in wd.glob("*.pth")}
    assert set(before) == {"epoch_1.pth", "latest.pth"}
    metrics = (wd / "metrics.jsonl").read_text()

    res = runner.invoke(cli, [*base, *_args(tiny_overrides, "train.seed=5")])
    assert res.exit_code == 1
    assert res.output.startswith("Error: ") and len(res.output.strip().splitlines()) == 1
    assert str(wd) in res.output and "--resume" in res.output and "--overwrite" in res.output
    assert {p.name: file_sha256(str(p)) for p in wd.glob("*.pth")} == before
    assert (wd / "metrics.jsonl").read_text() == metrics

    (wd / "notes.txt").write_text("mine")
    (wd / "epoch_7.pth").write_text("a user's own file with a checkpoint's name")
    res = runner.invoke(cli, [*base, "--overwrite", *_args(tiny_overrides, "train.seed=5")])
    assert res.exit_code == 0, res.output
    assert file_sha256(str(wd / "epoch_1.pth")) != before["epoch_1.pth"]
    # only what the run recorded writing goes: the user's epoch_7.pth stays
    assert (wd / "epoch_7.pth").read_text().startswith("a user's own file")
    assert (wd / ".ldpipe-outputs").read_text().split() == ["epoch_1.pth"]
    assert len(_records(str(wd))) == 3  # a fresh metrics.jsonl, not appended to
    assert (wd / "notes.txt").read_text() == "mine"
    assert len((wd / "runs.jsonl").read_text().splitlines()) == 1

    res = runner.invoke(cli, [*base, "--overwrite", "--resume", *_args(tiny_overrides)])
    assert res.exit_code == 1 and "give one of them" in res.output
    # train-student has the same guard (refused before the cache is even opened)
    res = runner.invoke(cli, ["train-student", DEMO, "--cache", str(tmp_path / "nocache"),
                              "--work-dir", str(wd), "--device", "cpu", *_args(tiny_overrides)])
    assert res.exit_code == 1 and "is not empty" in res.output
    with pytest.raises(WorkDirError, match="not empty"):
        check_work_dir(str(wd), resume=False, overwrite=False)
    check_work_dir(str(wd), resume=True, overwrite=False)
    check_work_dir(str(tmp_path / "new"), resume=False, overwrite=False)


def test_provenance_in_work_dir_and_checkpoint(tiny_overrides, make_tiny_pipe, tmp_path):
    wd = tmp_path / "w"
    res = CliRunner().invoke(cli, ["train", DEMO, "--model", "teacher", "--work-dir", str(wd),
                                   "--device", "cpu", *_args(tiny_overrides)])
    assert res.exit_code == 0, res.output
    run = json.loads((wd / "run.json").read_text())
    assert run["command"][:4] == ["ldpipe", "train", DEMO, "--model"] and "train.epochs=1" in run["command"]
    assert set(run["versions"]) >= {"ldpipe", "torch", "torchvision", "zarr", "python"}
    assert run["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert run["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    git = run["git"]
    assert git == git_state() and git["available"] is True and len(git["commit"]) == 40
    assert isinstance(git["dirty"], bool)
    expected = resolved_dict(make_tiny_pipe(*SHORT, "train.epochs=1"))
    assert run["pipeline"] == expected
    assert run["pipeline"]["models"]["teacher"]["train"] == {}  # -o models.teacher.train={}
    from ldpipe.config import load_pipeline
    assert resolved_dict(load_pipeline(str(wd / "pipeline.toml"))) == expected
    # in the checkpoint, loadable with weights_only=True (load_file uses it)
    meta = load_file(str(wd / "latest.pth"))["meta"]["ldpipe"]
    assert meta["provenance"] == run


def test_git_state_outside_a_checkout_says_so(tmp_path):
    state = git_state(str(tmp_path))
    assert state["available"] is False and state["reason"]


class _Kill(GFLCriterion):
    """Interrupts training (as a kill would) in step ``at``."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at, self.calls = at, 0

    def __call__(self, model, batch, out, bt):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return super().__call__(model, batch, out, bt)


def test_mid_epoch_checkpoint_resumes_bitwise(make_tiny_pipe, tmp_path):
    """3 epochs of 3 iterations, a checkpoint every 2 iterations; killed at iteration 6
    (epoch 2, after iter_4.pth: 1 of its 3 batches done), resumed: equals the straight run."""
    pipe = make_tiny_pipe(*SHORT, "train.epochs=3")
    straight = train(pipe, "teacher", str(tmp_path / "a"), device="cpu", progress=False)
    wd = str(tmp_path / "b")
    ckpt = make_tiny_pipe(*SHORT, "train.epochs=3", "train.checkpoint_interval=2")
    with pytest.raises(KeyboardInterrupt):
        train(ckpt, "teacher", wd, device="cpu", progress=False, job=TrainJob(_Kill(at=6)))
    assert os.path.realpath(os.path.join(wd, "latest.pth")).endswith("iter_4.pth")
    loop = load_file(os.path.join(wd, "latest.pth"))["loop"]
    assert (loop["epoch"], loop["iter"], loop["epoch_iter"]) == (1, 4, 1)
    assert sorted(os.listdir(wd)).count("iter_2.pth") == 0  # older iteration files are removed
    reads = []
    real = checkpoint.torch.load
    with pytest.MonkeyPatch.context() as mp:  # a resume reads its checkpoint once
        mp.setattr(checkpoint.torch, "load", lambda *a, **k: reads.append(str(a[0])) or real(*a, **k))
        resumed = train(ckpt, "teacher", wd, resume=True, device="cpu", progress=False)
    assert reads == [os.path.join(wd, "latest.pth")]
    a, b = load_file(straight)["state_dict"], load_file(resumed)["state_dict"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["iter"] for r in _records(wd)] == list(range(1, 10))
    assert [r["lr"] for r in _records(wd)] == [r["lr"] for r in _records(str(tmp_path / "a"))]
    ea, eb = _records(str(tmp_path / "a"), "epoch"), _records(wd, "epoch")
    assert [e["loss"] for e in ea] == [e["loss"] for e in eb]  # the epoch mean covers all 3
    assert not [f for f in os.listdir(wd) if f.startswith("iter_")]  # gone after the epoch


def test_validation_every_n_epochs_keeps_best(make_tiny_pipe, tmp_path, monkeypatch):
    from ldpipe.engine import infer
    calls = []
    aps = iter([0.2, 0.1, 0.3])
    real = infer.evaluate_model

    def fake(model, data, split, device, batch_size=4, progress=True):
        metrics, dets = real(model, data, split, device, batch_size, progress)
        calls.append(len(dets))
        ap = next(aps)  # the tiny model's AP is 0: drive best.pth with known values
        return {**metrics, "bbox_mAP": ap, "bbox_mAP_50": ap, "bbox_mAP_75": ap}, dets

    monkeypatch.setattr(infer, "evaluate_model", fake)
    wd = str(tmp_path / "w")
    pipe = make_tiny_pipe(*SHORT, "train.epochs=6", "train.max_iters_per_epoch=1",
                          "train.val_interval=2")
    train(pipe, "teacher", wd, device="cpu", progress=False)
    vals = _records(wd, "val")
    assert [v["epoch"] for v in vals] == [2, 4, 6] and calls == [4, 4, 4]  # 4 val images
    assert [v["bbox_mAP"] for v in vals] == [0.2, 0.1, 0.3]
    best = load_file(os.path.join(wd, "best.pth"))
    assert best["meta"]["ldpipe"]["best"] == {"epoch": 6, "bbox_mAP": 0.3}
    assert "optimizer" not in best
    last = load_file(os.path.join(wd, "epoch_6.pth"))["state_dict"]
    assert all(torch.equal(best["state_dict"][k], last[k]) for k in last)
    with open(os.path.join(wd, "train.log")) as fh:
        log = fh.read()
    assert "epoch 4 val: bbox_mAP=0.1000 (best 0.2000)" in log
    assert "epoch 6 val: bbox_mAP=0.3000 (best 0.3000, saved best.pth)" in log
    # resuming the finished run (its last checkpoint says "validation pending": it is
    # written before the validation) does not validate epoch 6 again
    train(pipe, "teacher", wd, device="cpu", progress=False, resume=True)
    assert [v["epoch"] for v in _records(wd, "val")] == [2, 4, 6] and len(calls) == 3
    # the run extended to 8 epochs: epoch 8 validates at 0.25, below the recorded best of
    # epoch 6 (0.3; the checkpoint, written before that validation, still says 0.2), so
    # best.pth stays epoch 6's
    aps = iter([0.25])
    longer = make_tiny_pipe(*SHORT, "train.epochs=8", "train.max_iters_per_epoch=1",
                            "train.val_interval=2")
    train(longer, "teacher", wd, device="cpu", progress=False, resume=True)
    assert [(v["epoch"], v["bbox_mAP"]) for v in _records(wd, "val")] == [
        (2, 0.2), (4, 0.1), (6, 0.3), (8, 0.25)]
    assert load_file(os.path.join(wd, "best.pth"))["meta"]["ldpipe"]["best"] == {"epoch": 6, "bbox_mAP": 0.3}


def test_train_log_has_the_console_lines(make_tiny_pipe, tmp_path, caplog):
    import logging
    wd = str(tmp_path / "w")
    pipe = make_tiny_pipe(*SHORT, "train.epochs=2")
    caplog.clear()  # the pipeline's override warning came before the run (and its log file)
    with caplog.at_level(logging.INFO, logger="ldpipe"):
        train(pipe, "teacher", wd, device="cpu", progress=False)
    with open(os.path.join(wd, "train.log")) as fh:
        lines = [line.rstrip("\n") for line in fh]
    console = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.name.startswith("ldpipe")]
    assert [line.split(" ", 1)[1] for line in lines] == console
    assert any("teacher epoch 2/2: " in line for line in lines)


def test_tensorboard_scalars_and_a_clean_skip_without_it(make_tiny_pipe, tmp_path, monkeypatch, caplog):
    pytest.importorskip("tensorboard", reason="tensorboard is in the test extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    wd = str(tmp_path / "tb")
    train(make_tiny_pipe(*SHORT, "train.epochs=1", "train.tensorboard=true"), "teacher", wd,
          device="cpu", progress=False)
    acc = EventAccumulator(os.path.join(wd, "tensorboard"))
    acc.Reload()
    loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert loss == [(r["iter"], pytest.approx(r["loss"], rel=1e-5)) for r in _records(wd)]
    assert "epoch/loss" in acc.Tags()["scalars"]

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    wd = str(tmp_path / "none")
    with caplog.at_level("WARNING", logger="ldpipe"):
        train(make_tiny_pipe(*SHORT, "train.epochs=1", "train.tensorboard=true"), "teacher", wd,
              device="cpu", progress=False)
    assert any("tensorboard package is not installed" in r.getMessage() for r in caplog.records)
    assert os.path.exists(os.path.join(wd, "latest.pth"))
    assert not os.path.exists(os.path.join(wd, "tensorboard"))


def test_loop_state_round_trip_and_older_checkpoints():
    """The loop state is written and read in one place; a checkpoint of the older layout (an
    epoch checkpoint held epoch/iter/best/val_pending only) reads with the missing defaults."""
    state = LoopState(2, 17, 3, {"loss": 1.5}, 0.25, True)
    assert LoopState.from_dict(state.to_dict()) == state
    old = LoopState.from_dict({"epoch": 4, "iter": 40, "best": None, "val_pending": False})
    assert old == LoopState(4, 40, 0, {}, None, False)
    assert LoopState.from_dict({}) == LoopState()


@pytest.mark.parametrize("bad", ["tpu", "cuda:x", "cpu:1", "gpu"])
def test_one_device_rule_names_a_bad_device(bad):
    with pytest.raises(ConfigError, match=f"--device '{bad}'"):
        resolve_device(bad)
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="not available"):
            resolve_device("cuda")
        assert resolve_device(None) == torch.device("cpu")


def test_resume_continues_only_the_same_run(tiny_overrides, tmp_path):
    """``--resume`` on a work dir whose run is another one (here: another model) is refused
    naming both; ``--resume-anyway`` continues it."""
    wd = tmp_path / "w"
    runner = CliRunner()
    base = ["train", DEMO, "--work-dir", str(wd), "--device", "cpu", *_args(tiny_overrides)]
    assert runner.invoke(cli, [*base, "--model", "teacher"]).exit_code == 0
    res = runner.invoke(cli, [*base, "--model", "student", "--resume"])
    assert res.exit_code == 1 and res.output.startswith("Error: --resume:")
    assert "model: recorded 'teacher', now 'student'" in res.output and "--resume-anyway" in res.output
    res = runner.invoke(cli, [*base, "--model", "teacher", "--resume", "-o", "train.epochs=2"])
    assert res.exit_code == 0, res.output  # the same run: continues
    # another pipeline file (a copy): refused naming both paths, continued with --resume-anyway
    other = tmp_path / "copy.toml"
    shutil.copyfile(DEMO, other)
    moved = ["train", str(other), "--work-dir", str(wd), "--device", "cpu", "--model", "teacher",
             *_args(tiny_overrides, "train.epochs=3")]
    res = runner.invoke(cli, [*moved, "--resume"])
    assert res.exit_code == 1 and "pipeline: recorded" in res.output and str(other) in res.output
    res = runner.invoke(cli, [*moved, "--resume", "--resume-anyway"])
    assert res.exit_code == 0, res.output
    assert [r["epoch"] for r in _records(str(wd), "epoch")] == [1, 2, 3]  # it continued the run


def test_run_identity_names_kind_and_teacher(tmp_path):
    from ldpipe.engine.workdir import resume_problem, run_identity
    plain = {"ldpipe": {"model": "student", "pipeline": "p.toml", "lineage": {},
                        "provenance": {"cwd": str(tmp_path)}}}
    cached = {"ldpipe": {**plain["ldpipe"], "lineage": {"cache": {"cache_id": "abc"}}}}
    other = {"ldpipe": {**plain["ldpipe"], "lineage": {"cache": {"cache_id": "def"}}}}
    assert run_identity(plain)["kind"] == "train" and run_identity(cached)["kind"] == "train-student"
    assert run_identity(plain)["pipeline"] == os.path.realpath(str(tmp_path / "p.toml"))
    assert resume_problem(cached, cached, "x.pth") is None
    assert "kind: recorded 'train', now 'train-student'" in resume_problem(plain, cached, "x.pth")
    assert "teacher: recorded 'abc', now 'def'" in resume_problem(cached, other, "x.pth")
