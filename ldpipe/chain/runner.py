"""The chain's stages: stamps, skips, restarts and resumes, and the run of a whole chain
(the package docstring, ``ldpipe/chain/__init__.py``, says what a chain does)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..cache import CacheError, CacheReader
from ..cache.region import reader_assigners
from ..config import (CacheConfig, ConfigError, DistillConfig, Pipeline, data_entry, enabled_terms,
                      legacy_dict, to_dict)
from ..files import atomic_write
from ..models.checkpoint import file_sha256
from .plan import ChainError, plan_of
from .pool import StagePool
from .summary import Row, method_role, write_summary

# [distill] settings added after chains first stamped their stages (left out at their defaults)
LATER_DISTILL = ("ld_norm", "bckd_cls", "bckd_cls_weight", "bckd_beta", "bckd_box", "bckd_box_weight")
LATER_CACHE = ("cls_values", "views")  # [cache] settings added later, likewise


def without_later(section: dict, default: dict, later: tuple[str, ...]) -> dict:
    """``section`` without the ``later`` settings that are at their ``default`` value."""
    return {k: v for k, v in section.items() if not (k in later and v == default.get(k))}


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

    def _common(self, seed: int | None = None) -> list[str]:
        args = [self.path]
        for o in self.overrides:
            args += ["-o", o]
        if seed is not None:  # one of chain.seeds: after the user's overrides, so it wins
            args += ["-o", f"train.seed={seed}"]
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

    def _train_stage(self, model: str, cache: str | None, tag: str, seed: int | None = None) -> Stage:
        wd = os.path.join(self.work_dir, tag)
        inputs = self._sections(model)
        if seed is not None:
            inputs["train"]["seed"] = seed
        common = self._common(seed)
        if cache is None:
            argv = ["train", *common, "--model", model, "--work-dir", wd]
        else:
            # settings added later: at their defaults the stamp is an older chain's, which
            # then skips
            inputs["distill"] = without_later(to_dict(self.pipe.distill), to_dict(DistillConfig()),
                                              LATER_DISTILL)
            inputs["cache_id"] = self._cache_id(cache)
            argv = ["train-student", *common, "--model", model, "--cache", cache,
                    "--work-dir", wd]
        return Stage(f"train-{tag}", argv, inputs, [os.path.join(wd, "latest.pth")], work_dir=wd,
                     extra={"resume_flag": True})

    def eval_stage(self, model: str, ckpt: str, tag: str) -> str:
        stage = self._eval_stage(model, ckpt, tag)
        self.run_stage(stage)
        return stage.outputs[0]

    def _eval_stage(self, model: str, ckpt: str, tag: str) -> Stage:
        out = os.path.join(self.work_dir, tag, "metrics.json")
        inputs = {"checkpoint": self._ckpt_sha(ckpt), "test": to_dict(self.pipe.model(model).test),
                  "data": data_entry(self.pipe.data), "split": self.plan.eval_split}
        argv = ["eval", *self._common(), "--model", model, "--checkpoint", ckpt,
                "--split", self.plan.eval_split, "--out", out]
        return Stage(f"eval-{tag}", argv, inputs, [out])

    def dump_stage(self, model: str, ckpt: str, tag: str) -> str:
        out = os.path.join(self.work_dir, "caches", f"{tag}.zarr")
        cache = without_later(to_dict(self.pipe.cache), to_dict(CacheConfig()), LATER_CACHE)
        inputs = {"checkpoint": self._ckpt_sha(ckpt), "cache": cache,
                  "data": data_entry(self.pipe.data), "model": legacy_dict(self.pipe.model(model)),
                  "readers": reader_assigners(self.pipe, model)}
        argv = ["dump-teacher", *self._common(), "--model", model, "--checkpoint", ckpt, "--out", out]
        self.run_stage(Stage(f"dump-{tag}", argv, inputs, [out], extra={"overwrite_flag": True}))
        return out

    def _student_tag(self, distilled: bool, seed: int | None) -> str:
        tag = f"{self.plan.student}-{'ld' if distilled else 'baseline'}"
        return tag if seed is None else f"{tag}-s{seed}"

    def _student_job(self, cache: str | None, seed: int | None) -> list:
        """A student's training then its evaluation (a job of the pool, or run here)."""
        tag = self._student_tag(cache is not None, seed)
        train = self._train_stage(self.plan.student, cache, tag, seed)
        return [lambda: train, lambda: self._eval_stage(self.plan.student, train.outputs[0], tag)]

    def _student_rows(self, distilled: bool) -> list[Row]:
        role = method_role(enabled_terms(self.pipe)) if distilled else "baseline student"
        return [Row(role, self.plan.student,
                    os.path.join(self.work_dir, self._student_tag(distilled, s), "metrics.json"), s)
                for s in self.plan.student_runs()]

    def run(self) -> dict:
        """Teacher (trained or given), its evaluation and cache, each TA, then the students:
        a baseline and a distilled one per seed.  With ``chain.jobs = N >= 2`` the student jobs
        run in up to N child processes - N - 1 of them (the baselines, which need nothing from
        the teacher) while this process trains and dumps the teacher - and the result is the
        one a sequential chain gives: the same commands."""
        p = self.plan
        rows: list[Row] = []
        given = self.pipe.model(p.teacher).checkpoint
        if given and not os.path.exists(given):
            raise ConfigError(f"models.{p.teacher}.checkpoint: file not found: {given}")
        seeds = p.student_runs()
        pool = StagePool(self, p.jobs - 1) if p.jobs >= 2 else None
        try:
            if pool and p.baseline:
                for seed in seeds:
                    pool.submit(self._student_job(None, seed))
            if given:
                teacher_ckpt = given
                self.echo(f"[chain] teacher: given checkpoint {given}")
            else:
                teacher_ckpt = self.train_stage(p.teacher, None, p.teacher)
            rows.append(Row("teacher", p.teacher, self.eval_stage(p.teacher, teacher_ckpt, p.teacher)))
            cache = self.dump_stage(p.teacher, teacher_ckpt, p.teacher)
            for ta in p.tas:
                ckpt = self.train_stage(ta, cache, ta)
                rows.append(Row("TA", ta, self.eval_stage(ta, ckpt, ta)))
                cache = self.dump_stage(ta, ckpt, ta)
            if pool:
                pool.set_slots(p.jobs)
                # the distilled students ahead of the baselines still waiting: the longer jobs
                # first, so that the last ones running are short (and the wall time least)
                pool.submit(*[self._student_job(cache, seed) for seed in seeds], first=True)
                pool.join()
            else:
                for job in [self._student_job(None, s) for s in seeds if p.baseline] + \
                        [self._student_job(cache, s) for s in seeds]:
                    for factory in job:
                        self.run_stage(factory())
        finally:
            if pool is not None:
                pool.kill()  # no-op once joined; stops the children when this process failed
        if p.baseline:
            rows += self._student_rows(False)
        rows += self._student_rows(True)
        return write_summary(self.work_dir, rows, self.pipe)
