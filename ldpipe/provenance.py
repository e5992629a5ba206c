"""What produced a file: library versions and the git state of the source.

Run files (``run.json``) and cache manifests record these; both ask :func:`versions` for
the libraries that matter to them.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

from . import __version__


def versions(libraries: tuple[str, ...]) -> dict[str, str]:
    """``{'ldpipe': ..., <library>: ..., 'python': ...}``: each library's ``__version__`` as
    imported (the code that runs, with torch's build tag, e.g. ``2.14.1+cu130``), or
    ``'not installed'``; ldpipe's is this source tree's."""
    out = {"ldpipe": __version__}
    for name in libraries:
        try:
            out[name] = str(importlib.import_module(name).__version__)
        except ImportError:
            out[name] = "not installed"
    out["python"] = sys.version.split()[0]
    return out


def git_state(path: str | None = None) -> dict:
    """Commit and dirty flag of the git checkout holding ``path`` (default: ldpipe's source);
    ``{'available': False, 'reason': ...}`` without git or outside a checkout."""
    path = path or os.path.dirname(os.path.abspath(__file__))

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", path, *args], capture_output=True, text=True,
                              timeout=20, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except FileNotFoundError:
        return {"available": False, "reason": "git is not installed"}
    except subprocess.CalledProcessError as exc:
        reason = (exc.stderr or "").strip().splitlines()[:1] or ["git failed"]
        return {"available": False, "reason": f"{path}: {reason[0]}"}
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"available": False, "reason": f"git: {exc}"}
    return {"available": True, "commit": commit, "dirty": dirty, "path": path}
