"""End to end through the command line: synth -> train -> eval, LD from a cache, DDP with torchrun."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from helpers import TINY_KVS as TINY

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(ROOT, "pipelines", "demo.toml")


def ldpipe(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "ldpipe", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise AssertionError(f"ldpipe {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def overrides(data: str, *extra: str) -> list[str]:
    out = [f"data.root={data}", "train.workers=0", "data.train_scales=[[160, 160]]",
           "data.test_scale=[160, 160]", "train.batch_size=4", "train.warmup_iters=5",
           "train.log_interval=1", "cache.samples_per_shard=8"]
    for model in ("teacher", "ta", "student"):
        out += [f"models.{model}.{kv}" for kv in TINY]
    out += list(extra)
    return [a for kv in out for a in ("-o", kv)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e") / "synth"
    ldpipe("data", "synth", str(root), "--train", "16", "--val", "8", "--seed", "1")
    return str(root)


def test_train_loss_falls_and_ap_positive(data, tmp_path):
    """Overfit 16 images: the loss falls and evaluation on them finds objects (AP > 0)."""
    wd = tmp_path / "w"
    train_on_train = ["data.val=annotations/train.json", "data.val_images=images/train"]
    ldpipe("train", DEMO, "--model", "student", "--work-dir", str(wd),
           *overrides(data, "train.epochs=24", "train.lr=0.02", "train.steps=[20]", "train.keep_checkpoints=2",
                      "models.student.train={}", *train_on_train))
    epochs = [json.loads(x) for x in open(wd / "metrics.jsonl") if '"epoch"' in x and '"type": "epoch"' in x]
    assert len(epochs) == 24
    assert epochs[-1]["loss"] < 0.7 * epochs[0]["loss"], [e["loss"] for e in epochs]
    assert os.path.realpath(wd / "latest.pth").endswith("epoch_24.pth")
    assert sorted(p.name for p in wd.glob("epoch_*.pth")) == ["epoch_23.pth", "epoch_24.pth"]
    out = tmp_path / "m.json"
    ldpipe("eval", DEMO, "--model", "student", "--checkpoint", str(wd / "latest.pth"),
           "--out", str(out), *overrides(data, *train_on_train))
    metrics = json.load(open(out))
    assert metrics["bbox_mAP"] > 0 and metrics["bbox_mAP_50"] > 0


def test_resume_continues_the_run(data, tmp_path):
    wd = tmp_path / "w"
    args = ["train", DEMO, "--model", "student", "--work-dir", str(wd)]
    ldpipe(*args, *overrides(data, "train.epochs=1", "train.max_iters_per_epoch=2"))
    ldpipe(*args, "--resume", *overrides(data, "train.epochs=2", "train.max_iters_per_epoch=2"))
    epochs = [json.loads(x) for x in open(wd / "metrics.jsonl") if '"type": "epoch"' in x]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert epochs[1]["iter"] == 4  # continued the iteration count (warm-up and schedule)


def test_distill_from_cache_without_teacher_checkpoint(data, tmp_path):
    """dump-teacher, verify, then train-student with the teacher checkpoint moved away."""
    tw, cache, sw = tmp_path / "t", str(tmp_path / "c.zarr"), tmp_path / "s"
    o = overrides(data, "train.epochs=1", "train.max_iters_per_epoch=3", "models.teacher.train={}")
    ldpipe("train", DEMO, "--model", "teacher", "--work-dir", str(tw), *o)
    ldpipe("dump-teacher", DEMO, "--model", "teacher", "--checkpoint", str(tw / "latest.pth"),
           "--out", cache, *o)
    ldpipe("cache", "verify", cache)
    shutil.move(str(tw), str(tmp_path / "elsewhere"))
    ldpipe("train-student", DEMO, "--model", "student", "--cache", cache, "--work-dir", str(sw), *o)
    last = [json.loads(x) for x in open(sw / "metrics.jsonl")][-1]
    assert last["loss_ld"] > 0 and last["loss_ld_vlr"] > 0 and last["loss_kd"] > 0
    out = tmp_path / "m.json"
    ldpipe("eval", DEMO, "--model", "student", "--checkpoint", str(sw / "latest.pth"), "--out", str(out), *o)
    assert "bbox_mAP" in json.load(open(out))


def test_ddp_two_processes_on_cpu(data, tmp_path):
    """torchrun --nproc_per_node=2 (gloo): train, dump into one store, train-student."""
    with socket.socket() as sock:  # a free port now, not a fixed one another run may hold
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                f"--master_port={port}", "-m", "ldpipe"]
    # fp32 cache: the two dumps may differ by float reassociation (other thread counts), which
    # the 8-bit codec could turn into a whole quantisation step
    o = overrides(data, "train.epochs=1", "train.max_iters_per_epoch=2", "models.teacher.train={}",
                  "cache.samples_per_shard=4", "cache.codec=fp32")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(*args):
        proc = subprocess.run([*torchrun, *args, *o], cwd=ROOT, capture_output=True, text=True,
                              timeout=600, env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    run("train", DEMO, "--model", "teacher", "--work-dir", str(tmp_path / "t"))
    ckpt = str(tmp_path / "t" / "latest.pth")
    run("dump-teacher", DEMO, "--model", "teacher", "--checkpoint", ckpt, "--out", str(tmp_path / "ddp.zarr"))
    ldpipe("dump-teacher", DEMO, "--model", "teacher", "--checkpoint", ckpt,
           "--out", str(tmp_path / "one.zarr"), *o)
    ldpipe("cache", "verify", str(tmp_path / "ddp.zarr"))
    diff = json.loads(ldpipe("cache", "diff", str(tmp_path / "ddp.zarr"), str(tmp_path / "one.zarr"),
                             "--json").stdout)
    assert diff["only_a"] == 0 and diff["only_b"] == 0 and diff["common"] > 0
    assert diff["max_abs_box"] < 1e-3  # same units and batches on each rank
    run("train-student", DEMO, "--model", "student", "--cache", str(tmp_path / "ddp.zarr"),
        "--work-dir", str(tmp_path / "s"))
    assert os.path.exists(tmp_path / "s" / "latest.pth")
