"""What every ``ldpipe`` command shares: the click group (its logging and its turning of
ldpipe errors into one ``Error:`` line), the pipeline argument and the shared options."""
from __future__ import annotations

import errno
import logging
import os
import sys

import click

from ..config import ConfigError, load_pipeline
from ..errors import LdpipeError, original_message


def _setup_logging(verbose: bool) -> None:
    rank = os.environ.get("RANK", "0")
    level = logging.DEBUG if verbose else (logging.INFO if rank == "0" else logging.WARNING)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


override_option = click.option(
    "-o", "--override", "overrides", multiple=True, metavar="KEY=VALUE",
    help="Override a pipeline value by dotted path (repeatable), e.g. -o train.epochs=1.")
pipeline_arg = click.argument("pipeline", type=click.Path())  # checked by the loader (files.read_bounded)
def _check_device(ctx, param, value: str | None) -> str | None:
    """``--device`` is checked where it is given, for every command, by the one device rule
    (``ldpipe.engine.runtime.resolve_device``): 'tpu', or 'cuda' without CUDA, is one error."""
    if value is not None:
        from ..engine.runtime import resolve_device
        try:
            resolve_device(value)
        except ConfigError as exc:
            raise click.BadParameter(str(exc).removeprefix(f"--device {value!r}: ")) from None
    return value


device_option = click.option("--device", default=None, callback=_check_device,
                             help="cpu, cuda or cuda:N (default: cuda when available).")
overwrite_run_option = click.option(
    "--overwrite", is_flag=True,
    help="WORK_DIR holds an earlier run: delete its outputs and start over (default: refuse).")


def _command() -> list[str]:
    """The command line of this invocation (as typed, also when the chain runs it)."""
    ctx = click.get_current_context()
    return list(ctx.meta.get("ldpipe.command", sys.argv))


def _pipe(pipeline: str, overrides: tuple[str, ...]):
    try:
        pipe = load_pipeline(pipeline, overrides)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if pipe.train.threads:
        import torch
        torch.set_num_threads(pipe.train.threads)
    return pipe


class _Group(click.Group):
    """Turns expected errors (bad input: any :class:`~ldpipe.errors.LdpipeError`, a missing
    file, a path below a file or onto a folder, a full or read-only disk) into
    ``Error: <message>`` and exit code 1."""

    def make_context(self, info_name, args, parent=None, **extra):
        argv = ["ldpipe" if info_name in (None, "main", "__main__.py") else info_name, *args]
        ctx = super().make_context(info_name, args, parent=parent, **extra)
        ctx.meta["ldpipe.command"] = argv  # the provenance of a training run records it
        return ctx

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (LdpipeError, FileNotFoundError) as exc:  # also one raised in a loader worker
            raise click.ClickException(original_message(exc)) from None
        except OSError as exc:  # a full disk, a read-only or lost mount: say which path
            if exc.errno in _PATH_ERRNOS:  # a path that cannot be (below a file, a folder, ...)
                where = ": ".join(str(f) for f in (exc.filename, exc.filename2) if f)
                raise click.ClickException(f"{where or 'a path'}: {exc.strerror or exc}") from None
            if exc.errno not in _WRITE_ERRNOS:
                raise
            where = f"{exc.filename}: " if exc.filename else ""
            raise click.ClickException(f"{where}{exc.strerror or exc} (what was written before "
                                       "is kept; free space and rerun to resume)") from None


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG}
_PATH_ERRNOS = {errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ELOOP, errno.ENAMETOOLONG}


@click.group(cls=_Group)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.version_option(package_name="ldpipe")
def main(verbose: bool) -> None:
    """Offline teacher cache and localization distillation for dense detectors."""
    _setup_logging(verbose)
