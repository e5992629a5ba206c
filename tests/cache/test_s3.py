"""The cache on an object store, for real: moto's S3 server on loopback, s3fs, ``s3://`` URLs.

One server per module (``ThreadedMotoServer`` on a free port); dummy credentials and
``AWS_ENDPOINT_URL`` through the environment, exactly as a user points ldpipe at MinIO or
another S3-compatible store (README: "Caches on S3").  Covered: a 1-rank dump, a 2-rank
torchrun dump, a dump killed mid-way and resumed to the same bits (S3 has no rename: a unit
is visible only once its commit object exists), ``cache verify`` and ``cache info`` (which
must not list every object of the store) and ``train-student`` reading the S3 cache.
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install '.[s3]')")
pytest.importorskip("s3fs", reason="s3fs is not installed (pip install '.[s3]')")
boto3 = pytest.importorskip("boto3", reason="boto3 (with moto) is not installed (pip install '.[s3]')")

from ldpipe.cache.diff import diff  # noqa: E402
from ldpipe.cache.info import info  # noqa: E402
from ldpipe.cache.store import committed_units, open_root  # noqa: E402
from ldpipe.cache.verify import verify  # noqa: E402
from ldpipe.cli import main as cli  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEMO_PIPELINE = str(REPO / "pipelines" / "demo.toml")
BUCKET = "ldpipe-ci"
SETTINGS = ("cache.samples_per_shard=2", "cache.batch_size=2", "cache.codec=fp32")  # 12 units
NUM_SAMPLES = 24  # 12 synthetic train images x 2 variants


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RequestLog(logging.Handler):
    """The S3 requests the server answered (werkzeug's access log lines)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    from moto.server import ThreadedMotoServer
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    log = RequestLog()
    logging.getLogger("werkzeug").addHandler(log)
    logging.getLogger("werkzeug").setLevel(logging.INFO)
    try:
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield {"env": {**os.environ, **env}, "log": log, "client": boto3.client("s3")}
    finally:
        logging.getLogger("werkzeug").removeHandler(log)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def _overrides(tiny_overrides) -> list[str]:
    out = []
    for o in (*tiny_overrides, *SETTINGS):
        out += ["-o", o]
    return out


def _dump_args(tiny_overrides, ckpt: str, url: str) -> list[str]:
    return ["dump-teacher", DEMO_PIPELINE, "--checkpoint", ckpt, "--out", url, "--device", "cpu",
            *_overrides(tiny_overrides)]


def _commits_on_s3(client, prefix: str) -> int:
    listing = client.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/units/")
    n = 0
    for obj in listing.get("Contents", []):
        if obj["Key"].endswith("/zarr.json") and obj["Key"].count("/") == 3:
            n += b'"commit"' in client.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read()
    return n


@pytest.fixture(scope="module")
def one_rank(s3, tiny_overrides, tiny_teacher_ckpt) -> str:
    url = f"s3://{BUCKET}/one.zarr"
    res = CliRunner().invoke(cli, _dump_args(tiny_overrides, tiny_teacher_ckpt, url))
    assert res.exit_code == 0, res.output
    return url


def test_one_rank_dump_verify_and_info(s3, one_rank):
    report = verify(one_rank)
    assert report["ok"], report["errors"]
    assert report["checked"]["samples"] == NUM_SAMPLES and report["checked"]["units"] == 12
    res = CliRunner().invoke(cli, ["cache", "verify", one_rank])
    assert res.exit_code == 0 and "OK" in res.output, res.output
    res = CliRunner().invoke(cli, ["cache", "info", one_rank, "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["complete"] and d["samples_committed"] == NUM_SAMPLES and d["stored_bytes"] > 0
    # nothing was stored through a rename: no temporary objects exist on the store
    keys = [o["Key"] for o in s3["client"].list_objects_v2(Bucket=BUCKET, Prefix="one.zarr/")["Contents"]]
    assert keys and not [k for k in keys if k.endswith(".partial")]


def test_info_does_not_list_every_object(s3, one_rank):
    """On an object store ``info`` lists only the metadata, ``index/`` and a few units."""
    exact = info(one_rank)  # 12 units <= the 32 it sizes: every unit listed, exact sizes
    s3["log"].lines.clear()
    d = info(one_rank, size_units=3)
    lists = [ln for ln in s3["log"].lines if "list-type=2" in ln]
    # a listing without a "/" delimiter (s3fs sends an empty one) enumerates every object below
    # its prefix: allowed only below index/ and the units being sized ("/"-delimited ones are
    # existence checks of one level)
    recursive = [ln for ln in lists if not re.search(r"delimiter=(/|%2F)", ln)]
    assert recursive, lists
    assert all(re.search(r"prefix=one\.zarr/(index|units/\d{6})", ln) for ln in recursive), recursive
    sized = {re.search(r"units/(\d{6})", ln).group(1) for ln in recursive if "/units/" in ln}
    assert 1 <= len(sized) <= 3, sized
    assert d["stored_bytes_exact"] is False and d["stored_bytes_units_listed"] == 3
    assert exact["stored_bytes_exact"] is True
    # the estimate (3 units scaled by rows) is close to the exact sum
    assert abs(d["stored_bytes"] - exact["stored_bytes"]) < 0.25 * exact["stored_bytes"]
    assert d["units_committed"] == 12 and d["complete"]


def _gets(log, part: str) -> list[str]:
    """GET requests below ``part`` in the server's log (206 lines come colour-coded)."""
    return [ln for ln in log.lines if re.search(rf"GET /\S*{part}", ln)]


def test_a_sample_read_from_s3_is_one_get_per_array(s3, one_rank):
    """Once a unit is open (its shard indexes read), a sample costs one ranged GET per value
    array and nothing else - also with the shard bindings the dump commits, which are checked
    on the bytes those GETs return (tests/test_binding.py)."""
    from ldpipe.cache import CacheReader

    assert sorted(open_root(one_rank)["units/000005"].attrs["commit"]["shards"]) == \
        ["anchor", "box", "cls", "samples", "scale"]
    reader = CacheReader(one_rank, preload_bytes=0)
    reader.read(5, 0)  # opens the cache and unit 5 (samples 10, 11), reads its shard indexes
    s3["log"].lines.clear()
    reader.read(5, 1)
    arrays = sorted(re.search(r"/units/\d{6}/(\w+)/c/", ln).group(1) for ln in _gets(s3["log"], "/units/"))
    assert arrays == ["anchor", "box", "cls"], s3["log"].lines
    assert not [ln for ln in s3["log"].lines if "HEAD /" in ln or "list-type" in ln], s3["log"].lines


def test_row_range_on_s3_is_one_get_where_zarr_makes_one_per_chunk(s3):
    """A row range spanning several inner chunks: one GET for ``ShardRows`` (index kept),
    the index plus one GET per chunk for zarr's slice; the same values."""
    import numpy as np
    import torch
    import zarr

    from ldpipe.cache.shards import shard_rows
    from ldpipe.cache.store import SampleRows, assemble_unit, write_unit
    g = torch.Generator().manual_seed(0)
    meta = {"index": 0, "image_id": 1, "img_shape": (64, 64), "pad_shape": (64, 64),
            "ori_shape": (64, 64), "flip": False, "scale_factor": (1.0, 1.0)}
    rows = SampleRows(0, meta, torch.arange(60, dtype=torch.int32),
                      torch.log_softmax(torch.randn(60, 4, 17, generator=g), -1), None)
    root = zarr.open_group(f"s3://{BUCKET}/rows.zarr", mode="w", zarr_format=3)
    write_unit(root, 0, assemble_unit([rows], "int8", 2), "zstd", 8)
    box = root["units/000000/box"]
    fast = shard_rows(box, 2, "rows.zarr: units/000000/box")
    fast.index()
    s3["log"].lines.clear()
    got = fast.rows(3, 30)  # chunks 0-3 of 8 rows
    assert len(_gets(s3["log"], "/units/000000/box/c/")) == 1, s3["log"].lines
    s3["log"].lines.clear()
    want = box[..., 3:30]
    assert len(_gets(s3["log"], "/units/000000/box/c/")) >= 5, s3["log"].lines  # index + 4 chunks
    assert np.array_equal(got, want)


def test_a_shard_copied_between_units_on_s3_is_refused(s3):
    """The shard binding on an object store: unit 1's box shard overwritten by unit 0's (the
    same 8 chunks, other values; a server-side copy) is refused when read, naming unit and array."""
    import torch
    import zarr

    from ldpipe.cache import CacheError
    from ldpipe.cache.integrity import commit_bindings
    from ldpipe.cache.shards import shard_rows
    from ldpipe.cache.store import SampleRows, assemble_unit, write_unit
    url = f"s3://{BUCKET}/bound.zarr"
    root = zarr.open_group(url, mode="w", zarr_format=3)
    meta = {"index": 0, "image_id": 1, "img_shape": (64, 64), "pad_shape": (64, 64),
            "ori_shape": (64, 64), "flip": False, "scale_factor": (1.0, 1.0)}
    for u in (0, 1):
        g = torch.Generator().manual_seed(u)
        rows = SampleRows(u, meta, torch.arange(60, dtype=torch.int32),
                          torch.log_softmax(torch.randn(60, 4, 17, generator=g), -1), None)
        write_unit(root, u, assemble_unit([rows], "int8", 2), "zstd", 8, bind=True)
    key = "bound.zarr/units/{:06d}/box/c/0/0/0"
    s3["client"].copy_object(Bucket=BUCKET, Key=key.format(1), CopySource={"Bucket": BUCKET, "Key": key.format(0)})
    g = open_root(url)["units/000001"]
    binding = commit_bindings(g.attrs["commit"], url, 1)["box"]
    fast = shard_rows(g["box"], 2, f"{url}: units/000001/box", binding)
    with pytest.raises(CacheError, match=r"bound\.zarr: units/000001/box: (the shard index|chunk \d) of c/0/0/0 "
                                         r"is not the one its unit's commit records"):
        fast.rows(3, 30)


@pytest.mark.slow
def test_killed_dump_on_s3_resumes_to_the_same_bits(s3, one_rank, tiny_overrides, tiny_teacher_ckpt):
    url = f"s3://{BUCKET}/killed.zarr"
    env = {**s3["env"], "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "ldpipe", *_dump_args(tiny_overrides, tiny_teacher_ckpt, url)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while _commits_on_s3(s3["client"], "killed.zarr") == 0:
            assert proc.poll() is None, "the dump ended before committing a unit"
            assert time.time() < deadline, "no unit committed in time"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    done = committed_units(open_root(url))
    assert 1 <= len(done) < 12, "the kill came too late to test anything"
    interrupted = verify(url)
    assert not interrupted["ok"] and any("no commit" in e for e in interrupted["errors"])

    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert json.loads(rerun.stdout.strip().splitlines()[-1])["rank_images"] == NUM_SAMPLES - 2 * len(done)
    report = verify(url)
    assert report["ok"], report["errors"]
    d = diff(url, one_rank)
    assert d["common"] == d["samples_a"] == d["samples_b"] == NUM_SAMPLES
    assert d["only_a"] == d["only_b"] == 0 and d["anchor_set_mismatches"] == 0
    assert d["max_abs_box"] == 0 and d["max_abs_cls"] == 0 and d["mean_kl"] == 0


@pytest.mark.slow
def test_two_rank_dump_on_s3_then_train_student(s3, one_rank, tiny_overrides, tiny_teacher_ckpt, tmp_path):
    url = f"s3://{BUCKET}/ddp.zarr"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                f"--master_port={_free_port()}", "-m", "ldpipe"]
    env = {**s3["env"], "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*torchrun, *_dump_args(tiny_overrides, tiny_teacher_ckpt, url)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = verify(url)
    assert report["ok"], report["errors"]
    d = diff(url, one_rank)
    assert d["only_a"] == d["only_b"] == 0 and d["common"] == NUM_SAMPLES
    assert d["max_abs_box"] < 1e-3  # fp32; other thread counts reassociate sums

    work = tmp_path / "student"
    res = CliRunner().invoke(cli, ["train-student", DEMO_PIPELINE, "--model", "student", "--cache", url,
                                   "--work-dir", str(work), "--device", "cpu",
                                   *_overrides(tiny_overrides), "-o", "train.epochs=1",
                                   "-o", "train.max_iters_per_epoch=2"])
    assert res.exit_code == 0, res.output
    assert (work / "latest.pth").exists()
