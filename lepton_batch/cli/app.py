"""``lepton-batch``: the typer app, its commands (one module each) and the entry point
(``lepton_batch.cli.app:main``)."""

from __future__ import annotations

import typer

from lepton_batch.cli.bench import bench
from lepton_batch.cli.help import Command, Group, main_options
from lepton_batch.cli.inspect_cmd import inspect_output
from lepton_batch.cli.status import status
from lepton_batch.cli.submit import submit
from lepton_batch.cli.validate import validate

app = typer.Typer(
    cls=Group,
    help="Batch offline inference for large text corpora: Parquet files in, a transformer "
    "model run by Dask workers (embed, classify, generate, score), a Parquet dataset out.",
    epilog="Example: lepton-batch submit jobs/quickstart.yaml\n\n"
    "Each command: lepton-batch COMMAND --help. Reference: docs/commands.md, "
    "docs/job-file.md.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # reflow docstring paragraphs in --help
)
app.callback()(main_options)  # --version

# One line each in `lepton-batch --help`, in the order a user meets them.
for command, name, line in [
    (submit, "submit", "Run a job on Dask workers and publish its Parquet dataset."),
    (validate, "validate", "Check a job and show its plan, without loading a model."),
    (inspect_output, "inspect", "Look inside an output: schema, partitions, labels, errors, "
     "rows, SQL."),
    (status, "status", "What a job's output holds: runs, rows current, the run writing it."),
    (bench, "bench", "Measure throughput against sentence-transformers or model.generate."),
]:
    app.command(name, cls=Command, short_help=line)(command)


def main() -> None:
    app()
