"""``lepton-batch status``: what an output holds now, without a model. ``status JOB``: the
job's plan against its output; ``status OUTPUT``: every run in it. The reading is
``lepton_batch.output.readers``' (imported inside the functions: it imports polars, which
``lepton-batch --help`` and submit do without); this module lays it out."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from lepton_batch.cli.common import (
    RunDateOpt,
    SetOpt,
    console,
    fail,
    load_plan,
    setup_light_logging,
)
from lepton_batch.job.spec import JobSpecError
from lepton_batch.output import lock
from lepton_batch.output.dataset import published_parts, staged_count
from lepton_batch.output.layout import SUCCESS, OutputError

if TYPE_CHECKING:
    from lepton_batch.plan.build import Plan

StatusArg = Annotated[Path, typer.Argument(
    help="The job file (YAML), or an output directory (a job's output.path).",
    show_default=False)]


def status(job_or_output: StatusArg, set_: SetOpt = None, run_date: RunDateOpt = None) -> None:
    """Show what a job's output holds for the job as it stands. Mode incremental: the shards
    and rows current for its plan (those the next submit would not compute); the snapshot
    modes: shards and rows published vs planned. Also errors, a changed job fingerprint,
    shards staged by an unfinished run, the run writing it now and the last run (published,
    failed, interrupted or running). --run-date D plans night D (an input.path holding
    {run_date} or {yesterday} reads that night's files).

    Both forms show the path of the latest run report (`_runs/RUN_ID/report.html`).

    Given an output directory instead of a job file: every run in it (shards run, skipped,
    failed and pending, rows, errors, tokens, rows/s and tokens/s, wall time, and in mode
    incremental the rows skipped as unchanged; a run that wrote no report is "interrupted",
    or "running" while its process holds the lock), the job fingerprint and the run that
    changed it, the last published run, shards staged by an unfinished run and the run
    writing it now. Exit code 2 for a directory that is not a lepton-batch output.

    More: docs/nightly-runs.md (where a night stands), docs/monitoring.md (run reports).
    """
    setup_light_logging()
    if job_or_output.is_dir():
        if set_ or run_date:
            fail(ValueError(f"--set and --run-date apply to a job file; {job_or_output} is "
                            "an output directory"))
        from lepton_batch.output.readers import InspectError

        try:
            tables = status_tables(job_or_output)
        except InspectError as exc:
            fail(exc)
        for table in tables:
            console.print(table)
        return
    try:
        plan = load_plan(job_or_output, set_, run_date)
    except (JobSpecError, OutputError) as exc:
        fail(exc)
    console.print(job_status_table(plan))


def status_tables(root: Path) -> list[Table]:
    """What ``lepton-batch status OUTPUT`` prints: the output at a glance, one row per run
    (shards, rows, errors, tokens, throughput, wall time, rows skipped as unchanged), and the
    failures of the last run if it had any."""
    from lepton_batch.output import readers
    from lepton_batch.output.contract import read_contract

    readers.check_output(root)
    contract = read_contract(root) or {}
    success = readers.last_published(root)
    reports = readers.run_reports(root)
    states = [readers.run_state(r, root) for r in reports]
    overview = Table(title=f"status of output {escape(str(root))}", show_header=False)
    for key in ("job", "task", "layout", "output_format"):
        if key in contract:
            overview.add_row(key, escape(str(contract[key])))
    if change := readers.fingerprint_change(reports):
        newest, run, before = change
        overview.add_row("job fingerprint", newest if run is None else (
            f"{newest} (changed at run {run}: was {before}; the model revision or task "
            "settings differ, so every row was computed again)"))
    rows, parts, dates = readers.published_rows(root)
    overview.add_row("published", f"{rows:,} rows in {parts} part file(s), {len(dates)} "
                     f"partition(s) ({dates[0]} .. {dates[-1]})" if parts else "nothing yet")
    if success:
        day = success.get("run_date")
        overview.add_row("last published run", f"{success.get('run_id')}"
                         + (f" (run_date {day})" if day else ""))
    if reports:
        overview.add_row("last run", _last_run(reports[-1], states[-1]))
        if report := readers.latest_report(root):
            overview.add_row("latest report", escape(str(report)))
    if staged := staged_count(root):
        overview.add_row("staged, not published", f"{staged} shard(s) of an unfinished run: "
                         "run its submit again to finish")
    if holder := _writer(readers.lock_holder(root)):
        overview.add_row("being written", escape(holder))
    overview.add_row("_SUCCESS", "yes" if success is not None else "no")
    tables = [overview, _runs_table(reports, states)]
    if reports and reports[-1].get("failures"):
        failed = Table(title=f"failures of run {reports[-1]['run_id']}")
        for column in ("shard or input", "error"):
            failed.add_column(column, overflow="fold")
        for key, message in reports[-1]["failures"].items():
            failed.add_row(escape(str(key)), escape(str(message)))
        tables.append(failed)
    return tables


def _writer(held: tuple[dict, bool] | None) -> str | None:
    """The run the lock names as writing the output now (``readers.lock_holder``). A holder
    on this host whose process is gone was killed (the kernel has released its lock)."""
    if held is None:
        return None
    info, gone = held
    who = (f"run {info.get('run_id')} (host {info.get('host')}, pid {info.get('pid')}, since "
           f"{info.get('since')})")
    return who + (": its process is gone (killed); the lock is free" if gone else "")


def _num(report: dict, key: str, fmt: str = ",") -> str:
    """``report[key]`` formatted, "-" when absent (older reports lack some keys)."""
    value = report.get(key)
    if value is None:
        return "-"
    try:
        return format(value, fmt)
    except (TypeError, ValueError):  # not a number: show it as written
        return escape(str(value))


def _last_run(report: dict, state: str) -> str:
    """The last run's state, and what it skipped: rows unchanged, or shards already done."""
    text = f"{report['run_id']}: {state}"
    if state == "interrupted":
        return text + (" (stopped or killed before it finished; its finished shards are "
                       "kept: run the same submit again to resume)")
    if "rows_unchanged" in report:
        text += (f"; {_num(report, 'rows_unchanged')} of {_num(report, 'rows_input')} input "
                 f"rows unchanged (skipped), {_num(report, 'rows_to_compute')} computed, "
                 f"{_num(report, 'ids_gone_from_input')} id(s) gone from the input")
    elif report.get("shards_skipped"):
        text += f"; {report['shards_skipped']} shard(s) already done, skipped"
    return text


def _runs_table(reports: list[dict], states: list[str]) -> Table:
    table = Table(title=f"runs ({len(reports)}, oldest first)")
    columns = ("run", "run date", "mode", "shards run", "skipped", "failed", "pending", "rows",
               "errors", "tokens", "rows/s", "tokens/s", "wall", "unchanged", "published")
    for column in columns:
        table.add_column(column, justify="left" if column in columns[:3] else "right")
    for r, state in zip(reports, states, strict=True):
        if len(r) == 1:
            table.add_row(r["run_id"], *["-"] * 13, state)
            continue
        done = sum(r.get(k) or 0 for k in ("shards_skipped", "shards_run", "shards_failed"))
        pending = max((r.get("shards_planned") or 0) - done, 0)
        wall = r.get("seconds")
        table.add_row(
            r["run_id"], str(r.get("run_date", "-")), str(r.get("mode", "-")),
            _num(r, "shards_run"), _num(r, "shards_skipped"), _num(r, "shards_failed"),
            f"{pending:,}" if "shards_planned" in r else "-", _num(r, "rows"),
            _num(r, "error_rows"), _num(r, "tokens"), _num(r, "rows_per_second", ",.1f"),
            _num(r, "tokens_per_second", ",.0f"), "-" if wall is None else f"{wall:,.1f} s",
            _num(r, "rows_unchanged"), "yes" if r.get("published") else "no")
    return table


def job_status_table(plan: Plan) -> Table:
    """What ``lepton-batch status job.yaml`` prints: the job's plan against its output.

    Mode incremental counts the rows current for the plan: those the next submit would not
    compute, their (id, content_hash) being their id's current row under this job
    fingerprint (the row plan itself, read-only). The snapshot modes count the published
    shards of this plan and fingerprint. Either way: a changed job fingerprint is said, and
    so are shards staged by an unfinished run, the run writing the output now and the last
    run (interrupted, failed or published).
    """
    from lepton_batch.job.shards import redact
    from lepton_batch.output import readers

    root = plan.output_root
    table = Table(title=f"status of job '{plan.job.name}'", show_header=False)
    table.add_row("input", f"{escape(redact(plan.job.input.path))} ({len(plan.files)} "
                  f"file(s), {plan.rows:,} rows)")
    table.add_row("output", escape(str(root)))
    if plan.job.output.mode == "incremental":
        _incremental_rows(table, plan)
    else:
        _snapshot_rows(table, plan)
    if staged := staged_count(root):
        table.add_row("staged, not published", f"{staged} shard(s): run submit again to finish")
    if isinstance(root, Path):  # a local output: the lock holder checked, the report found
        if holder := _writer(readers.lock_holder(root)):
            table.add_row("being written", escape(holder))
        if reports := readers.run_reports(root):
            table.add_row("last run", _last_run(reports[-1],
                                                readers.run_state(reports[-1], root)))
        if report := readers.latest_report(root):
            table.add_row("latest report", escape(str(report)))
    elif info := lock.holder(root):  # an object store's lease: no process to look at here
        table.add_row("being written", escape(_writer((info, False)) or ""))
    table.add_row("_SUCCESS", "yes" if (root / SUCCESS).exists() else "no")
    return table


def _changed(fp: str, before: list[str], what: str) -> str:
    return (f"{fp}: changed; the output's {what} were made with {', '.join(before)} (the "
            f"model revision or task settings differ), so the next submit computes every "
            f"{what.split()[-1].removesuffix('s')} again")


def _incremental_rows(table: Table, plan: Plan) -> None:
    from lepton_batch.output import readers

    root, fp = plan.output_root, plan.job_fingerprint
    rows = plan.row_plan()
    table.add_row("run date", f"{plan.run_date} (the next submit's partition)")
    if note := plan.backfill_note():
        table.add_row("backfill", escape(note))
    table.add_row("job fingerprint", _changed(fp, rows.previous_fingerprints, "current rows")
                  if rows.previous_fingerprints else fp)
    table.add_row("shards current", f"{len(plan.shards) - len(rows.rows)} / {len(plan.shards)}")
    todo = ("none" if not rows.to_compute else
            f"{rows.to_compute:,} in {len(rows.rows)} shard(s)")
    table.add_row("rows current", f"{plan.rows - rows.to_compute:,} / {plan.rows:,}: the next "
                  f"submit computes {todo}")
    if rows.gone:
        table.add_row("ids gone from the input", f"{rows.gone:,} " + (
            "(their last rows stay current)" if rows.deleted is None else
            "(the next submit marks them deleted: output.tombstones)"))
    if not (root.exists() and published_parts(root)):
        return
    truncated = "truncated" in plan.schema.names
    n, errors, cut = readers.current_counts(root, plan.job.input.id_column, fp, truncated)
    if n:  # of the current rows this job fingerprint made
        table.add_row("rows with errors", f"{errors:,}")
        if truncated:
            table.add_row("truncated rows", f"{cut:,}")
    if success := readers.last_published(root):
        table.add_row("last published run", f"{success.get('run_id')} (run_date "
                      f"{success.get('run_date')})")


def _snapshot_rows(table: Table, plan: Plan) -> None:
    from lepton_batch.output import readers

    fp = plan.job_fingerprint
    records, before = readers.published_shards(
        plan.output_root, {s.fingerprint for s in plan.shards}, fp)
    table.add_row("job fingerprint", _changed(fp, before, "published shards") if before
                  else fp)
    table.add_row("shards published", f"{len(records)} / {len(plan.shards)}")
    if records:
        table.add_row("rows published", f"{sum(r.rows for r in records):,} / {plan.rows:,}")
        table.add_row("rows with errors", f"{sum(r.error_rows for r in records):,}")
        table.add_row("truncated rows", f"{sum(r.truncated_rows for r in records):,}")
        table.add_row("last shard finished", max(r.finished_at for r in records))
