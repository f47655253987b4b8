"""What an output holds now, without a model: ``status JOB`` (the job's plan against its
output), ``status OUTPUT`` (every run in it), and the current rows that submit's closing
summary shows.

"Current rows" are the output's newest row per id (``incremental.latest_rows``, the one
definition ``inspect --latest`` and the incremental row plan use); in a snapshot output
every row is current. A run is *interrupted* when its ``_runs/RUN_ID/`` holds no report
and no live process holds the output's lock for it (Ctrl-C, SIGKILL, a lost machine).
Nothing here imports torch, transformers or Dask.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl
from rich.markup import escape
from rich.table import Table

from lepton_batch.output.dataset import (
    LOCK,
    RUNS_DIR,
    SUCCESS,
    published_parts,
    published_records,
    staged_count,
)
from lepton_batch.output.manifest import MANIFEST_DIR, read_records
from lepton_batch.output.readers import check_output
from lepton_batch.plan.incremental import latest_rows, scan_output
from lepton_batch.store import OutputPath

if TYPE_CHECKING:
    from lepton_batch.plan.build import Plan

PREVIEW_ROWS = 5  # rows submit's summary shows


def _read_json(path: OutputPath) -> dict | None:
    try:
        blob = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return blob if isinstance(blob, dict) else None


def run_reports(root: Path) -> list[dict]:
    """One dict per run under ``_runs/``, oldest first: its ``report.json`` as written (an
    older version lacks some keys), or ``{"run_id": ...}`` alone for a run that wrote none
    (interrupted, or running now)."""
    folders = sorted(p for p in (root / RUNS_DIR).glob("*") if p.is_dir())
    return [{"run_id": f.name, **(_read_json(f / "report.json") or {})} for f in folders]


def _lock_holder(root: Path) -> tuple[dict, bool] | None:
    """What ``_lock`` says of the run writing the output now, and whether its process is
    known to be gone (on this host only; the kernel released the lock when it died). None
    when no run holds it: a run empties the file when it stops, even on Ctrl-C."""
    info = _read_json(root / LOCK)
    if not info:
        return None
    pid = info.get("pid")
    if info.get("host") == socket.gethostname() and isinstance(pid, int):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return info, True
        except PermissionError:
            pass  # alive, another user's
    return info, False


def writer(root: Path) -> str | None:
    """The run ``_lock`` names as writing the output now, or None. A holder on this host
    whose process is gone was killed (the kernel has released its lock); that is said."""
    held = _lock_holder(root)
    if held is None:
        return None
    info, gone = held
    who = (f"run {info.get('run_id')} (host {info.get('host')}, pid {info.get('pid')}, since "
           f"{info.get('since')})")
    return who + (": its process is gone (killed); the lock is free" if gone else "")


def latest_report(root: Path) -> Path | None:
    """The newest run's ``report.html`` (else its ``report.json``), if one was written."""
    for folder in sorted((p for p in (root / RUNS_DIR).glob("*") if p.is_dir()), reverse=True):
        for name in ("report.html", "report.json"):
            if (folder / name).is_file():
                return folder / name
    return None


def run_state(report: dict, root: Path) -> str:
    """published, failed, running (its process holds the lock) or interrupted."""
    if len(report) > 1:
        return "published" if report.get("published") else "failed, not published"
    held = _lock_holder(root)
    running = held is not None and held[0].get("run_id") == report["run_id"] and not held[1]
    return "running" if running else "interrupted"


def current_rows(root: OutputPath, id_column: str, columns: list[str] | None = None
                 ) -> pl.LazyFrame:
    """The output's current rows (newest per id) over its published parts; ``columns``:
    what an object-store read fetches besides the id and run id (None: every column)."""
    read = None if columns is None else list(dict.fromkeys([id_column, "run_id", "deleted",
                                                            *columns]))
    return latest_rows(scan_output(published_parts(root), read), id_column)


def _num(report: dict, key: str, fmt: str = ",") -> str:
    """``report[key]`` formatted, "-" when absent (older reports lack some keys)."""
    value = report.get(key)
    if value is None:
        return "-"
    try:
        return format(value, fmt)
    except (TypeError, ValueError):  # not a number: show it as written
        return escape(str(value))


