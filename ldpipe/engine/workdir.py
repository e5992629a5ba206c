"""Work dirs that never lose a run, and the provenance every run records.

A training run refuses a work dir that already holds files unless it is told what to do
with them: ``--resume`` continues the run found there, ``--overwrite`` deletes ldpipe's
outputs of that run (the fixed :data:`RUN_FILES` and the checkpoints the run recorded in its
ledger, :data:`LEDGER`; other files stay, also a user's own ``epoch_3.pth``) and starts over.
``--resume`` continues only the same run: :func:`resume_problem` names what differs.

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

#: The files every training run writes under these fixed names (``--overwrite`` deletes them).
RUN_FILES = ("latest.pth", "metrics.jsonl", "train.log", "run.json", "runs.jsonl",
             "pipeline.toml", "tensorboard", ".ldpipe-outputs")
#: Names of checkpoints a run writes (``epoch_N.pth``, ...): ``--overwrite`` and the pruning
#: delete such a file only when the run recorded writing it (:data:`LEDGER`), so a user's own
#: ``epoch_3.pth`` beside a run survives; temp files of a killed write (``NAME.tmp.PID``,
#: ``.latest.PID``) go with their recorded name.
CHECKPOINT_NAMES = ("epoch_*.pth", "iter_*.pth", "best.pth")
#: The work dir's ledger: one name per line of every checkpoint a run wrote there.
LEDGER = ".ldpipe-outputs"
RUN_OUTPUTS = RUN_FILES + CHECKPOINT_NAMES  # (what a run may write, for the docs and tests)


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


def record_output(work_dir: str, name: str) -> None:
    """Add checkpoint ``name`` to the work dir's ledger (once)."""
    if name not in recorded_outputs(work_dir):
        with open(os.path.join(work_dir, LEDGER), "a") as fh:
            fh.write(name + "\n")


def recorded_outputs(work_dir: str) -> set[str]:
    """The checkpoint names runs recorded writing into ``work_dir``."""
    try:
        with open(os.path.join(work_dir, LEDGER)) as fh:
            return {line.strip() for line in fh if line.strip()}
    except FileNotFoundError:
        return set()


def _ours(name: str, recorded: set[str]) -> bool:
    if name in RUN_FILES or name.startswith(".latest."):
        return True
    if any(fnmatch.fnmatch(name, p) for p in CHECKPOINT_NAMES):
        return name in recorded
    base, sep, pid = name.rpartition(".tmp.")
    return bool(sep) and pid.isdigit() and (base in recorded or base in RUN_FILES
                                            or any(fnmatch.fnmatch(base, p) for p in CHECKPOINT_NAMES))


def clear_run_outputs(work_dir: str) -> tuple[list[str], list[str]]:
    """Delete what earlier runs wrote into ``work_dir``: the fixed :data:`RUN_FILES` and the
    checkpoints of the ledger (and temp files of interrupted writes).  Returns the names
    deleted and the checkpoint-like names kept because no run recorded them (a user's files,
    or checkpoints of a run before the ledger existed)."""
    gone, kept = [], []
    recorded = recorded_outputs(work_dir)
    for name in sorted(os.listdir(work_dir)) if os.path.isdir(work_dir) else []:
        if not _ours(name, recorded):
            if any(fnmatch.fnmatch(name, p) for p in CHECKPOINT_NAMES):
                kept.append(name)
            continue
        path = os.path.join(work_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
        gone.append(name)
    return gone, kept


def prune_epoch_checkpoints(work_dir: str, keep: int) -> None:
    """Delete all but the newest ``keep`` recorded ``epoch_N.pth`` files."""
    recorded = recorded_outputs(work_dir)
    epochs = sorted(int(f[6:-4]) for f in os.listdir(work_dir)
                    if f.startswith("epoch_") and f.endswith(".pth") and f[6:-4].isdigit()
                    and f in recorded)
    for e in epochs[:-keep]:
        os.remove(os.path.join(work_dir, f"epoch_{e}.pth"))


def remove_iter_checkpoints(work_dir: str, keep: str) -> None:
    """Delete recorded ``iter_N.pth`` files other than ``keep`` (they only serve to resume)."""
    recorded = recorded_outputs(work_dir)
    for f in os.listdir(work_dir):
        if f.startswith("iter_") and f.endswith(".pth") and f != keep and f in recorded:
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


def run_identity(meta: dict) -> dict:
    """What makes a checkpoint's run *that* run (from its ``meta['ldpipe']``): its kind
    (``train`` / ``train-student``), model, pipeline file and teacher (cache id or online
    teacher checkpoint hash)."""
    own = meta.get("ldpipe") or {}
    lineage = own.get("lineage") or {}
    cwd = (own.get("provenance") or {}).get("cwd") or os.getcwd()
    src = own.get("pipeline") or ""
    teacher = ((lineage.get("cache") or {}).get("cache_id")
               or (lineage.get("online_teacher") or {}).get("sha256"))
    kind = "train-student" if ("cache" in lineage or "online_teacher" in lineage) else "train"
    return {"kind": kind, "model": own.get("model"),
            "pipeline": os.path.realpath(os.path.join(cwd, src)) if src else "",
            "teacher": teacher}


def resume_problem(recorded: dict, ours: dict, path: str) -> str | None:
    """Why ``--resume`` from checkpoint ``path`` (its meta ``recorded``) would continue another
    run than the one asked for (meta ``ours``), or None."""
    a, b = run_identity(recorded), run_identity(ours)
    diff = [f"{k}: recorded {a[k]!r}, now {b[k]!r}" for k in ("kind", "model", "pipeline", "teacher")
            if a[k] != b[k]]
    if not diff:
        return None
    return (f"--resume: {path} is another run ({'; '.join(diff)}); resume it with the command "
            "that started it, choose another --work-dir, or pass --resume-anyway to continue "
            "it as this run")
