"""``lepton-batch``: submit, validate and inspect batch inference jobs."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lepton_batch.output import PARTS_GLOB, OutputError
from lepton_batch.spec import JobSpecError, load_job

app = typer.Typer(
    help="Batch offline inference for large text corpora: sharded Parquet in, a transformer "
    "model run by Dask workers, a Parquet dataset out.\n\n"
    "Start with `lepton-batch validate job.yaml`, then `lepton-batch submit job.yaml`; a rerun "
    "resumes where the last one stopped. Any job field can be overridden with "
    "`--set section.key=value`. Example jobs: jobs/quickstart.yaml (embeddings) and "
    "jobs/topics.yaml (zero-shot topics); every field is documented in README.md.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # reflow docstring paragraphs in --help
)
console = Console(highlight=False)

JobArg = Annotated[Path, typer.Argument(help="The job file (YAML).", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a job field, e.g. --set task.top_k=3 "
                 "(repeatable; values are parsed as YAML)."),
]


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=Console(stderr=True), show_path=False)],
    )
    import distributed  # noqa: F401  (configures its loggers on import; quiet them after)

    if not verbose:
        for name in list(logging.root.manager.loggerDict):
            if name.split(".")[0] in ("distributed", "bokeh", "tornado", "transformers"):
                logging.getLogger(name).setLevel(logging.ERROR)


def _load(job_file: Path, overrides: list[str] | None):
    from lepton_batch.plan import make_plan

    job = load_job(job_file, overrides or [])
    return make_plan(job, str(job_file))


def _fail(exc: Exception) -> None:
    console.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(code=2)


def _plan_table(plan) -> Table:
    table = Table(title=f"plan for job '{plan.job.name}'", show_header=False)
    job = plan.job
    table.add_row("model", f"{plan.model.path} ({plan.model.model_type}, "
                  f"{', '.join(plan.model.architectures)})")
    task = job.task.kind + (" (zero-shot)" if job.task.labels else "")
    table.add_row("task", task)
    table.add_row("input", f"{len(plan.files)} file(s), {plan.rows:,} rows")
    table.add_row("shards", f"{len(plan.shards)} (≤ {job.input.rows_per_shard:,} rows each, "
                  "whole row groups)")
    table.add_row("output", f"{plan.output_root} (mode {job.output.mode})")
    table.add_row("job fingerprint", plan.job_fingerprint)
    return table


@app.command()
def validate(
    job_file: JobArg,
    set_: SetOpt = None,
    estimate: Annotated[bool, typer.Option(help="Tokenize a sample of rows to estimate the "
                                           "job's tokens (loads the tokenizer, not the model)."
                                           )] = True,
) -> None:
    """Check a job without loading a model: fields, input files, columns, model directory.

    Prints every problem at once with the field it belongs to, or the plan: files, shards,
    rows and an estimate of the tokens to run.
    """
    _setup_logging(False)
    try:
        plan = _load(job_file, set_)
    except (JobSpecError, OutputError) as exc:
        _fail(exc)
    table = _plan_table(plan)
    if estimate:
        from lepton_batch.plan import estimate_tokens

        total, mean = estimate_tokens(plan)
        table.add_row("tokens (estimate)", f"~{total:,} ({mean:.1f} per row, after truncation "
                      f"to {plan.job.model.max_length})")
    console.print(table)
    console.print("[green]job is valid[/]")


def _preview(plan, n: int = 5) -> Table:
    import polars as pl

    parts = pl.scan_parquet(str(plan.output_root / PARTS_GLOB), hive_partitioning=False)
    df = parts.head(n).collect()
    table = Table(title=f"first {min(n, df.height)} rows of the output")
    cols = [c for c in df.columns if c not in ("labels", "scores", "num_tokens", "truncated")]
    for c in cols:
        table.add_column(c, overflow="fold", max_width=48)
    for row in df.iter_rows(named=True):
        cells = []
        for c in cols:
            v = row[c]
            if isinstance(v, list):
                v = "[" + ", ".join(f"{x:.3f}" for x in v[:3]) + f", …] ({len(v)})"
            elif isinstance(v, float):
                v = f"{v:.4f}"
            cells.append("" if v is None else str(v))
        table.add_row(*cells)
    return table


def _label_counts(plan) -> Table:
    import polars as pl

    df = (pl.scan_parquet(str(plan.output_root / PARTS_GLOB))
          .group_by("label").agg(pl.len().alias("rows"), pl.col("score").mean().alias("mean"))
          .sort("rows", descending=True).collect())
    table = Table(title="rows per label (top 1)")
    for c in ("label", "rows", "mean score"):
        table.add_column(c)
    for label, rows, mean in df.iter_rows():
        table.add_row(label or "(error)", f"{rows:,}", "" if mean is None else f"{mean:.3f}")
    return table


@app.command()
def submit(
    job_file: JobArg,
    set_: SetOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO.")] = False,
) -> None:
    """Run a job on Dask workers and write its Parquet dataset.

    Plans shards, skips those already done (mode resume), runs the rest, and writes part
    files, _manifest/ records and, when every shard is done, _SUCCESS. Ctrl-C keeps every
    finished shard: run the same command again to resume.
    """
    _setup_logging(verbose)
    try:
        plan = _load(job_file, set_)
    except (JobSpecError, OutputError) as exc:
        _fail(exc)
    from lepton_batch.cluster import RunResult, run_job

    console.print(_plan_table(plan))
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=console,
    )
    bar = progress.add_task("shards", total=len(plan.shards), rate="")
    totals = {"rows": 0, "tokens": 0, "t0": time.perf_counter()}

    def on_start(result: RunResult) -> None:
        if result.dashboard:
            console.print(f"dashboard: [link={result.dashboard}]{result.dashboard}[/link]")
        if result.skipped:
            console.print(f"resume: {result.skipped} shard(s) already done, skipped")
        if result.skipped == result.planned:
            console.print("nothing to run: every shard is done (mode: overwrite recomputes)")
        progress.start()
        progress.update(bar, completed=result.skipped)

    def on_shard(record) -> None:
        totals["rows"] += record.rows
        totals["tokens"] += record.tokens
        dt = max(time.perf_counter() - totals["t0"], 1e-9)
        progress.update(bar, advance=1, rate=f"{totals['rows'] / dt:,.0f} rows/s "
                        f"{totals['tokens'] / dt:,.0f} tokens/s")

    try:
        result = run_job(plan, on_start=on_start, on_shard=on_shard)
    except OutputError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        progress.stop()
        console.print("[yellow]interrupted:[/] finished shards are kept; run the same command "
                      "again to resume")
        raise typer.Exit(code=130) from None
    finally:
        progress.stop()
    errors, padded = result.error_rows, result.padded_tokens
    console.print(
        f"output: {plan.output_root}\n"
        f"shards: {len(result.records)} run, {result.skipped} skipped, "
        f"{len(result.failures)} failed\n"
        f"rows: {result.rows:,} ({errors:,} with errors) in {result.seconds:.1f} s: "
        f"{result.rows / result.seconds:,.1f} rows/s, {result.tokens / result.seconds:,.0f} "
        f"tokens/s" + (f", padding efficiency {result.tokens / padded:.1%}" if padded else "")
        + f"\nrun report: {result.report_dir}"
    )
    if any(plan.output_root.glob(PARTS_GLOB)):
        console.print(_preview(plan))
        if plan.job.task.kind == "classify":
            console.print(_label_counts(plan))
    if not result.ok:
        for key, err in result.failures.items():
            console.print(f"[bold red]failed:[/] {key}: {err}")
        raise typer.Exit(code=1)


@app.command()
def status(job_file: JobArg, set_: SetOpt = None) -> None:
    """Show what a job's output holds: shards done vs planned, rows, errors, last run."""
    import polars as pl

    _setup_logging(False)
    try:
        plan = _load(job_file, set_)
    except (JobSpecError, OutputError) as exc:
        _fail(exc)
    from lepton_batch.manifest import read_records

    planned = {s.fingerprint for s in plan.shards}
    records = [r for r in read_records(plan.output_root).values()
               if r.job_fingerprint == plan.job_fingerprint and r.shard_fingerprint in planned]
    table = Table(title=f"status of job '{plan.job.name}'", show_header=False)
    table.add_row("output", str(plan.output_root))
    table.add_row("shards done", f"{len(records)} / {len(plan.shards)}")
    if records:
        df = pl.DataFrame([r.__dict__ for r in records])
        table.add_row("rows done", f"{df['rows'].sum():,} / {plan.rows:,}")
        table.add_row("rows with errors", f"{df['error_rows'].sum():,}")
        table.add_row("truncated rows", f"{df['truncated_rows'].sum():,}")
        table.add_row("last shard finished", str(df["finished_at"].max()))
    table.add_row("_SUCCESS", "yes" if (plan.output_root / "_SUCCESS").exists() else "no")
    console.print(table)


def main() -> None:
    app()

