"""``ldpipe chain``: teacher -> (TA ...) -> student from one pipeline file.

The stages are ordinary ``ldpipe`` invocations (``train``, ``dump-teacher``,
``train-student``, ``eval``), run in this process through the same command
line parser and printed, so any one can be rerun by hand.  Each stage has a
stamp under ``WORK_DIR/.chain/`` holding the hash of its inputs: the pipeline
sections it reads, the sha256 of the checkpoint and the id of the cache it
consumes.  A stage whose stamp matches and whose outputs exist is skipped;
a changed input reruns that stage and, through the new checkpoint hash or
cache id, everything downstream.  A stage that was interrupted resumes
(training continues from its last epoch; a dump finishes its missing units)
as long as its inputs are unchanged, and starts clean otherwise.

``[chain]`` keys (all optional)::

    teacher = "teacher"     # root teacher model; trained unless models.<name>.checkpoint is set
    tas = ["ta"]            # teacher assistants, in order (each trained from the previous cache)
    student = "student"
    baseline = true         # also train the student without distillation
    eval_split = "val"
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .cache import CacheReader
from .cache.region import reader_assigners
from .config import ConfigError, Pipeline, to_dict
from .models.checkpoint import file_sha256

log = logging.getLogger("ldpipe.chain")

CHAIN_KEYS = {"teacher", "tas", "student", "baseline", "eval_split"}


@dataclass
class ChainPlan:
    teacher: str
    tas: list[str]
    student: str
    baseline: bool
    eval_split: str


def plan_of(pipe: Pipeline) -> ChainPlan:
    c = dict(pipe.chain)
    unknown = set(c) - CHAIN_KEYS
    if unknown:
        raise ConfigError(f"{pipe.source}: unknown key(s) in [chain]: {sorted(unknown)}")
    tas = c.get("tas", ["ta"] if "ta" in pipe.models else [])
    plan = ChainPlan(c.get("teacher", "teacher"), list(tas), c.get("student", "student"),
                     bool(c.get("baseline", True)), c.get("eval_split", "val"))
    for name in [plan.teacher, *plan.tas, plan.student]:
        pipe.model(name)  # names a missing model clearly
    return plan


@dataclass
class Stage:
    name: str
    argv: list[str]
    inputs: dict
    outputs: list[str]
    work_dir: str | None = None  # wiped when the stage restarts with other inputs
    extra: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        blob = json.dumps(self.inputs, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


class Chain:
    """The stages of one pipeline's chain.  ``run_argv`` runs one ``ldpipe`` command line
    (a list of arguments, as typed after ``ldpipe``); the CLI passes its own entry point."""

    def __init__(self, pipeline_path: str, overrides: tuple[str, ...], pipe: Pipeline,
                 work_dir: str, run_argv: Callable[[list[str]], object], device: str | None = None,
                 echo=print) -> None:
        self.path, self.overrides, self.pipe = pipeline_path, tuple(overrides), pipe
        self.run_argv = run_argv
        self.work_dir = work_dir
        self.device = device
        self.echo = echo
        self.plan = plan_of(pipe)
        self.stamps = os.path.join(work_dir, ".chain")
        os.makedirs(self.stamps, exist_ok=True)
        self.ran: list[str] = []
        self.skipped: list[str] = []

    # ------------------------------------------------------------ helpers
    def _sections(self, model: str, *, schedule: bool = True) -> dict:
        p = self.pipe
        out = {"model": to_dict(p.model(model)), "data": to_dict(p.data)}
        if schedule:
            out["train"] = to_dict(p.train_for(model))
        return out

    def _common(self) -> list[str]:
        args = [self.path]
        for o in self.overrides:
            args += ["-o", o]
        if self.device:
            args += ["--device", self.device]
        return args

    def _stamp_path(self, stage: Stage, kind: str) -> str:
        return os.path.join(self.stamps, f"{stage.name}.{kind}.json")

    def _read(self, path: str) -> dict | None:
        try:
            with open(path) as fh:
                return json.load(fh)
        except (OSError, ValueError):
            return None

    def _write(self, path: str, obj: dict) -> None:
        tmp = path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=2, sort_keys=True)
        os.replace(tmp, path)

    def run_stage(self, stage: Stage) -> None:
        done = self._read(self._stamp_path(stage, "done"))
        if done and done.get("key") == stage.key and all(os.path.exists(o) for o in stage.outputs):
            self.skipped.append(stage.name)
            self.echo(f"[chain] skip {stage.name} (inputs unchanged)")
            return
        started = self._read(self._stamp_path(stage, "started"))
        fresh = not (started and started.get("key") == stage.key)
        argv = list(stage.argv)
        if fresh and stage.work_dir and os.path.exists(stage.work_dir):
            shutil.rmtree(stage.work_dir) if os.path.isdir(stage.work_dir) else os.remove(stage.work_dir)
        if fresh and stage.extra.get("overwrite_flag"):
            argv.append("--overwrite")
        self._write(self._stamp_path(stage, "started"), {"key": stage.key, "inputs": stage.inputs})
        self.echo(f"[chain] run {stage.name}: ldpipe {' '.join(argv)}")
        t0 = time.time()
        self.run_argv(argv)
        self._write(self._stamp_path(stage, "done"),
                    {"key": stage.key, "inputs": stage.inputs, "seconds": round(time.time() - t0, 2)})
        self.ran.append(stage.name)

    # ------------------------------------------------------------ stages
    def _ckpt_sha(self, path: str) -> str:
        return file_sha256(path) if os.path.exists(path) else "missing"

    def _cache_id(self, url: str) -> str:
        try:
            return CacheReader(url).manifest.cache_id
        except Exception:
            return "missing"

    def train_stage(self, model: str, cache: str | None, tag: str) -> str:
        wd = os.path.join(self.work_dir, tag)
        inputs = self._sections(model)
        if cache is None:
            argv = ["train", *self._common(), "--model", model, "--work-dir", wd, "--resume"]
        else:
            inputs["distill"] = to_dict(self.pipe.distill)
            inputs["cache_id"] = self._cache_id(cache)
            argv = ["train-student", *self._common(), "--model", model, "--cache", cache,
                    "--work-dir", wd, "--resume"]
        ckpt = os.path.join(wd, "latest.pth")
        self.run_stage(Stage(f"train-{tag}", argv, inputs, [ckpt], work_dir=wd))
        return ckpt

    def eval_stage(self, model: str, ckpt: str, tag: str) -> str:
        out = os.path.join(self.work_dir, tag, "metrics.json")
        inputs = {"checkpoint": self._ckpt_sha(ckpt), "test": to_dict(self.pipe.model(model).test),
                  "data": to_dict(self.pipe.data), "split": self.plan.eval_split}
        argv = ["eval", *self._common(), "--model", model, "--checkpoint", ckpt,
                "--split", self.plan.eval_split, "--out", out]
        self.run_stage(Stage(f"eval-{tag}", argv, inputs, [out]))
        return out

    def dump_stage(self, model: str, ckpt: str, tag: str) -> str:
        out = os.path.join(self.work_dir, "caches", f"{tag}.zarr")
        inputs = {"checkpoint": self._ckpt_sha(ckpt), "cache": to_dict(self.pipe.cache),
                  "data": to_dict(self.pipe.data), "model": to_dict(self.pipe.model(model)),
                  "readers": reader_assigners(self.pipe, model)}
        argv = ["dump-teacher", *self._common(), "--model", model, "--checkpoint", ckpt, "--out", out]
        self.run_stage(Stage(f"dump-{tag}", argv, inputs, [out], extra={"overwrite_flag": True}))
        return out

    def run(self) -> dict:
        p = self.plan
        rows = []
        given = self.pipe.model(p.teacher).checkpoint
        if given:
            teacher_ckpt = given
            if not os.path.exists(given):
                raise ConfigError(f"models.{p.teacher}.checkpoint: file not found: {given}")
            self.echo(f"[chain] teacher: given checkpoint {given}")
        else:
            teacher_ckpt = self.train_stage(p.teacher, None, p.teacher)
        rows.append(("teacher", p.teacher, self.eval_stage(p.teacher, teacher_ckpt, p.teacher)))
        cache = self.dump_stage(p.teacher, teacher_ckpt, p.teacher)
        for ta in p.tas:
            ckpt = self.train_stage(ta, cache, ta)
            rows.append(("TA", ta, self.eval_stage(ta, ckpt, ta)))
            cache = self.dump_stage(ta, ckpt, ta)
        if p.baseline:
            tag = f"{p.student}-baseline"
            ckpt = self.train_stage(p.student, None, tag)
            rows.append(("baseline student", p.student, self.eval_stage(p.student, ckpt, tag)))
        tag = f"{p.student}-ld"
        ckpt = self.train_stage(p.student, cache, tag)
        rows.append(("LD student", p.student, self.eval_stage(p.student, ckpt, tag)))
        return write_summary(self.work_dir, rows, self.pipe)


def write_summary(work_dir: str, rows: list[tuple[str, str, str]], pipe: Pipeline) -> dict:
    """Table of AP / AP50 / AP75 per model: printed, and as markdown, JSON and a PNG chart."""
    entries = []
    for role, model, metrics_path in rows:
        with open(metrics_path) as fh:
            m = json.load(fh)
        cfg = pipe.model(model)
        width = "" if cfg.base_width == 64 else f" w{cfg.base_width}"
        entries.append({"role": role, "model": model,
                        "backbone": f"ResNet-{cfg.depth}{width}, {cfg.channels} ch",
                        "AP": m["bbox_mAP"], "AP50": m["bbox_mAP_50"], "AP75": m["bbox_mAP_75"]})
    lines = ["| role | model | backbone | AP | AP50 | AP75 |", "|---|---|---|---|---|---|"]
    for e in entries:
        lines.append(f"| {e['role']} | {e['model']} | {e['backbone']} | {e['AP'] * 100:.1f} | "
                     f"{e['AP50'] * 100:.1f} | {e['AP75'] * 100:.1f} |")
    table = "\n".join(lines)
    with open(os.path.join(work_dir, "summary.md"), "w") as fh:
        fh.write(f"# {pipe.name}: chain summary\n\n{table}\n")
    with open(os.path.join(work_dir, "summary.json"), "w") as fh:
        json.dump({"pipeline": pipe.name, "rows": entries}, fh, indent=2)
    _chart(os.path.join(work_dir, "summary.png"), entries, pipe.name)
    return {"table": table, "rows": entries}


def _chart(path: str, entries: list[dict], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ("AP", "AP50", "AP75")
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    width = 0.8 / max(len(entries), 1)
    for i, e in enumerate(entries):
        xs = [j + i * width for j in range(len(metrics))]
        bars = ax.bar(xs, [e[m] * 100 for m in metrics], width, label=f"{e['role']} ({e['backbone']})")
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks([j + width * (len(entries) - 1) / 2 for j in range(len(metrics))], metrics)
    ax.set_ylabel("COCO-style AP (%)")
    ax.set_title(f"{title}: teacher -> student localization distillation")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
