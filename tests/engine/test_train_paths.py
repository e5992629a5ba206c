"""Training paths the end-to-end tests did not reach: resume restores the weights,
``--init``, DataLoader workers reading the cache, and ``--online-teacher`` from the CLI."""
from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner

from helpers import TINY_STUDENT as STUDENT
from ldpipe.engine.dump import dump_teacher
from ldpipe.cli import main as cli
from ldpipe.engine.student import train_student
from ldpipe.engine.train import train
from ldpipe.models import build_model
from ldpipe.models.checkpoint import file_sha256, load_file, save_checkpoint

DEMO_PIPELINE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                             "pipelines", "demo.toml")

SHORT = ("train.batch_size=2", "train.max_iters_per_epoch=2", "train.warmup_iters=2",
         "train.log_interval=1", "models.teacher.train={}")


def _params(path: str) -> dict[str, torch.Tensor]:
    return load_file(path)["state_dict"]


def _records(work_dir, kind="train") -> list[dict]:
    with open(os.path.join(work_dir, "metrics.jsonl")) as fh:
        return [r for r in map(json.loads, fh) if r["type"] == kind]


def test_resume_restores_weights_bitwise(make_tiny_pipe, tmp_path):
    """Kills: a resume that restores the counters but not the weights (or the optimizer's
    momentum).  One epoch, then --resume for the second, equals two epochs in one go."""
    straight = train(make_tiny_pipe(*SHORT, "train.epochs=2"), "teacher", str(tmp_path / "a"),
                     device="cpu", progress=False)
    wd = str(tmp_path / "b")
    train(make_tiny_pipe(*SHORT, "train.epochs=1"), "teacher", wd, device="cpu", progress=False)
    after_one = _params(os.path.join(wd, "epoch_1.pth"))
    resumed = train(make_tiny_pipe(*SHORT, "train.epochs=2"), "teacher", wd, resume=True,
                    device="cpu", progress=False)
    a, b = _params(straight), _params(resumed)
    assert a.keys() == b.keys()
    assert any(not torch.equal(after_one[k], b[k]) for k in b), "the second epoch trained"
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["iter"] for r in _records(wd)] == [1, 2, 3, 4]
    assert [r["lr"] for r in _records(wd)] == [r["lr"] for r in _records(str(tmp_path / "a"))]


def test_init_loads_the_checkpoint_before_the_first_step(make_tiny_pipe, tmp_path):
    """``train(init_from=...)`` (``ldpipe train --init``): with warm-up from lr 0 the first
    step leaves the parameters as they were, so after it they equal the checkpoint's."""
    pipe = make_tiny_pipe(*SHORT, "train.epochs=1", "train.max_iters_per_epoch=1",
                          "train.warmup_ratio=0.0")
    torch.manual_seed(123)  # not the training seed: its own initialisation differs
    init = build_model(pipe.model("teacher"), 4)
    with torch.no_grad():
        for p in init.parameters():
            p.add_(0.01)
    ckpt = str(tmp_path / "init.pth")
    save_checkpoint(ckpt, init, {})
    out = train(pipe, "teacher", str(tmp_path / "w"), device="cpu", init_from=ckpt, progress=False)
    assert [r["lr"] for r in _records(str(tmp_path / "w"))] == [0.0]
    got = _params(out)
    for name, p in init.named_parameters():
        assert torch.equal(got[name], p.detach()), name
    plain = _params(train(pipe, "teacher", str(tmp_path / "p"), device="cpu", progress=False))
    assert not torch.equal(plain["bbox_head.gfl_cls.weight"], got["bbox_head.gfl_cls.weight"])


