"""The LD study: every student row of docs/results.md over several seeds, from one pipeline.

    python tools/study.py pipelines/bccd_study.toml --work-dir work_dirs/bccd_study \
        --seeds 0 1 2 --jobs 2 [--rows baseline ld_v2 ...] [-o KEY=VALUE ...]

The pipeline declares ``teacher``, ``ta`` and ``student`` models.  One teacher is trained
(the pipeline's ``train.seed``); each student row is trained once per ``--seeds`` value
(``-o train.seed=S``: the student's initial weights and data order) and evaluated.  Rows:

=============  ======================================================================
baseline       the student without distillation
ld_v1          LD on the main (ATSS-positive) region only: ``distill.vlr = kd = false``
ld_v2          LD + VLR + class KD from the teacher's ``ld`` cache (the pipeline's terms)
ld_v2_diou     as ld_v2 with the true-DIoU VLR definition (a cache dumped for it)
online         as ld_v2 with the teacher run every step (``--online-teacher``), same seeds
ld_v2_fp32     as ld_v2 from an fp32 cache of the same teacher (separates the 8-bit codec's
               effect from run-to-run divergence in the cached-vs-online comparison)
self_ld        Self-LD: the teacher is the seed-``--seeds[0]`` baseline student itself
ta             from a teacher assistant's cache (TA trained from the teacher's cache)
ensemble       from ``ldpipe cache merge`` of the teacher's and a second teacher's
               (``train.seed + 1``) caches
bckd           BCKD (``bckd_cls`` + ``bckd_box``, LD / VLR / class KD off) from the teacher's
               ``dense`` / ``logits`` / fp16 cache
crosskd        CrossKD (``crosskd_cls`` + ``crosskd_reg``, LD / VLR / class KD off) from a dense
               cache with the teacher's head part from its last head conv
               (``cache.reused_head_idx = stacked_convs - 1``); a student narrower than the
               teacher gets ``head.align_channels`` = the teacher's channels
bckd_online,   as bckd / crosskd with the teacher run every step (``--online-teacher``)
crosskd_online
=============  ======================================================================

Every job is an ordinary ``ldpipe`` command line (printed and logged under
``WORK_DIR/logs``) run in its own process; ``--jobs`` run at once (give the pipeline
``train.threads = 1`` and use one job per core).  A job whose output exists is skipped, so
an interrupted study resumes.  The end writes ``study.json`` (every seed's metrics),
``study.md`` (mean +- std and every seed) and ``study.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

ROWS = {
    "baseline": "baseline (no distillation)",
    "ld_v1": "LD v1: main region, LD only",
    "ld_v2": "LD v2: LD + VLR + class KD",
    "ld_v2_diou": "LD v2, true-DIoU VLR region",
    "online": "LD v2, online teacher",
    "ld_v2_fp32": "LD v2, fp32 cache",
    "self_ld": "Self-LD (LD v2 terms)",
    "ta": "LD v2 via a TA",
    "ensemble": "LD v2 from 2 teachers' merged cache",
    "bckd": "BCKD (authors' recipe)",
    "crosskd": "CrossKD (authors' recipe)",
    "bckd_online": "BCKD, online teacher",
    "crosskd_online": "CrossKD, online teacher",
}
BCKD_CACHE = ["-o", "cache.region=dense", "-o", "cache.cls_values=logits", "-o", "cache.codec=fp16"]
BCKD_TERMS = ["-o", "distill.ld=false", "-o", "distill.vlr=false", "-o", "distill.kd=false",
              "-o", "distill.bckd_cls=true", "-o", "distill.bckd_box=true"]
CROSSKD_TERMS = ["-o", "distill.ld=false", "-o", "distill.vlr=false", "-o", "distill.kd=false",
                 "-o", "distill.crosskd_cls=true", "-o", "distill.crosskd_reg=true"]
DIOU = ["-o", "models.student.assigner.vlr_region=diou", "-o", "models.teacher.assigner.vlr_region=diou",
        "-o", "models.ta.assigner.vlr_region=diou"]


@dataclass
class Job:
    name: str
    argv: list[str]  # after ``ldpipe``
    output: str
    deps: list[str] = field(default_factory=list)


class Study:
    def __init__(self, pipeline: str, work_dir: str, seeds: list[int], rows: list[str],
                 overrides: list[str], teacher_ckpt: str = "") -> None:
        self.pipeline, self.wd, self.seeds, self.rows = pipeline, work_dir, seeds, rows
        self.teacher_ckpt = teacher_ckpt
        self.wait_teacher = False
        self.common = [x for o in overrides for x in ("-o", o)]
        self.jobs: dict[str, Job] = {}
        self.evals: dict[tuple[str, int], str] = {}  # (row, seed) -> metrics.json
        self.teacher_eval = ""

    def path(self, *parts: str) -> str:
        return os.path.join(self.wd, *parts)

    def add(self, name: str, argv: list[str], output: str, deps: list[str] = (),
            pipeline: bool = True) -> str:
        """A job running ``ldpipe ARGV``; commands that read the pipeline get it and the overrides."""
        if pipeline:
            argv = [argv[0], self.pipeline, *argv[1:], *self.common]
        self.jobs[name] = Job(name, argv, output, list(deps))
        return name

    def train(self, name: str, model: str, wd: str, extra: list[str] = (), cache: str = "",
              deps: list[str] = ()) -> str:
        if cache:
            argv = ["train-student", "--model", model, "--cache", cache, "--work-dir", wd, "--resume"]
        else:
            argv = ["train", "--model", model, "--work-dir", wd, "--resume"]
        return self.add(name, [*argv, *extra], os.path.join(wd, "latest.pth"), deps)

    def evaluate(self, name: str, model: str, ckpt_job: str, extra: list[str] = ()) -> str:
        ckpt = self.jobs[ckpt_job].output
        out = (self.path("teacher", "metrics.json") if ckpt == self.teacher_ckpt
               else os.path.join(os.path.dirname(ckpt), "metrics.json"))
        self.add(name, ["eval", "--model", model, "--checkpoint", ckpt, "--out", out, *extra], out, [ckpt_job])
        return out

    def dump(self, name: str, model: str, ckpt_job: str, extra: list[str] = ()) -> str:
        out = self.path("caches", f"{name}.zarr")
        self.add(f"dump-{name}", ["dump-teacher", "--model", model, "--checkpoint",
                                  self.jobs[ckpt_job].output, "--out", out, *extra], out, [ckpt_job])
        return out

    # ---------------------------------------------------------------- the plan
    def plan(self) -> None:
        want = set(self.rows)
        if self.teacher_ckpt:  # a given trained teacher: no training job
            self.jobs["train-teacher"] = Job("train-teacher", [], self.teacher_ckpt)
            t = "train-teacher"
        else:
            t = self.train("train-teacher", "teacher", self.path("teacher"))
        self.teacher_eval = self.evaluate("eval-teacher", "teacher", t)
        cache = self.dump("teacher", "teacher", t)
        caches = {"ld_v1": cache, "ld_v2": cache}
        if "ld_v2_diou" in want:
            caches["ld_v2_diou"] = self.dump("teacher_diou", "teacher", t, DIOU)
        if "ld_v2_fp32" in want:
            caches["ld_v2_fp32"] = self.dump("teacher_fp32", "teacher", t, ["-o", "cache.codec=fp32"])
        if "bckd" in want:
            caches["bckd"] = self.dump("teacher_dense", "teacher", t, BCKD_CACHE)
        if "crosskd" in want:
            caches["crosskd"] = self.dump("teacher_crosskd", "teacher", t,
                                          [*BCKD_CACHE, *self._crosskd()[0]])
        if "ta" in want:
            ta = self.train("train-ta", "ta", self.path("ta"), cache=cache, deps=["dump-teacher"])
            self.evaluate("eval-ta", "ta", ta)
            caches["ta"] = self.dump("ta", "ta", ta)
        if "ensemble" in want:
            seed2 = ["-o", f"train.seed={self._teacher_seed() + 1}"]
            t2 = self.train("train-teacher2", "teacher", self.path("teacher2"), seed2)
            self.evaluate("eval-teacher2", "teacher", t2)
            c2 = self.dump("teacher2", "teacher", t2)
            merged = self.path("caches", "ensemble.zarr")
            self.add("merge-ensemble", ["cache", "merge", cache, c2, "--out", merged], merged,
                     ["dump-teacher", "dump-teacher2"], pipeline=False)
            caches["ensemble"] = merged
        first = self.seeds[0]
        for s in self.seeds:  # seed-major: a stopped study has whole seeds of every row
            for row in self.rows:
                seed = ["-o", f"train.seed={s}"]
                wd = self.path("students", row, f"seed{s}")
                extra = DIOU if row == "ld_v2_diou" else []
                if row in ("bckd", "bckd_online"):
                    extra = BCKD_TERMS
                if row in ("crosskd", "crosskd_online"):
                    extra = [*CROSSKD_TERMS, *self._crosskd()[1]]
                if row == "ld_v1":
                    extra = ["-o", "distill.vlr=false", "-o", "distill.kd=false"]
                if row == "baseline":
                    job = self.train(f"{row}-s{s}", "student", wd, seed)
                elif row in ("online", "bckd_online", "crosskd_online"):
                    if row == "crosskd_online":
                        extra = [*extra, *self._crosskd()[0]]
                    job = self.add(f"{row}-s{s}", ["train-student", "--model", "student", "--online-teacher",
                                                   self.jobs[t].output, "--teacher-model", "teacher",
                                                   "--work-dir", wd, "--resume", *seed, *extra],
                                   os.path.join(wd, "latest.pth"), [t])
                elif row == "self_ld":
                    if "dump-self" not in self.jobs:
                        base = f"baseline-s{first}"
                        if base not in self.jobs:
                            self.train(base, "student", self.path("students", "baseline", f"seed{first}"),
                                       ["-o", f"train.seed={first}"])
                        caches["self_ld"] = self.dump("self", "student", base)
                    job = self.train(f"{row}-s{s}", "student", wd, seed, caches["self_ld"], ["dump-self"])
                else:
                    dep = next(n for n, j in self.jobs.items() if j.output == caches[row])
                    job = self.train(f"{row}-s{s}", "student", wd, [*seed, *extra], caches[row], [dep])
                self.evals[(row, s)] = self.evaluate(f"eval-{row}-s{s}", "student", job)

    def _crosskd(self) -> tuple[list[str], list[str]]:
        """CrossKD's dump overrides (the reused conv: the teacher's last) and the student's
        (1x1 align maps to the teacher's width when the student's head is narrower)."""
        from ldpipe.config import load_pipeline
        pipe = load_pipeline(self.pipeline, [o for o in self.common if o != "-o"])
        teacher, student = pipe.model("teacher"), pipe.model("student")
        dump = ["-o", f"cache.reused_head_idx={teacher.stacked_convs - 1}"]
        align = ([] if student.channels == teacher.channels else
                 ["-o", f"models.student.head.align_channels={teacher.channels}"])
        return dump, align

    def _teacher_seed(self) -> int:
        for i, o in enumerate(self.common):
            if o.startswith("train.seed=") and self.common[i - 1] == "-o":
                return int(o.split("=", 1)[1])
        import tomllib
        with open(self.pipeline, "rb") as fh:
            return int(tomllib.load(fh).get("train", {}).get("seed", 0))

    # ---------------------------------------------------------------- running
    def run(self, jobs: int) -> None:
        os.makedirs(self.path("logs"), exist_ok=True)
        # done = finished by a study run (its stamp) with the output still there; a given
        # teacher is done when its file exists.  Trainings are rerun with --resume otherwise.
        done = {n for n, j in self.jobs.items() if os.path.exists(j.output)
                and (not j.argv or os.path.exists(self._stamp(n)))}
        missing = [n for n, j in self.jobs.items() if not j.argv and n not in done]
        if missing and not self.wait_teacher:
            raise SystemExit(f"[study] given teacher checkpoint not found: {self.teacher_ckpt}")
        for n in sorted(done):
            print(f"[study] skip {n} (done)", flush=True)
        pending = [n for n in self.jobs if n not in done]
        running: dict = {}
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            while pending or running:
                ready = [n for n in pending if all(d in done for d in self.jobs[n].deps)]
                for n in ready[:max(0, jobs - len(running))]:
                    pending.remove(n)
                    running[pool.submit(self._run_one, self.jobs[n])] = n
                if not running:
                    raise SystemExit(f"[study] unsatisfiable dependencies: {pending}")
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished:
                    name = running.pop(fut)
                    fut.result()
                    done.add(name)

    def _stamp(self, name: str) -> str:
        return self.path("logs", f"{name}.done.json")

    def _run_one(self, job: Job) -> None:
        if not job.argv:  # --wait-teacher: a given teacher another process is still training
            print(f"[study] waiting for {job.output}", flush=True)
            while not os.path.exists(job.output):
                time.sleep(20)
            return
        log = self.path("logs", f"{job.name}.log")
        print(f"[study] run {job.name}: ldpipe {' '.join(job.argv)}", flush=True)
        t0 = time.time()
        with open(log, "w") as fh:
            rc = subprocess.call([sys.executable, "-m", "ldpipe", *job.argv], stdout=fh, stderr=subprocess.STDOUT)
        if rc != 0:
            raise SystemExit(f"[study] {job.name} failed (exit {rc}); see {log}")
        with open(self._stamp(job.name), "w") as fh:
            json.dump({"argv": job.argv, "seconds": round(time.time() - t0, 1)}, fh)
        print(f"[study] done {job.name} in {time.time() - t0:.0f} s", flush=True)


# -------------------------------------------------------------------- the report
def _metrics(path: str) -> dict:
    with open(path) as fh:
        m = json.load(fh)
    return {k: round(100 * m[f"bbox_mAP{s}"], 2) for k, s in (("AP", ""), ("AP50", "_50"), ("AP75", "_75"))}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def report(study: Study) -> dict:
    rows = []
    base = {s: _metrics(study.evals[("baseline", s)])["AP"] for s in study.seeds
            if ("baseline", s) in study.evals}
    for row in study.rows:
        per_seed = {s: _metrics(study.evals[(row, s)]) for s in study.seeds}
        entry = {"row": row, "label": ROWS[row], "seeds": per_seed}
        for k in ("AP", "AP50", "AP75"):
            entry[k] = _mean_std([m[k] for m in per_seed.values()])
        if row != "baseline" and len(base) == len(study.seeds):
            entry["gain"] = _mean_std([per_seed[s]["AP"] - base[s] for s in study.seeds])
        rows.append(entry)
    out = {"pipeline": study.pipeline, "seeds": study.seeds, "teacher": _metrics(study.teacher_eval),
           "rows": rows}
    with open(study.path("study.json"), "w") as fh:
        json.dump(out, fh, indent=2)
    seeds = " | ".join(f"seed {s} AP" for s in study.seeds)
    lines = [f"teacher: {out['teacher']['AP']:.1f} AP / {out['teacher']['AP50']:.1f} AP50 / "
             f"{out['teacher']['AP75']:.1f} AP75", "",
             f"| student | AP (mean +- std) | AP50 | AP75 | AP - baseline | {seeds} |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(study.seeds)]
    for e in rows:
        gain = f"{e['gain'][0]:+.1f} +- {e['gain'][1]:.1f}" if "gain" in e else ""
        per = " | ".join(f"{e['seeds'][s]['AP']:.1f}" for s in study.seeds)
        lines.append(f"| {e['label']} | {e['AP'][0]:.1f} +- {e['AP'][1]:.1f} | {e['AP50'][0]:.1f} +- "
                     f"{e['AP50'][1]:.1f} | {e['AP75'][0]:.1f} +- {e['AP75'][1]:.1f} | {gain} | {per} |")
    table = "\n".join(lines)
    with open(study.path("study.md"), "w") as fh:
        fh.write(table + "\n")
    _chart(study.path("study.png"), out)
    print(table)
    return out


def _chart(path: str, out: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = out["rows"]
    fig, ax = plt.subplots(figsize=(9, 3.8), dpi=110)
    xs = range(len(rows))
    # means with +- std bars and every seed as a dot, on an axis zoomed to the data: bars
    # from 0 would hide differences of a point or two
    ax.errorbar(xs, [r["AP"][0] for r in rows], yerr=[r["AP"][1] for r in rows], fmt="s", ms=6,
                capsize=5, color="#2b6ca3", zorder=2, label="mean +- std")
    for x, r in zip(xs, rows):
        ax.scatter([x + 0.12] * len(r["seeds"]), [m["AP"] for m in r["seeds"].values()], s=12,
                   color="k", zorder=3, label="seeds" if x == 0 else None)
        ax.annotate(f"{r['AP'][0]:.1f}", (x, r["AP"][0]), xytext=(-22, 0), textcoords="offset points",
                    va="center", fontsize=7)
    ax.axhline(out["teacher"]["AP"], ls="--", color="grey", lw=1, label=f"teacher {out['teacher']['AP']:.1f}")
    ax.set_xticks(list(xs), [r["label"] for r in rows], rotation=25, ha="right", fontsize=7)
    ax.set_ylabel("AP (%)")
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_title(f"{os.path.basename(out['pipeline'])}: students over seeds {out['seeds']}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pipeline", nargs="?")
    ap.add_argument("--work-dir")
    ap.add_argument("--replot", nargs=2, metavar=("STUDY_JSON", "PNG"),
                    help="Draw the chart of a study.json again (e.g. docs/bccd_study.json) and exit.")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--teacher-checkpoint", default="",
                    help="A trained teacher of the pipeline's teacher model (instead of training one).")
    ap.add_argument("--wait-teacher", action="store_true",
                    help="A --teacher-checkpoint not there yet is being trained elsewhere: run the "
                         "jobs that do not need it and wait for the file (it holds a job slot).")
    ap.add_argument("-o", "--override", action="append", default=[], dest="overrides")
    ap.add_argument("--dry-run", action="store_true", help="Print the jobs and exit.")
    args = ap.parse_args(argv)
    if args.replot:
        with open(args.replot[0]) as fh:
            _chart(args.replot[1], json.load(fh))
        return
    if not (args.pipeline and args.work_dir):
        ap.error("give PIPELINE and --work-dir (or --replot)")
    study = Study(args.pipeline, args.work_dir, args.seeds, args.rows, args.overrides,
                  args.teacher_checkpoint)
    study.wait_teacher = args.wait_teacher
    study.plan()
    if args.dry_run:
        for j in study.jobs.values():
            print(f"{j.name}: ldpipe {' '.join(j.argv)}  (after {', '.join(j.deps) or '-'})")
        return
    study.run(args.jobs)
    report(study)


if __name__ == "__main__":
    main()
