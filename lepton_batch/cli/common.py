"""What the commands share: the console they print to, the job-file options, logging,
loading a job, and failing with exit code 2. Imports no Dask, torch or polars at import
time (``lepton-batch --help`` stays light; submit's driver never imports polars)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from lepton_batch.cli.help import OutputConsole
from lepton_batch.job.spec import JobSpec, load_job, parse_run_date

console = OutputConsole(highlight=False)  # not cut at 80 columns in a log

JobArg = Annotated[Path, typer.Argument(help="The job file (YAML).", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", metavar="FIELD=VALUE", help="Override a job field, e.g. "
                 "--set task.top_k=3 (repeatable; values are parsed as YAML)."),
]
RunDateOpt = Annotated[
    str | None,
    typer.Option("--run-date", metavar="YYYY-MM-DD", help="The run's date (default: today, "
                 "UTC): its output partition run_date=..., and what {run_date} / {yesterday} in "
                 "input.path mean. For backfills: an incremental run before the newest "
                 "published night fills in that night and leaves later ones as they are.",
                 show_default=False),
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO.")]


def setup_light_logging(level: int = logging.WARNING) -> None:
    """Log records to stderr through rich, without importing Dask (status and inspect of an
    output read files only)."""
    logging.basicConfig(level=level, format="%(message)s",
                        handlers=[RichHandler(console=Console(stderr=True), show_path=False)])


def setup_logging(verbose: bool) -> None:
    """Logging for the commands that start Dask workers (validate, submit, bench)."""
    setup_light_logging(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        from lepton_batch.run.monitor import quiet_logs

        quiet_logs()


def load_plan(job_file: Path, overrides: list[str] | None, run_date: str | None = None,
              on_valid: Callable[[JobSpec], None] | None = None):
    """The job file validated and planned. ``on_valid(job)``: called between the two (the
    embedded cluster starts there, so its workers warm up while the driver plans)."""
    from lepton_batch.plan.build import make_plan

    day = parse_run_date(run_date, "--run-date", "command line")
    job = load_job(job_file, overrides or [])
    if on_valid is not None:
        on_valid(job)
    return make_plan(job, str(job_file), day)


def fail(exc: Exception) -> NoReturn:
    """Print ``exc`` as the command's error and exit with code 2."""
    # escaped: messages quote paths, columns and polars errors that hold [brackets]
    console.print(f"[bold red]error:[/] {escape(str(exc))}")
    raise typer.Exit(code=2)


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/] {escape(message)}")


def best_effort(what: str, step, *args) -> None:
    """Run an optional reporting step; a failure is a warning, never a failed run."""
    try:
        step(*args)
    except Exception as exc:  # reporting only: the output is already committed
        warn(f"{what} failed ({type(exc).__name__}: {exc}); the output is not affected")
