"""Work dirs that never lose a run, and the provenance every run records.

A training run refuses a work dir that already holds files unless it is told what to do
with them: ``--resume`` continues the run found there, ``--overwrite`` deletes ldpipe's
outputs of that run (:data:`RUN_OUTPUTS`; other files stay) and starts over.

Every run writes into its work dir ``pipeline.toml`` (the resolved pipeline, loadable as a
pipeline file), ``run.json`` (this invocation's :func:`provenance`) and appends the same
record to ``runs.jsonl`` (every invocation, resumes included); the provenance also goes into
each checkpoint's ``meta['ldpipe']['provenance']`` (plain types only, so the checkpoint
stays loadable with ``torch.load(weights_only=True)``).
"""
from __future__ import annotations

import fnmatch
import json
import os
import shutil
import sys
import time

from ..config import Pipeline
from ..config.resolve import resolved_dict, to_toml
from ..files import atomic_write
from ..models.checkpoint import CheckpointError
from ..provenance import git_state, versions

#: What a training run writes into its work dir (``--overwrite`` deletes exactly these).
RUN_OUTPUTS = ("latest.pth", "epoch_*.pth", "iter_*.pth", "best.pth", ".latest.*", "*.pth.tmp.*",
               "metrics.jsonl", "train.log", "run.json", "runs.jsonl", "pipeline.toml",
               "tensorboard")


class WorkDirError(CheckpointError):
    """A work dir that holds an earlier run, without --resume or --overwrite."""


def check_work_dir(work_dir: str, resume: bool, overwrite: bool) -> None:
    """Refuse a non-empty ``work_dir`` unless ``resume`` or ``overwrite`` (read-only: every
    rank calls it before any rank writes)."""
    if resume and overwrite:
        raise WorkDirError(f"{work_dir}: --resume continues the run there and --overwrite "
                           "replaces it; give one of them")
    if resume or overwrite or not os.path.isdir(work_dir):
        return
    entries = sorted(os.listdir(work_dir))
    if entries:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise WorkDirError(f"{work_dir} is not empty ({len(entries)} entries: {shown}); pass "
                           "--resume to continue that run, --overwrite to replace it, or "
                           "choose another --work-dir")


def clear_run_outputs(work_dir: str) -> list[str]:
    """Delete what an earlier run wrote into ``work_dir`` (:data:`RUN_OUTPUTS`); returns the
    names deleted."""
    gone = []
    for name in sorted(os.listdir(work_dir)) if os.path.isdir(work_dir) else []:
        if any(fnmatch.fnmatch(name, pattern) for pattern in RUN_OUTPUTS):
            path = os.path.join(work_dir, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
            gone.append(name)
    return gone


def prune_epoch_checkpoints(work_dir: str, keep: int) -> None:
    """Delete all but the newest ``keep`` ``epoch_N.pth`` files (also those of earlier runs)."""
    epochs = sorted(int(f[6:-4]) for f in os.listdir(work_dir)
                    if f.startswith("epoch_") and f.endswith(".pth") and f[6:-4].isdigit())
    for e in epochs[:-keep]:
        os.remove(os.path.join(work_dir, f"epoch_{e}.pth"))


def remove_iter_checkpoints(work_dir: str, keep: str) -> None:
    """Delete ``iter_N.pth`` files other than ``keep`` (they only serve to resume)."""
    for f in os.listdir(work_dir):
        if f.startswith("iter_") and f.endswith(".pth") and f != keep:
            os.remove(os.path.join(work_dir, f))


def trim_metrics(path: str, last_iter: int) -> int:
    """Drop the records of iterations after ``last_iter`` from ``metrics.jsonl`` (a resumed run
    redoes them); returns how many were dropped."""
    if not os.path.exists(path):
        return 0
    with open(path) as fh:
        lines = [line for line in fh if line.strip()]
    keep = [line for line in lines if json.loads(line).get("iter", 0) <= last_iter]
    if len(keep) != len(lines):
        atomic_write(path, "".join(keep))
    return len(lines) - len(keep)


def val_records(path: str, model_name: str) -> list[dict]:
    """The validation records of ``model_name`` in ``metrics.jsonl`` (none if it is absent)."""
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    return [r for r in records if r.get("type") == "val" and r.get("model") == model_name]


# ---------------------------------------------------------------------- provenance
def provenance(pipe: Pipeline, command: list[str] | None = None) -> dict:
    """What a run needs to be reproduced: resolved pipeline, command line, versions, git."""
    return {
        "command": list(command) if command is not None else list(sys.argv),
        "cwd": os.getcwd(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "pipeline_files": [pipe.source, *pipe.bases],
        "overridden": list(pipe.overridden),
        "versions": versions(("torch", "torchvision", "zarr", "numpy")),
        "git": git_state(),
        "pipeline": resolved_dict(pipe),
    }


def write_run_files(work_dir: str, pipe: Pipeline, record: dict) -> None:
    """``pipeline.toml``, ``run.json`` and a line of ``runs.jsonl`` in ``work_dir``."""
    header = (f"# resolved pipeline of {pipe.source} (command: {' '.join(record['command'])})\n\n")
    atomic_write(os.path.join(work_dir, "pipeline.toml"), header + to_toml(record["pipeline"]))
    atomic_write(os.path.join(work_dir, "run.json"), json.dumps(record, indent=2) + "\n")
    with open(os.path.join(work_dir, "runs.jsonl"), "a") as fh:
        fh.write(json.dumps(record) + "\n")
