"""Helpers shared by the benchmark scripts: machine info, memory probes, statistics, tables."""
from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PIPELINES = REPO / "benchmarks" / "pipelines"  # the benchmarks' own pipeline files


# ------------------------------------------------------------------ memory
def proc_status_kb(field: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (``VmHWM`` = peak RSS, ``VmRSS`` = current)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_mb() -> float | None:
    kb = proc_status_kb("VmHWM")
    if kb is None:  # not Linux: ru_maxrss is KiB on Linux, bytes on macOS
        import resource
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r / (1 << 20) if sys.platform == "darwin" else r / 1024
    return kb / 1024


def rss_mb() -> float | None:
    kb = proc_status_kb("VmRSS")
    return None if kb is None else kb / 1024


# ------------------------------------------------------------------ devices / timing
def resolve_device(name: str):
    import torch
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available on this machine")
    return as_device(name)


def as_device(name: str):
    """``torch.device`` with an explicit CUDA index (``torch.cuda.set_device`` needs one)."""
    import torch
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now() -> float:
    return time.perf_counter()


# ------------------------------------------------------------------ statistics
def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def percentile(xs, q: float) -> float | None:
    """Linear-interpolated percentile, ``q`` in [0, 100]."""
    xs = sorted(xs)
    if not xs:
        return None
    k = (len(xs) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def ratio(a, b):
    return None if a is None or not b else a / b


def fmt(x, spec: str = ".3f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------ pipelines
def override(key: str, value) -> str:
    """``KEY=VALUE`` for ``load_pipeline`` / ``-o``, the value written as a TOML literal (a JSON
    string, number, boolean or array is one): strings stay strings whatever they contain."""
    return f"{key}={json.dumps(value)}"


# ------------------------------------------------------------------ machine
def _git() -> dict:
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return {"commit": head or None, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def machine_info(device) -> dict:
    import torch

    from ldpipe.engine.bench import cpu_name
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_name(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "git": _git(),
    }
    try:
        import zarr
        info["zarr"] = zarr.__version__
    except ImportError:
        pass
    return info


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [sys.executable, "-m", _module_name(), *sys.argv[1:]])


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None and spec.name else sys.argv[0]


def write_json(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False, default=str)
        fh.write("\n")


def emit(result: dict, json_path: str | None) -> None:
    """Print ``result`` as one JSON line, and write that line to ``json_path`` if given."""
    line = json.dumps(result, default=str)
    if json_path:
        with open(json_path, "w") as fh:
            fh.write(line + "\n")
    print(line)


def quiet_logs() -> None:
    import logging
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("ldpipe").setLevel(logging.WARNING)


def run_child(module: str, args: list[str], timeout: float | None = None) -> dict:
    """Run ``python -m module args`` from the repository root; its last stdout line is JSON."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=str(REPO), env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise RuntimeError(f"child {module} {' '.join(args)} failed with exit code {proc.returncode}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise RuntimeError(f"child {module} printed nothing")
    return json.loads(lines[-1])
