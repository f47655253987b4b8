"""``lepton-batch inspect``: what an output's rows hold, without a model (the tables:
tables.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lepton_batch.cli.common import console, fail, setup_light_logging

OutputArg = Annotated[Path, typer.Argument(help="An output directory (a job's output.path).",
                                           show_default=False)]


def inspect_output(
    output: OutputArg,
    latest: Annotated[bool, typer.Option(
        "--latest", help="Only each id's newest rows (its greatest run_date, then run id; "
        "a repeated id has one per input row; ids marked deleted left out): the current "
        "values.")] = False,
    sql: Annotated[str | None, typer.Option(
        help="A SQL query (polars SQL) to run instead; prints its result. Tables: output "
        "(every row; with --latest the newest per id) and latest (the newest row per id), "
        "with the partition column run_date. E.g. --sql \"select label, count(*) as n from "
        "latest group by label\".", show_default=False)] = None,
    rows: Annotated[int | None, typer.Option(
        min=0, help="Sample rows to show (default 5); with --sql, result rows to show "
        "(default 100).", show_default=False)] = None,
) -> None:
    """Look inside an output without loading a model: schema, rows per partition, label
    distribution (classify) or embedding norms (embed), errors by message, sample rows.

    Reads the published Parquet parts lazily with polars. Exit code 2 for a path that is
    not a lepton-batch output, or a query polars cannot run (its message is shown).
    The output's columns: docs/output-contract.md.
    """
    # polars (through the readers) only here: --help and submit do without it
    from lepton_batch.cli.tables import inspect_tables
    from lepton_batch.output.readers import InspectError

    setup_light_logging()
    try:
        tables = inspect_tables(output, latest=latest, sql=sql, rows=rows)
    except InspectError as exc:
        fail(exc)
    for table in tables:
        console.print(table)
