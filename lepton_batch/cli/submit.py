"""``lepton-batch submit``: run a job on Dask workers, publish its dataset, and report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from lepton_batch.api.errors import Interrupted, RunFailed
from lepton_batch.api.run import PROGRESS, run_submission
from lepton_batch.cli.common import (
    JobArg,
    RunDateOpt,
    SetOpt,
    VerboseOpt,
    best_effort,
    console,
    fail,
    load_plan,
    setup_logging,
    warn,
)
from lepton_batch.cli.validate import plan_table
from lepton_batch.job.spec import JobSpecError, parse_run_date
from lepton_batch.output.layout import OutputError
from lepton_batch.run.stopping import held

ProgressOpt = Annotated[str, typer.Option(
    "--progress", metavar="rich|plain|none", help="rich: a live bar (shards, rows, tokens/s, "
    "padding efficiency, errors, ETA); plain: a log line per finished shard and every 30 s, "
    "for cron and CI logs; none: only the summary. Default: rich on a terminal, plain otherwise.",
    show_default=False)]
ReportOnlyOpt = Annotated[str | None, typer.Option(
    "--report-only", metavar="RUN_ID",
    help="Run nothing: write the HTML report of run RUN_ID (or 'latest') of this job's "
    "output again from its report.json, and print the report paths.", show_default=False)]


def submit(
    job_file: JobArg,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
    run_date: RunDateOpt = None,
    progress: ProgressOpt = "auto",
    report_only: ReportOnlyOpt = None,
) -> None:
    """Run a job on Dask workers and publish its Parquet dataset.

    Plans shards, skips those already done (mode resume), runs the rest into a hidden
    staging area, and publishes them (part files, _manifest/ records, _SUCCESS) only when
    every shard is done, so readers see the previous dataset or the new one. One submit per
    output at a time. Killed, interrupted or failed: run the same command again to resume.
    An embedded Dask cluster starts while the job is planned (cluster.address: an existing
    one instead).

    output.mode incremental (nightly jobs): only ids whose rows (id, content_hash) differ
    from the id's newest output rows as of RUN_DATE under this job fingerprint are
    computed, and they are added as partition `run_date=RUN_DATE`. In every mode, rows
    with identical content are computed once per shard.

    Exit codes (for schedulers): 0 done (published, or nothing to do), 1 some shard or
    input file failed (nothing published; rerun to resume), 2 invalid job, bad output or
    output in use by another run, 130 interrupted (Ctrl-C), 143 stopped by SIGTERM (Airflow,
    Kubernetes, systemd); stopped either way, finished shards are kept and a rerun resumes.

    Monitoring: the Dask dashboard link is printed at start; tasks are named
    `<task>-<job>-shard-0042` inside one Dask span named after the job, and each shard's
    read / prepare / load / tokenize / compute / write time shows in the dashboard's fine
    performance metrics. The scheduler's /metrics serves Prometheus counters
    (lepton_batch_rows_total, ..._tokens_total, ..._error_rows_total,
    ..._shards_done_total, ..._shards_failed_total, ..._tokens_per_second, ...). Each run
    writes `_runs/RUN_ID/report.html` (plots), report.json and dask-report.html; the
    summary and report.json give the time to the first batch (first_batch_seconds). A
    fresh worker imports torch and transformers first; meanwhile it reads its first shard
    and (embed, classify) tokenizes it.

    More: docs/job-file.md (fields), docs/nightly-runs.md, docs/monitoring.md,
    docs/performance.md.
    """
    if progress not in PROGRESS:
        fail(ValueError(f"--progress: {progress!r} is not one of rich, plain, none"))
    setup_logging(verbose)
    if report_only is not None:
        try:
            plan = load_plan(job_file, set_, run_date)
        except (JobSpecError, OutputError) as exc:
            fail(exc)
        _report_again(plan.output_root, report_only)
        return
    planned: list = []

    def on_plan(plan) -> None:
        planned.append(plan)
        _show_plan(plan)

    try:
        day = parse_run_date(run_date, "--run-date", "command line")
        result = run_submission(job_file, set_, day, progress=progress, console=console,
                                on_plan=on_plan, on_start=lambda r: _show_start(planned[0], r))
    except (JobSpecError, OutputError) as exc:  # JobError, OutputInUse
        fail(exc)
    except RunFailed as exc:
        result = exc.result
    except Interrupted as exc:  # stopped cleanly: the cluster is down, the lock released
        console.print(f"[yellow]{escape(str(exc))}[/]")
        raise typer.Exit(code=exc.exit_code) from None
    with held():  # the data is committed, or the failure recorded: report undisturbed
        _report(planned[0], result)


def _show_plan(plan) -> None:
    """What submit prints once the job is planned, before it runs."""
    console.print(plan_table(plan))
    if note := plan.backfill_note():
        warn(note)
    for bad in plan.bad_files:
        console.print(f"[bold red]unreadable input:[/] {bad.path}: {bad.reason}")


def _show_start(plan, result) -> None:
    """What submit prints as the run starts: the cluster, and what is left to run."""
    if plan.job.cluster.address:
        console.print(f"cluster: {escape(plan.job.cluster.address)}")
    if result.dashboard:
        console.print(f"dashboard: [link={result.dashboard}]{result.dashboard}[/link]")
    rows = result.rows_plan
    if rows is not None:
        if rows.previous_fingerprints:
            console.print(
                f"[yellow]new job fingerprint[/] {plan.job_fingerprint}: the output holds "
                f"{', '.join(rows.previous_fingerprints)} (the model revision or task "
                "settings changed), so every row is computed again")
        console.print(f"incremental: {rows.describe()}")
    elif result.skipped:
        console.print(f"resume: {result.skipped} shard(s) already done, skipped")
    if result.skipped == result.planned:
        console.print("nothing to run: every shard is done (mode: overwrite recomputes)"
                      if rows is None else "nothing to compute: no row is new or changed")


def _report(plan, result) -> None:
    # The data is committed (or the failure recorded) by now: what follows is reporting,
    # which can only warn, never change the exit code.
    best_effort("summary", _print_summary, plan, result)
    if result.published:  # the output's current rows (mode incremental: newest per id)
        best_effort("output preview", lambda: console.print(_preview(plan)))
        if plan.job.task.kind == "classify":
            best_effort("label counts", lambda: console.print(_label_counts(plan)))
    if not result.ok:
        for key, err in result.failures.items():
            console.print(f"[bold red]failed:[/] {key}: {escape(err)}")
        console.print(f"[yellow]not published:[/] {len(result.failures)} failure(s); the "
                      f"{result.skipped + len(result.records)} finished shard(s) are kept. Fix "
                      "the cause and run the same command again: only the rest will run.")
        raise typer.Exit(code=1)


def _preview(plan) -> Table:
    from lepton_batch.cli.tables import preview_table  # polars: inside best_effort

    return preview_table(plan.output_root, plan.job.input.id_column,
                         plan.job.output.mode == "incremental")


def _label_counts(plan) -> Table:
    from lepton_batch.cli.tables import label_counts_table

    return label_counts_table(plan.output_root, plan.job.input.id_column,
                              plan.job.output.mode == "incremental")


def _report_again(root, run_id: str) -> None:
    """``submit --report-only RUN_ID``: report.html again from the run's report.json."""
    import json

    from lepton_batch.output.layout import RUNS_DIR
    from lepton_batch.run.lifecycle import write_report

    runs = root / RUNS_DIR
    if run_id == "latest":
        from lepton_batch.output.readers import latest_report

        if (newest := latest_report(root)) is None:
            fail(ValueError(f"{root} holds no run report yet"))
        run_id = newest.parent.name
    source = runs / run_id / "report.json"
    if not source.is_file():
        known = sorted(p.name for p in runs.glob("*")) if runs.is_dir() else []
        fail(ValueError(f"no report for run {run_id!r} in {runs}"
                        + (f"; runs: {', '.join(known[-5:])}" if known else "")))
    for path in write_report(runs / run_id, json.loads(source.read_text())):
        console.print(f"run report: {path}")


