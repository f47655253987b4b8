"""The command line's own surface: ``--help`` as a Unix user reads it, ``--version``, and
the console the commands print to. Imports no Dask and no torch.

typer shows a parameter's Python type where a value or nothing belongs (``--verbose
<bool>``, ``--set <list[str]>``) and a required argument as ``{job_file}`` in the usage
line. :class:`Command` spells them as click and argparse do: a flag takes nothing, an
option's value is named (``--rows ROWS``, or the metavar the option sets, such as
``--set FIELD=VALUE``), an argument is ``JOB_FILE`` and an optional one ``[JOB_FILE]``.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Annotated

import typer
from rich.console import Console, ConsoleDimensions
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

WIDE = 10_000  # columns when stdout is not a terminal: a line is as long as its content


class OutputConsole(Console):
    """rich's Console, except that when stdout is not a terminal (cron, CI, an Airflow or
    Kubernetes log) and COLUMNS is unset, lines are not cut or wrapped at 80 columns:
    tables keep every cell whole and a message stays on one line."""

    def _size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)
        if self._width is None and not self.is_terminal:
            return ConsoleDimensions(WIDE, size.height)
        return size

    size = property(_size, Console.size.fset)


def _tidy(params: list) -> list:
    """Metavars as a Unix user expects them (see the module's docstring)."""
    for p in params:
        if p.metavar is not None:
            continue
        if isinstance(p, TyperOption):
            long = max(p.opts, key=len).lstrip("-")  # --json: JSON, as argparse names it
            p.metavar = "" if p.is_flag else long.replace("-", "_").upper()
        elif isinstance(p, TyperArgument):
            p.metavar = p.name.upper()
    return params


class Command(TyperCommand):
    """A typer command whose help names values instead of Python types (``cls=Command``)."""

    def get_params(self, ctx) -> list:
        return _tidy(super().get_params(ctx))

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for p in self.get_params(ctx):
            if isinstance(p, TyperArgument):
                pieces.append(p.metavar if p.required else f"[{p.metavar}]")
            else:
                pieces.extend(p.get_usage_pieces(ctx))
        return pieces


def package_version() -> str:
    try:
        return version("lepton-batch")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"lepton-batch {package_version()}")
        raise typer.Exit()


def main_options(
    show_version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True,
        help="Print lepton-batch's version and exit.")] = False,
) -> None:
    # No docstring: the app's help= stays the top-level help.
    pass


class Group(TyperGroup):
    """The top-level command: its ``--help`` and ``--version`` are flags, shown as such."""

    def get_params(self, ctx) -> list:
        return _tidy(super().get_params(ctx))
