"""Mutation score of the core modules, one module at a time with its own fast tests.

    python tools/mutation.py                 # every module below
    python tools/mutation.py codec evaluate  # modules whose path contains a word
    python tools/mutation.py --list          # the module -> tests table
    python tools/mutation.py --survivors     # also print each survivor's diff

Needs mutmut 3 (``pip install -e '.[dev]'``; a developer tool, not a dependency).  mutmut
reads its settings from ``[tool.mutmut]`` in the working directory's pyproject.toml, and
one setting selects the tests for every mutant, so each module runs in its own scratch
copy of the repository (``--work``, default ``$TMPDIR/ldpipe-mutation``) whose
pyproject.toml names that module and its tests.  mutmut runs, for each mutant, only the
selected tests that call the mutated function.  Output: one line per module with
killed / total and the other outcomes (survived, no tests: no selected test calls the
function, timeout); the exit status is 0 whatever the score.

Edit ``MODULES`` when the package layout changes (the paths and the test files).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# module -> the fast test files (or node ids) that cover it.  The hand-computed guards (issue 12)
# and the tests written from mutation survivors sit in the area files of the modules they pin:
# models/test_gfl_head.py, test_assigner.py, test_boxes.py, cache/test_regions.py, test_codec.py
PINS = ["tests/models/test_gfl_head.py", "tests/models/test_assigner.py", "tests/models/test_boxes.py",
        "tests/cache/test_regions.py"]
MODULES: dict[str, list[str]] = {
    "ldpipe/models/losses.py": ["tests/models/test_losses.py", *PINS],
    "ldpipe/models/boxes.py": ["tests/models/test_models.py", "tests/models/test_losses.py", *PINS],
    "ldpipe/models/anchors.py": ["tests/models/test_models.py", *PINS],
    "ldpipe/models/assigner.py": ["tests/models/test_models.py", *PINS],
    "ldpipe/models/targets.py": ["tests/models/test_models.py", "tests/models/test_targets.py", *PINS],
    # test_models.py (forward shapes, strict mmdetection checkpoint loads) would also kill the
    # layer-shape mutants of GFLHead.__init__ and cover forward, at ~3x the time
    "ldpipe/models/gfl_head.py": ["tests/models/test_losses.py", *PINS,
                                  "tests/models/test_models.py::test_one_channel_groups_on_a_1x1_level"],
    "ldpipe/distill/losses.py": ["tests/models/test_losses.py", *PINS],
    "ldpipe/cache/codec.py": ["tests/cache/test_codec.py", "tests/cache/test_format_golden.py"],
    "ldpipe/cache/region.py": ["tests/cache/test_regions.py"],
    "ldpipe/metrics/common.py": ["tests/metrics/test_metrics.py"],
    "ldpipe/metrics/coco.py": ["tests/metrics/test_metrics.py"],
    "ldpipe/metrics/voc.py": ["tests/metrics/test_metrics.py"],
    "ldpipe/metrics/report.py": ["tests/metrics/test_metrics.py"],
    # slowest: each mutant's tests dump a small cache
    "ldpipe/cache/compat.py": ["tests/cache/test_compat.py", "tests/distill/test_vlr_setting.py"],
    "ldpipe/distill/cached.py": ["tests/distill/test_teacher_rows.py"],
    # issue 9's modules (not yet run through mutmut: no mutation score recorded for them)
    "ldpipe/models/nms.py": ["tests/models/test_nms.py"],
    "ldpipe/models/dcn.py": ["tests/models/test_backbones.py"],
    "ldpipe/models/gfocal_head.py": ["tests/models/test_gfocal.py"],
    "ldpipe/cache/merge.py": ["tests/cache/test_merge.py"],
}

# mutmut's exit-code classes (mutmut.stats.status_by_exit_code)
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped",
          36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout",
          37: "killed", -9: "segfault", -11: "segfault", None: "not checked"}


def _toml_list(items: list[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def prepare(module: str, tests: list[str], work: Path) -> Path:
    """A scratch copy of the repository configured to mutate ``module`` only."""
    d = work / module.replace("/", "_").removesuffix(".py")
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("ldpipe", "tests", "pipelines"):
        shutil.copytree(REPO / name, d / name, ignore=ignore)
    text = (REPO / "pyproject.toml").read_text()
    if "[tool.mutmut]" in text:  # keep a repository-level section out of the way
        text = text.replace("[tool.mutmut]", "[tool.mutmut-repo]")
    text += ("\n[tool.mutmut]\n"
             'source_paths = ["ldpipe"]\n'
             f"only_mutate = {_toml_list([module])}\n"
             f"pytest_add_cli_args_test_selection = {_toml_list(tests)}\n"
             'pytest_add_cli_args = ["-p", "no:cacheprovider", "-x", "-q"]\n'
             'also_copy = ["pipelines"]\n'
             "use_git_change_detection = false\n"
             # torch is not fork-safe once its thread pool runs: fork workers from a clean server
             'process_isolation = "forkserver"\n')
    (d / "pyproject.toml").write_text(text)
    return d


def statuses(d: Path, module: str) -> dict[str, str]:
    meta = d / "mutants" / (module + ".meta")
    if not meta.exists():
        return {}
    codes = json.loads(meta.read_text()).get("exit_code_by_key", {})
    return {k: STATUS.get(v, "suspicious") for k, v in codes.items()}


def run(module: str, tests: list[str], work: Path, jobs: int, show: bool) -> Counter:
    d = prepare(module, tests, work)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # one thread per mutant worker
    mutmut = [sys.executable, "-c", "from mutmut.__main__ import cli; cli()"]
    t0 = time.time()
    proc = subprocess.run(["nice", "-n", "10", *mutmut, "run", "--max-children", str(jobs)], cwd=d,
                          env=env, capture_output=True, text=True)
    elapsed = time.time() - t0
    st = statuses(d, module)
    if proc.returncode != 0 and not st:
        print(f"{module}: mutmut failed ({proc.returncode})\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return Counter()
    counts = Counter(st.values())
    total = sum(counts.values())
    others = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if k != "killed")
    print(f"{module:28s} killed {counts['killed']:4d} / {total:4d} "
          f"({100 * counts['killed'] / max(total, 1):5.1f}%)  {others}  [{elapsed:.0f} s]", flush=True)
    if show:
        for name, s in sorted(st.items()):
            if s != "killed":
                diff = subprocess.run([*mutmut, "show", name], cwd=d, env=env, capture_output=True,
                                      text=True).stdout
                print(f"--- {s}: {name}\n{diff}")
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("only", nargs="*", help="run the modules whose path contains one of these")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "ldpipe-mutation"))
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--survivors", action="store_true", help="print the diff of each survivor")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    chosen = {m: t for m, t in MODULES.items() if not args.only or any(w in m for w in args.only)}
    if args.list:
        for m, t in chosen.items():
            print(f"{m}: {' '.join(t)}")
        return
    try:
        import mutmut  # noqa: F401
    except ImportError:
        sys.exit("mutmut is not installed: pip install -e '.[dev]' (or pip install 'mutmut>=3.3')")
    total = Counter()
    for m, t in chosen.items():
        total += run(m, t, Path(args.work), args.jobs, args.survivors)
    n = sum(total.values())
    print(f"{'all':28s} killed {total['killed']:4d} / {n:4d} ({100 * total['killed'] / max(n, 1):5.1f}%)")


if __name__ == "__main__":
    main()
