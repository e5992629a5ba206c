"""``ldpipe eval`` under torchrun: the ranks share the images, rank 0 evaluates them once, and
the metrics and detections are those of one process (gloo on the CPU)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np

from helpers import DEMO_PIPELINE, REPO


def test_eval_batches_share_the_one_process_batches():
    from ldpipe.engine.infer import eval_batches
    one = eval_batches(12, 5)
    assert [[i for i, _ in b] for b in one] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]]
    for world in (2, 3, 4):
        shares = [eval_batches(12, 5, rank, world) for rank in range(world)]
        assert sorted((b for s in shares for b in s), key=lambda b: b[0]) == one
    assert eval_batches(12, 5, 3, 4) == [] and eval_batches(0, 4) == []


def test_coco_metrics_do_not_depend_on_the_image_order(make_tiny_pipe):
    """The gathered detections are put back in split order anyway; the COCO evaluation would
    not mind another image order either (it groups detections by image id)."""
    from ldpipe.data import load_split
    from ldpipe.metrics import evaluate
    split = load_split(make_tiny_pipe().data, "val")
    rng = np.random.default_rng(0)
    dets = []
    for r in split.records:
        n = len(r.boxes)
        dets.append({"image_id": r.image_id,
                     "boxes": (r.boxes + rng.normal(0, 2, (n, 4))).astype(np.float32),
                     "scores": rng.uniform(0.1, 1, n).astype(np.float32),
                     "labels": r.labels.copy()})
    forward = evaluate(split.records, split.classes, dets, coco_json=split.coco_json)
    backward = evaluate(split.records, split.classes, dets[::-1], coco_json=split.coco_json)
    assert forward["bbox_mAP"] > 0 and forward == backward


def _free_port() -> int:
    with socket.socket() as sock:  # a free port now, not a fixed one another run may hold
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_torchrun_eval_equals_one_process(synth_root, make_tiny_pipe, tiny_overrides,
                                          trained_tiny_teacher, tmp_path):
    """12 images in batches of 5: rank 0 gets 7 images (batches 0 and 2), rank 1 gets 5, one of
    them undecodable (skipped, so it is gathered from rank 1 too)."""
    from ldpipe.data import load_split
    root = tmp_path / "synth"
    shutil.copytree(synth_root, root)
    # the trained teacher's own training images: an AP well above 0 to compare
    extra = (f"data.root={root}", "data.val=annotations/train.json", "data.val_images=images/train",
             "data.skip_undecodable_images=true")
    bad = load_split(make_tiny_pipe(*extra).data, "val").records[6].file_name
    with open(bad, "wb") as fh:
        fh.write(b"not an image")
    o = [a for kv in (*tiny_overrides, *extra) for a in ("-o", kv)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # what torchrun gives each rank

    def run(launcher: list[str], tag: str) -> tuple[dict, list, str]:
        out, res = tmp_path / f"{tag}.json", tmp_path / f"{tag}-results.json"
        args = ["eval", DEMO_PIPELINE, "--model", "teacher", "--checkpoint", trained_tiny_teacher,
                "--device", "cpu", "--batch-size", "5", "--out", str(out), "--results", str(res)]
        proc = subprocess.run([*launcher, "-m", "ldpipe", *args, *o], cwd=REPO,
                              capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return json.load(open(out)), json.load(open(res)), proc.stdout

    one, one_dets, _ = run([sys.executable], "one")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                f"--master_port={_free_port()}"]
    two, two_dets, stdout = run(torchrun, "two")
    assert one["skipped_images"] == 1 and one["bbox_mAP"] > 0
    assert two == one
    assert two_dets == one_dets and len(one_dets) > 0  # the same detections, in the same order
    assert stdout.count("bbox_mAP:") == 1  # only rank 0 prints the table