def test_init_from_the_cli(make_tiny_pipe, tiny_overrides, tmp_path):
    torch.manual_seed(7)
    init = build_model(make_tiny_pipe().model("teacher"), 4)
    ckpt = str(tmp_path / "init.pth")
    save_checkpoint(ckpt, init, {})
    over = [a for kv in (*tiny_overrides, *SHORT, "train.epochs=1", "train.max_iters_per_epoch=1",
                         "train.warmup_ratio=0.0") for a in ("-o", kv)]
    res = CliRunner().invoke(cli, ["train", DEMO_PIPELINE, "--model", "teacher", "--init", ckpt,
                                   "--work-dir", str(tmp_path / "w"), "--device", "cpu", *over])
    assert res.exit_code == 0, res.output
    got = _params(str(tmp_path / "w" / "latest.pth"))
    assert all(torch.equal(got[n], p.detach()) for n, p in init.named_parameters())


@pytest.fixture(scope="module")
def fp32_cache(make_tiny_pipe, tiny_teacher_ckpt, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("paths-cache") / "c")
    dump_teacher(make_tiny_pipe("cache.codec=fp32", *STUDENT), "teacher", tiny_teacher_ckpt, path,
                 device="cpu", progress=False)
    return path


LOSSES = ("loss_cls", "loss_bbox", "loss_dfl", "loss_ld", "loss_ld_vlr", "loss_kd")


def test_loader_workers_read_the_cache(make_tiny_pipe, fp32_cache, tmp_path):
    """train-student with 2 DataLoader workers (each opens the cache itself) logs the same
    losses, step for step, as with the loader in the main process."""
    runs = {}
    for workers in (0, 2):
        wd = str(tmp_path / f"w{workers}")
        pipe = make_tiny_pipe(*STUDENT, *SHORT, "train.epochs=1", f"train.workers={workers}")
        train_student(pipe, "student", wd, cache=fp32_cache, device="cpu", progress=False)
        runs[workers] = _records(wd)
    assert len(runs[0]) == len(runs[2]) == 2
    for r0, r2 in zip(runs[0], runs[2]):
        assert r0["loss_ld"] > 0 and r0["loss_ld_vlr"] > 0 and r0["loss_kd"] > 0
        for k in LOSSES:
            assert r2[k] == pytest.approx(r0[k], rel=1e-5, abs=1e-7), k


def test_online_teacher_from_the_cli(make_tiny_pipe, tiny_overrides, tiny_teacher_ckpt, fp32_cache,
                                     tmp_path):
    """``ldpipe train-student --online-teacher CKPT`` runs the teacher every step: its first
    step's losses equal those from the fp32 cache of the same teacher (one padded shape, so
    the teacher sees the same input), and the checkpoint names the online teacher."""
    over = [a for kv in (*tiny_overrides, *STUDENT, *SHORT, "train.epochs=1",
                         "train.max_iters_per_epoch=1", "cache.codec=fp32") for a in ("-o", kv)]
    runner = CliRunner()
    base = ["train-student", DEMO_PIPELINE, "--device", "cpu"]
    on, off = str(tmp_path / "online"), str(tmp_path / "cached")
    res = runner.invoke(cli, [*base, "--online-teacher", tiny_teacher_ckpt, "--work-dir", on, *over])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, [*base, "--cache", fp32_cache, "--work-dir", off, *over])
    assert res.exit_code == 0, res.output
    (a,), (b,) = _records(on), _records(off)
    assert a["loss_ld"] > 0 and a["loss_ld_vlr"] > 0 and a["loss_kd"] > 0
    for k in LOSSES:
        assert a[k] == pytest.approx(b[k], rel=1e-5), k
    lineage = load_file(os.path.join(on, "latest.pth"))["meta"]["ldpipe"]["lineage"]
    assert lineage["online_teacher"]["sha256"] == file_sha256(tiny_teacher_ckpt)
    assert lineage["online_teacher"]["model"] == "teacher"
    res = runner.invoke(cli, [*base, "--online-teacher", tiny_teacher_ckpt, "--cache", fp32_cache,
                              "--work-dir", str(tmp_path / "both"), *over])
    assert res.exit_code != 0 and "--online-teacher" in res.output