def _fingerprint_change(reports: list[dict]) -> str | None:
    """The newest job fingerprint, and the run that changed it from the one before."""
    seen = [(r["run_id"], r["job_fingerprint"]) for r in reports if r.get("job_fingerprint")]
    if not seen:
        return None
    newest = seen[-1][1]
    for (_, before), (run, fp) in reversed(list(zip(seen, seen[1:], strict=False))):
        if before != fp:
            return (f"{newest} (changed at run {run}: was {before}; the model revision or "
                    "task settings differ, so every row was computed again)")
    return newest


def status_tables(root: Path) -> list[Table]:
    """What ``lepton-batch status OUTPUT`` prints: the output at a glance, one row per run
    (shards, rows, errors, tokens, throughput, wall time, rows skipped as unchanged), and the
    failures of the last run if it had any."""
    from lepton_batch.output.contract import read_contract

    check_output(root)
    contract = read_contract(root) or {}
    success = _read_json(root / SUCCESS)
    reports = run_reports(root)
    overview = Table(title=f"status of output {escape(str(root))}", show_header=False)
    for key in ("job", "task", "layout", "output_format"):
        if key in contract:
            overview.add_row(key, escape(str(contract[key])))
    if fingerprint := _fingerprint_change(reports):
        overview.add_row("job fingerprint", fingerprint)
    parts = published_parts(root)
    if parts:
        rows = scan_output(parts).select(pl.len()).collect().item()
        dates = {p.parent.name.removeprefix("run_date=") for p in parts}
        overview.add_row("published", f"{rows:,} rows in {len(parts)} part file(s), "
                         f"{len(dates)} partition(s) ({min(dates)} .. {max(dates)})")
    else:
        overview.add_row("published", "nothing yet")
    if success:
        day = success.get("run_date")
        overview.add_row("last published run", f"{success.get('run_id')}"
                         + (f" (run_date {day})" if day else ""))
    if reports:
        overview.add_row("last run", _last_run(reports[-1], root))
        if report := latest_report(root):
            overview.add_row("latest report", escape(str(report)))
    if staged := staged_count(root):
        overview.add_row("staged, not published", f"{staged} shard(s) of an unfinished run: "
                         "run its submit again to finish")
    if holder := writer(root):
        overview.add_row("being written", escape(holder))
    overview.add_row("_SUCCESS", "yes" if success is not None else "no")
    tables = [overview, _runs_table(reports, root)]
    if reports and reports[-1].get("failures"):
        failed = Table(title=f"failures of run {reports[-1]['run_id']}")
        for column in ("shard or input", "error"):
            failed.add_column(column, overflow="fold")
        for key, message in reports[-1]["failures"].items():
            failed.add_row(escape(str(key)), escape(str(message)))
        tables.append(failed)
    return tables


def _last_run(report: dict, root: Path) -> str:
    """The last run's state, and what it skipped: rows unchanged, or shards already done."""
    state = run_state(report, root)
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


def _runs_table(reports: list[dict], root: Path) -> Table:
    table = Table(title=f"runs ({len(reports)}, oldest first)")
    columns = ("run", "run date", "mode", "shards run", "skipped", "failed", "pending", "rows",
               "errors", "tokens", "rows/s", "tokens/s", "wall", "unchanged", "published")
    for column in columns:
        table.add_column(column, justify="left" if column in columns[:3] else "right")
    for r in reports:
        if len(r) == 1:
            table.add_row(r["run_id"], *["-"] * 13, run_state(r, root))
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
        if holder := writer(root):
            table.add_row("being written", escape(holder))
        if reports := run_reports(root):
            table.add_row("last run", _last_run(reports[-1], root))
        if report := latest_report(root):
            table.add_row("latest report", escape(str(report)))
    elif (root / LOCK).is_file():
        table.add_row("being written", escape((root / LOCK).read_text()))
    table.add_row("_SUCCESS", "yes" if (root / SUCCESS).exists() else "no")
    return table


def _changed(fp: str, before: list[str], what: str) -> str:
    return (f"{fp}: changed; the output's {what} were made with {', '.join(before)} (the "
            f"model revision or task settings differ), so the next submit computes every "
            f"{what.split()[-1].removesuffix('s')} again")


