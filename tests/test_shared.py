"""The package-root leaves every room shares: one error base (and the CLI's line for it),
``first_line``, ``atomic_write``, ``versions`` / ``git_state``."""
from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import sys

import pytest
from click.testing import CliRunner

import ldpipe
from ldpipe.errors import LdpipeError, first_line
from ldpipe.files import atomic_write, replacing, temp_path
from ldpipe.provenance import git_state, versions


def _error_classes() -> dict[str, type]:
    out = {}
    for info in pkgutil.walk_packages(ldpipe.__path__, "ldpipe."):
        if info.name == "ldpipe.__main__":  # runs the CLI
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, BaseException)
                    and obj.__module__.startswith("ldpipe.")):
                out[f"{obj.__module__}.{name}"] = obj
    return out


def test_every_ldpipe_error_is_an_ldpipe_error_and_a_value_error():
    found = _error_classes()
    names = {k.rsplit(".", 1)[1] for k in found}
    assert {"ConfigError", "CacheError", "DataError", "CheckpointError", "ChainError",
            "ExportError", "WorkDirError", "UndecodableImage"} <= names, sorted(names)
    assert not [k for k, c in found.items() if not issubclass(c, LdpipeError)]
    assert issubclass(LdpipeError, ValueError)


def test_the_cli_prints_one_error_line_for_any_ldpipe_error(monkeypatch, tmp_path):
    """A new subclass needs no entry in the CLI's handler: ``Error: <message>``, exit 1."""
    from ldpipe.cli import main as cli
    from ldpipe.engine import export

    class NewError(LdpipeError):
        pass

    def refuse(*a, **k):
        raise NewError(f"{tmp_path}/x.onnx: a new kind of refusal")

    monkeypatch.setattr(export, "export_checkpoint", refuse)
    pipeline = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "pipelines", "demo.toml")
    res = CliRunner().invoke(cli, ["export", pipeline, "--model", "teacher", "--checkpoint",
                                   str(tmp_path / "c.pth"), "--out", str(tmp_path / "x.onnx")])
    assert res.exit_code == 1, res.output
    assert res.output.strip().splitlines()[-1] == f"Error: {tmp_path}/x.onnx: a new kind of refusal"


def test_first_line():
    assert first_line(KeyError("k")) == "KeyError: 'k'"
    assert first_line(OSError("one\ntwo")) == "OSError: one"
    assert first_line(OSError("one\ntwo"), typed=False) == "one"
    assert first_line(RuntimeError()) == first_line(RuntimeError(), typed=False) == "RuntimeError"


def test_atomic_write_replaces_whole_files_and_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "f.json")
    atomic_write(path, b"\x00bytes\n")
    assert open(path, "rb").read() == b"\x00bytes\n"
    atomic_write(path, "text\n")
    assert open(path, "rb").read() == "text\n".encode()
    with pytest.raises(ZeroDivisionError):
        with replacing(path) as tmp:
            assert tmp == temp_path(path) and os.path.dirname(tmp) == str(tmp_path)
            with open(tmp, "w") as fh:
                fh.write("torn")
            1 / 0
    assert open(path).read() == "text\n"  # the old file stands
    assert os.listdir(tmp_path) == ["f.json"]


def test_versions_and_git_state():
    import torch
    v = versions(("torch", "no_such_library_xyz"))
    assert list(v) == ["ldpipe", "torch", "no_such_library_xyz", "python"]
    assert v["ldpipe"] == ldpipe.__version__ and v["torch"] == torch.__version__
    assert v["no_such_library_xyz"] == "not installed"
    assert v["python"] == ".".join(map(str, sys.version_info[:3]))
    g = git_state()
    assert g["available"] is False or g["path"] == os.path.dirname(os.path.abspath(ldpipe.__file__))
    assert git_state("/")["available"] is False