def _print_summary(plan, result) -> None:
    from lepton_batch.run.progress import padding_headline

    errors = result.error_rows
    seconds = max(result.seconds, 1e-9)
    engines = sorted({r.engine for r in result.records if r.engine})  # one per worker load
    console.print(
        f"output: {plan.output_root}" + ("" if result.published else " (not published)") + "\n"
        f"shards: {len(result.records)} run, {result.skipped} skipped, "
        f"{len(result.failures)} failed\n"
        f"rows: {result.rows:,} ({errors:,} with errors"
        + (f", {result.deduplicated_rows:,} copied from identical rows"
           if result.deduplicated_rows else "")
        + f") in {result.seconds:.1f} s: "
        f"{result.rows / seconds:,.1f} rows/s, {result.tokens / seconds:,.0f} "
        f"tokens/s" + padding_headline(result.rows, result.tokens, result.padded_tokens)
        + "".join(f"\nengine: {e}" for e in engines)
        + _first_batch(result)
        + f"\nrun report: {_report_path(result.report_dir)}"
    )


def _first_batch(result) -> str:
    """The summary's time-to-first-batch line: from the run's start, and from the command's
    (its imports and planning included)."""
    first = result.first_batch_seconds
    if first is None:
        return ""
    import psutil  # a dependency of dask.distributed

    since_command = result.started + first - psutil.Process().create_time()
    return (f"\nfirst batch: {first:.1f} s after the run started "
            f"({since_command:.1f} s after the command started)")


def _report_path(folder: str) -> str:
    """The run's report.html when it was written, else its folder."""
    html = Path(folder) / "report.html"
    return str(html) if "://" not in folder and html.is_file() else folder