def _incremental_rows(table: Table, plan: Plan) -> None:
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
    current = current_rows(root, plan.job.input.id_column, ["job_fingerprint", "error"]
                           + ["truncated"] * truncated)
    n, errors, cut = current.filter(pl.col("job_fingerprint") == fp).select(
        pl.len(), pl.col("error").is_not_null().sum(),
        pl.col("truncated").sum() if truncated else pl.lit(0)).collect().row(0)
    if n:  # of the current rows this job fingerprint made
        table.add_row("rows with errors", f"{errors:,}")
        if truncated:
            table.add_row("truncated rows", f"{cut:,}")
    if success := _read_json(root / SUCCESS):
        table.add_row("last published run", f"{success.get('run_id')} (run_date "
                      f"{success.get('run_date')})")


def _snapshot_rows(table: Table, plan: Plan) -> None:
    root, fp = plan.output_root, plan.job_fingerprint
    every = read_records(root / MANIFEST_DIR)
    records = list(published_records(root, {s.fingerprint for s in plan.shards}, fp,
                                     every).values())
    before = sorted({r.job_fingerprint for r in every.values()} - {fp})
    table.add_row("job fingerprint", _changed(fp, before, "published shards") if before
                  else fp)
    table.add_row("shards published", f"{len(records)} / {len(plan.shards)}")
    if records:
        table.add_row("rows published", f"{sum(r.rows for r in records):,} / {plan.rows:,}")
        table.add_row("rows with errors", f"{sum(r.error_rows for r in records):,}")
        table.add_row("truncated rows", f"{sum(r.truncated_rows for r in records):,}")
        table.add_row("last shard finished", max(r.finished_at for r in records))


def preview_table(plan: Plan, n: int = PREVIEW_ROWS) -> Table:
    """Submit's first output rows. Incremental: the first ``n`` current rows by id (the
    keys are found on three columns, then only those rows are read whole); else the first
    rows of the first part file."""
    root, idc = plan.output_root, plan.job.input.id_column
    if plan.job.output.mode == "incremental":
        keys = (current_rows(root, idc, []).select(idc, "run_id")
                .sort(idc, nulls_last=True).head(n).collect())
        parts = published_parts(root)
        # is_in first: a predicate the Parquet scan can use; the join then pairs id and run
        df = (scan_output(parts).filter(pl.col(idc).is_in(keys[idc].implode()))
              .join(keys.lazy(), on=[idc, "run_id"], how="semi")
              .sort(idc, nulls_last=True).head(n).collect())
        title = f"first {min(n, df.height)} current rows of the output (newest per id, by id)"
    else:
        df = scan_output(published_parts(root)[:1]).head(n).collect()
        title = f"first {min(n, df.height)} rows of the output"
    table = Table(title=title)
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
            elif isinstance(v, str) and len(v) > 60:  # a generation or a long passthrough
                v = v[:60].replace("\n", " ") + "…"
            cells.append("" if v is None else escape(str(v)))
        table.add_row(*cells)
    return table


def label_counts_table(plan: Plan) -> Table:
    """Submit's rows per label (classify), over the current rows: in mode incremental the
    newest row per id, not the history of every night."""
    root = plan.output_root
    if plan.job.output.mode == "incremental":
        frame = current_rows(root, plan.job.input.id_column, ["label", "score", "error"])
        title = "rows per label (top 1), over the current rows (newest per id)"
    else:
        frame = scan_output(published_parts(root), ["label", "score", "error"])
        title = "rows per label (top 1)"
    # A null label is an error, or a top score below task.min_score (not an error).
    frame = frame.with_columns(pl.col("label").fill_null(
        pl.when(pl.col("error").is_null()).then(pl.lit("(below task.min_score)"))
        .otherwise(pl.lit("(error)"))))
    df = (frame.group_by("label").agg(pl.len().alias("rows"), pl.col("score").mean()
                                      .alias("mean"))
          .sort("rows", descending=True).collect())
    table = Table(title=title)
    for c in ("label", "rows", "mean score"):
        table.add_column(c)
    for label, rows, mean in df.iter_rows():
        table.add_row(escape(label or "(error)"), f"{rows:,}",
                      "" if mean is None else f"{mean:.3f}")
    return table
