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
    jobs = 1                # 2: train the baseline student in a second process while the
                            # teacher (and TAs) train - it needs nothing from them; its output
                            # goes to WORK_DIR/.chain/train-<student>-baseline.log
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .cache import CacheError, CacheReader
from .cache.region import reader_assigners
from .config import CacheConfig, ConfigError, DistillConfig, Pipeline, data_entry, legacy_dict, to_dict
from .files import atomic_write
from .models.checkpoint import file_sha256
from .models.detector import backbone_label

log = logging.getLogger("ldpipe.chain")

CHAIN_KEYS = {"teacher", "tas", "student", "baseline", "eval_split", "jobs"}
# [distill] settings added after chains first stamped their stages (left out at their defaults)
LATER_DISTILL = ("ld_norm", "bckd_cls", "bckd_cls_weight", "bckd_beta", "bckd_box", "bckd_box_weight")
LATER_CACHE = ("cls_values", "views")  # [cache] settings added later, likewise


def without_later(section: dict, default: dict, later: tuple[str, ...]) -> dict:
    """``section`` without the ``later`` settings that are at their ``default`` value."""
    return {k: v for k, v in section.items() if not (k in later and v == default.get(k))}


@dataclass
class ChainPlan:
    teacher: str
    tas: list[str]
    student: str
    baseline: bool
    eval_split: str
    jobs: int = 1


def plan_of(pipe: Pipeline) -> ChainPlan:
    c = dict(pipe.chain)
    unknown = set(c) - CHAIN_KEYS
    if unknown:
        raise ConfigError(f"{pipe.source}: unknown key(s) in [chain]: {sorted(unknown)}")
    tas = c.get("tas", ["ta"] if "ta" in pipe.models else [])
    jobs = c.get("jobs", 1)
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ConfigError(f"{pipe.source}: chain.jobs must be an integer >= 1, got {jobs!r}")
    plan = ChainPlan(c.get("teacher", "teacher"), list(tas), c.get("student", "student"),
                     bool(c.get("baseline", True)), c.get("eval_split", "val"), jobs)
    for name in [plan.teacher, *plan.tas, plan.student]:
        pipe.model(name)  # names a missing model clearly
    return plan


class ChainError(ConfigError):
    """A stage run in a child process failed (one line per cause; exit code 1)."""


@dataclass
class _Background:
    stage: "Stage"
    proc: subprocess.Popen
    log: object
    log_path: str
    t0: float


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
        # the model section under its keys' names before the rename of base_width / giou_weight
        # (config.legacy_dict): a stamp written before it still matches unchanged settings
        p = self.pipe
        out = {"model": legacy_dict(p.model(model)), "data": data_entry(p.data)}
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
        atomic_write(path, json.dumps(obj, indent=2, sort_keys=True))

    def _skip(self, stage: Stage) -> bool:
        done = self._read(self._stamp_path(stage, "done"))
        if done and done.get("key") == stage.key and all(os.path.exists(o) for o in stage.outputs):
            self.skipped.append(stage.name)
            self.echo(f"[chain] skip {stage.name} (inputs unchanged)")
            return True
        return False

    def run_stage(self, stage: Stage) -> None:
        if self._skip(stage):
            return
        argv = self._begin(stage)
        self.echo(f"[chain] run {stage.name}: ldpipe {' '.join(argv)}")
        t0 = time.perf_counter()
        self.run_argv(argv)
        self._end(stage, t0)

    def start_stage(self, stage: Stage) -> "_Background | None":
        """Run ``stage`` in a child process (``python -m ldpipe ...``) and return at once;
        :meth:`wait_stage` collects it.  None when the stage is skipped."""
        if self._skip(stage):
            return None
        argv = self._begin(stage)
        log_path = self._stamp_path(stage, "log").removesuffix(".json")
        self.echo(f"[chain] start {stage.name} in parallel (log: {log_path}): ldpipe {' '.join(argv)}")
        fh = open(log_path, "w")
        proc = subprocess.Popen([sys.executable, "-m", "ldpipe", *argv], stdout=fh,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return _Background(stage, proc, fh, log_path, time.perf_counter())

    def wait_stage(self, bg: "_Background | None") -> None:
        if bg is None:
            return
        rc = bg.proc.wait()
        bg.log.close()
        if rc != 0:
            with open(bg.log_path, errors="replace") as fh:
                tail = [ln.rstrip() for ln in fh.readlines()[-5:]]
            raise ChainError(f"stage {bg.stage.name} failed (exit code {rc}); its log is "
                             f"{bg.log_path}:\n  " + "\n  ".join(tail))
        self.echo(f"[chain] done {bg.stage.name} ({time.perf_counter() - bg.t0:.0f} s)")
        self._end(bg.stage, bg.t0)

    def _begin(self, stage: Stage) -> list[str]:
        started = self._read(self._stamp_path(stage, "started"))
        fresh = not (started and started.get("key") == stage.key)
        argv = list(stage.argv)
        if fresh and stage.work_dir and os.path.exists(stage.work_dir):
            shutil.rmtree(stage.work_dir) if os.path.isdir(stage.work_dir) else os.remove(stage.work_dir)
        if fresh and stage.extra.get("overwrite_flag"):
            argv.append("--overwrite")
        if stage.extra.get("resume_flag"):  # a training: continue it, or restart it on purpose
            argv.append("--overwrite" if fresh else "--resume")
        self._write(self._stamp_path(stage, "started"), {"key": stage.key, "inputs": stage.inputs})
        return argv

    def _end(self, stage: Stage, t0: float) -> None:
        self._write(self._stamp_path(stage, "done"),
                    {"key": stage.key, "inputs": stage.inputs, "seconds": round(time.perf_counter() - t0, 2)})
        self.ran.append(stage.name)

    # ------------------------------------------------------------ stages
    def _ckpt_sha(self, path: str) -> str:
        return file_sha256(path) if os.path.exists(path) else "missing"

    def _cache_id(self, url: str) -> str:
        """The cache's id, or ``"missing"`` when there is no readable cache at ``url`` yet:
        the cache layer's :class:`CacheError` (absent, incomplete, corrupt: it wraps what
        zarr raises) or an ``OSError`` reading its files.  Anything else is a bug and
        propagates (it used to read as "missing" and silently rerun every later stage)."""
        try:
            return CacheReader(url).manifest.cache_id
        except (CacheError, OSError):
            return "missing"

    def train_stage(self, model: str, cache: str | None, tag: str) -> str:
        stage = self._train_stage(model, cache, tag)
        self.run_stage(stage)
        return stage.outputs[0]

    def _train_stage(self, model: str, cache: str | None, tag: str) -> Stage:
        wd = os.path.join(self.work_dir, tag)
        inputs = self._sections(model)
        if cache is None:
            argv = ["train", *self._common(), "--model", model, "--work-dir", wd]
        else:
            # settings added later: at their defaults the stamp is an older chain's, which
            # then skips
            inputs["distill"] = without_later(to_dict(self.pipe.distill), to_dict(DistillConfig()),
                                              LATER_DISTILL)
            inputs["cache_id"] = self._cache_id(cache)
            argv = ["train-student", *self._common(), "--model", model, "--cache", cache,
                    "--work-dir", wd]
        return Stage(f"train-{tag}", argv, inputs, [os.path.join(wd, "latest.pth")], work_dir=wd,
                     extra={"resume_flag": True})

    def eval_stage(self, model: str, ckpt: str, tag: str) -> str:
        out = os.path.join(self.work_dir, tag, "metrics.json")
        inputs = {"checkpoint": self._ckpt_sha(ckpt), "test": to_dict(self.pipe.model(model).test),
                  "data": data_entry(self.pipe.data), "split": self.plan.eval_split}
        argv = ["eval", *self._common(), "--model", model, "--checkpoint", ckpt,
                "--split", self.plan.eval_split, "--out", out]
        self.run_stage(Stage(f"eval-{tag}", argv, inputs, [out]))
        return out

    def dump_stage(self, model: str, ckpt: str, tag: str) -> str:
        out = os.path.join(self.work_dir, "caches", f"{tag}.zarr")
        cache = without_later(to_dict(self.pipe.cache), to_dict(CacheConfig()), LATER_CACHE)
        inputs = {"checkpoint": self._ckpt_sha(ckpt), "cache": cache,
                  "data": data_entry(self.pipe.data), "model": legacy_dict(self.pipe.model(model)),
                  "readers": reader_assigners(self.pipe, model)}
        argv = ["dump-teacher", *self._common(), "--model", model, "--checkpoint", ckpt, "--out", out]
        self.run_stage(Stage(f"dump-{tag}", argv, inputs, [out], extra={"overwrite_flag": True}))
        return out

    def run(self) -> dict:
        p = self.plan
        rows = []
        base_tag = f"{p.student}-baseline"
        given = self.pipe.model(p.teacher).checkpoint
        if given and not os.path.exists(given):
            raise ConfigError(f"models.{p.teacher}.checkpoint: file not found: {given}")
        # the baseline student needs nothing from the teacher: with jobs >= 2 it trains in a
        # second process meanwhile (same command, so the same result as running it after)
        parallel = base_stage = None
        if p.baseline and p.jobs >= 2:
            base_stage = self._train_stage(p.student, None, base_tag)
            parallel = self.start_stage(base_stage)
        try:
            if given:
                teacher_ckpt = given
                self.echo(f"[chain] teacher: given checkpoint {given}")
            else:
                teacher_ckpt = self.train_stage(p.teacher, None, p.teacher)
            rows.append(("teacher", p.teacher, self.eval_stage(p.teacher, teacher_ckpt, p.teacher)))
            cache = self.dump_stage(p.teacher, teacher_ckpt, p.teacher)
            for ta in p.tas:
                ckpt = self.train_stage(ta, cache, ta)
                rows.append(("TA", ta, self.eval_stage(ta, ckpt, ta)))
                cache = self.dump_stage(ta, ckpt, ta)
            self.wait_stage(parallel)
        finally:
            if parallel is not None and parallel.proc.poll() is None:  # this process failed
                parallel.proc.kill()
                parallel.proc.wait()
        if p.baseline:
            ckpt = base_stage.outputs[0] if base_stage else self.train_stage(p.student, None, base_tag)
            rows.append(("baseline student", p.student, self.eval_stage(p.student, ckpt, base_tag)))
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
        width = "" if cfg.base_channels == 64 else f" w{cfg.base_channels}"
        entries.append({"role": role, "model": model,
                        "backbone": f"{backbone_label(cfg.backbone)}{width}, {cfg.channels} ch",
                        "AP": m["bbox_mAP"], "AP50": m["bbox_mAP_50"], "AP75": m["bbox_mAP_75"]})
    lines = ["| role | model | backbone | AP | AP50 | AP75 |", "|---|---|---|---|---|---|"]
    for e in entries:
        lines.append(f"| {e['role']} | {e['model']} | {e['backbone']} | {e['AP'] * 100:.1f} | "
                     f"{e['AP50'] * 100:.1f} | {e['AP75'] * 100:.1f} |")
    by_role = {e["role"]: e for e in entries}
    if "baseline student" in by_role and "LD student" in by_role:
        ld, base = by_role["LD student"], by_role["baseline student"]
        gain = " / ".join(f"{(ld[m] - base[m]) * 100:+.1f} {m}" for m in ("AP", "AP50", "AP75"))
        lines += ["", f"LD student - baseline student: {gain} (one training each, train.seed = "
                      f"{pipe.train.seed}; single runs move by a few AP with the seed)"]
    table = "\n".join(lines)
    with open(os.path.join(work_dir, "summary.md"), "w") as fh:
        fh.write(f"# {pipe.name}: chain summary\n\n{table}\n")
    curves = {f"{role}: {os.path.basename(os.path.dirname(path))}": loss_curve(os.path.dirname(path))
              for role, _, path in rows}
    curves = {k: v for k, v in curves.items() if v[0]}  # a given checkpoint has no training
    with open(os.path.join(work_dir, "summary.json"), "w") as fh:
        json.dump({"pipeline": pipe.name, "rows": entries,
                   "loss_curves": {k: {"points": len(v[0]), "first_iter": v[0][0], "last_iter": v[0][-1],
                                       "last_loss": v[1][-1]} for k, v in curves.items()}},
                  fh, indent=2)
    _chart(os.path.join(work_dir, "summary.png"), entries, pipe.name, curves)
    return {"table": table, "rows": entries}


def loss_curve(stage_dir: str) -> tuple[list[int], list[float]]:
    """(iterations, total loss) of a training stage's ``metrics.jsonl`` (its ``train``
    records; its ``epoch`` records when it logged none); empty without the file."""
    path = os.path.join(stage_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return [], []
    with open(path) as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    picked = [r for r in records if r.get("type") == "train"] or \
             [r for r in records if r.get("type") == "epoch"]
    picked = [r for r in picked if "loss" in r]
    return [int(r["iter"]) for r in picked], [float(r["loss"]) for r in picked]


def _chart(path: str, entries: list[dict], title: str,
           curves: dict[str, tuple[list[int], list[float]]] | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ("AP", "AP50", "AP75")
    if curves:
        fig, (ax, lax) = plt.subplots(1, 2, figsize=(12, 3.8), dpi=110)
        for label, (iters, losses) in curves.items():
            lax.plot(iters, losses, label=label, linewidth=1)
        lax.set_xlabel("iteration")
        lax.set_ylabel("training loss (all terms)")
        lax.set_title("loss curves (metrics.jsonl of each stage)")
        lax.legend(fontsize=7, loc="upper right")
    else:
        fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    width = 0.8 / max(len(entries), 1)
    top = max([e[m] * 100 for e in entries for m in metrics] or [1.0])
    ax.set_ylim(0, top * 1.4)  # headroom: the legend sits above the tallest bar's label
    for i, e in enumerate(entries):
        xs = [j + i * width for j in range(len(metrics))]
        bars = ax.bar(xs, [e[m] * 100 for m in metrics], width, label=f"{e['role']} ({e['backbone']})")
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks([j + width * (len(entries) - 1) / 2 for j in range(len(metrics))], metrics)
    ax.set_ylabel("COCO-style AP (%)")
    ax.set_title(f"{title}: teacher -> student localization distillation")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
