"""Read an output directory without a model: its rows (what ``inspect`` shows: schema,
partitions, labels or embedding norms, errors, sample rows, SQL) and its runs (what
``status`` shows: run reports, the run writing it now, current rows).

Rows are lazy polars scans of the published parts plus ``_schema.json``. Everything here
returns data (frames, dicts, numbers); the command line (``lepton_batch.cli``) turns it into
tables. Nothing here imports torch, transformers or Dask, so it answers in a second on any
machine that can read the files.

"Current rows" are the output's newest row per id (``history.latest_rows``, the one
definition ``inspect --latest`` and the incremental row plan use); in a snapshot output
every row is current. A run is *interrupted* when its ``_runs/RUN_ID/`` holds no report and
no live process holds the output's lock for it (Ctrl-C, SIGKILL, a lost machine).
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa

from lepton_batch.output import lock
from lepton_batch.output.contract import SCHEMA_FILE, read_contract, schema_of
from lepton_batch.output.dataset import is_ours, published_parts, published_records
from lepton_batch.output.history import latest_rows, scan_output
from lepton_batch.output.layout import MARKER, PARTITION_COLUMN, RUNS_DIR, SUCCESS
from lepton_batch.output.manifest import MANIFEST_DIR, ShardRecord, read_records
from lepton_batch.store import OutputPath

ERROR_VALUE = "(error)"  # a null value of a counted column: the row failed
BELOW_MIN_SCORE = "(below task.min_score)"  # a null label on a row without an error


class InspectError(ValueError):
    """The path is not an output, or the query cannot run; the message says what to do."""


def is_output(root: Path) -> bool:
    """Whether ``root`` is a directory lepton-batch wrote (or is writing) an output to."""
    return root.is_dir() and is_ours(root)


def check_output(root: Path) -> None:
    """Raise InspectError, saying what was expected, unless ``root`` is an output."""
    if is_output(root):
        return
    what = ("does not exist" if not root.exists() else "is a file" if not root.is_dir()
            else "holds no lepton-batch output")
    raise InspectError(f"{root} {what}: expected an output directory written by `lepton-batch "
                       f"submit` (a job's output.path, with {MARKER}, {SCHEMA_FILE} and "
                       "run_date=YYYY-MM-DD/ partitions)")


def scan(root: Path) -> pl.LazyFrame | None:
    """Every published row with ``run_date`` (a date) from its partition. Nothing published
    yet: an empty frame of the ``_schema.json`` schema, or None without one."""
    parts = published_parts(root)
    if parts:
        return scan_output(parts)
    try:
        schema = schema_of(read_contract(root) or {})
    except (KeyError, ValueError, pa.ArrowException):
        return None
    frame = pl.from_arrow(schema.empty_table())
    assert isinstance(frame, pl.DataFrame), "an Arrow table converts to a DataFrame"
    return frame.lazy().with_columns(pl.lit(None, pl.Date).alias(PARTITION_COLUMN))


def id_column(root: Path, frame: pl.LazyFrame) -> str:
    """The id column: named in ``_schema.json``, else its first field, else the first column."""
    contract = read_contract(root) or {}
    fields = contract.get("fields") or [{"name": frame.collect_schema().names()[0]}]
    return contract.get("id_column") or fields[0]["name"]


@dataclass(frozen=True)
class OutputRows:
    """An output's rows, lazily: ``every`` published row, and ``newest``, the newest row per
    id (the same frame in a snapshot, whose rows are all current)."""

    root: Path
    every: pl.LazyFrame
    newest: pl.LazyFrame
    id_column: str


def read_rows(root: Path) -> OutputRows:
    """The rows of output ``root``; InspectError when it is not one, or holds no rows and no
    schema yet."""
    check_output(root)
    frame = scan(root)
    if frame is None:
        raise InspectError(f"{root} holds no published rows and no readable {SCHEMA_FILE} "
                           "yet: run the job's submit to the end first")
    idc = id_column(root, frame)
    # A snapshot holds the current input, every row of it current (and outputs from before
    # the run_id column are snapshots); an incremental history's are each id's newest rows.
    layout = (read_contract(root) or {}).get("layout")
    history = layout == "incremental" or (layout is None and "run_id" in
                                          frame.collect_schema().names())
    return OutputRows(root, frame, latest_rows(frame, idc) if history else frame, idc)


def row_count(view: pl.LazyFrame, idc: str) -> tuple[int, int]:
    """Rows, and distinct values of the id column."""
    return view.select(pl.len(), pl.col(idc).n_unique()).collect().row(0)


def partitions(view: pl.LazyFrame) -> pl.DataFrame:
    """One row per ``run_date``: rows, errors and (with a run_id column) runs."""
    has_runs = "run_id" in view.collect_schema().names()
    return (view.group_by(PARTITION_COLUMN)
            .agg(pl.len().alias("rows"), pl.col("error").is_not_null().sum().alias("errors"),
                 *([pl.col("run_id").n_unique().alias("runs")] if has_runs else []))
            .sort(PARTITION_COLUMN).collect())


def part_files(root: Path, run_date: object) -> int:
    """Published part files in partition ``run_date=...`` (a Delta table's: the current
    version's, not the files older versions keep until a vacuum)."""
    folder = f"{PARTITION_COLUMN}={run_date}"
    return sum(p.parent.name == folder for p in published_parts(root))


def value_counts(view: pl.LazyFrame, column: str, score: str | None = None) -> pl.DataFrame:
    """Rows per value of ``column`` (most first), with the mean of ``score`` as ``mean``.
    A null value is named: ``(error)``, or for a label on a row without an error ``(below
    task.min_score)`` (its top score was below the threshold; not an error)."""
    null = pl.lit(ERROR_VALUE)
    if column == "label" and "error" in view.collect_schema().names():
        null = pl.when(pl.col("error").is_null()).then(pl.lit(BELOW_MIN_SCORE)).otherwise(null)
    aggs = [pl.len().alias("rows")] + ([pl.col(score).mean().alias("mean")] if score else [])
    return (view.with_columns(pl.col(column).cast(pl.String).fill_null(null))
            .group_by(column).agg(*aggs).sort("rows", column, descending=[True, False])
            .collect())


def embedding_norms(view: pl.LazyFrame) -> dict:
    """L2 norms of the embeddings (1.0 when the job normalizes), over rows that have one:
    ``n``, ``dim``, ``min``, ``mean``, ``max`` (None where no row has one)."""
    e = pl.col("embedding")
    if isinstance(view.collect_schema()["embedding"], pl.Array):  # Parquet: fixed-size lists
        e = e.arr.to_list()  # Delta has no fixed-size lists: list<float> there already
    norm = e.list.eval(pl.element().cast(pl.Float64) ** 2).list.sum().sqrt()
    return view.select(e.is_not_null().sum().alias("n"), e.list.len().max().alias("dim"),
                       norm.min().alias("min"), norm.mean().alias("mean"),
                       norm.max().alias("max")).collect().row(0, named=True)


def errors_by_message(view: pl.LazyFrame, idc: str) -> pl.DataFrame:
    """One row per error message (most first): ``error``, ``rows`` and three example ids."""
    return (view.filter(pl.col("error").is_not_null()).group_by("error")
            .agg(pl.len().alias("rows"), pl.col(idc).sort().head(3).alias("ids"))
            .sort("rows", "error", descending=[True, False]).collect())


def run_sql(output: pl.LazyFrame, latest: pl.LazyFrame, sql: str, rows: int
            ) -> tuple[pl.DataFrame, bool]:
    """The first ``rows`` rows of ``sql`` (polars SQL) over tables ``output`` and ``latest``,
    and whether it has more; InspectError with polars' message when the query cannot run."""
    context = pl.SQLContext(frames={"output": output, "latest": latest})
    try:
        df = context.execute(sql, eager=False).head(rows + 1).collect()
    except pl.exceptions.PolarsError as exc:
        # polars appends the plan it resolved; the first paragraph is the message
        message = str(exc).split("\n\nResolved plan")[0].strip()
        raise InspectError(f"--sql: {message}") from None
    return df.head(rows), df.height > rows


def read_json(path: OutputPath) -> dict | None:
    """A JSON object file (``_SUCCESS``, a report), or None when absent or unreadable."""
    try:
        blob = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return blob if isinstance(blob, dict) else None


def last_published(root: OutputPath) -> dict | None:
    """``_SUCCESS`` (run_id, run_date of the last published run), or None."""
    return read_json(root / SUCCESS)


def run_reports(root: Path) -> list[dict]:
    """One dict per run under ``_runs/``, oldest first: its ``report.json`` as written (an
    older version lacks some keys), or ``{"run_id": ...}`` alone for a run that wrote none
    (interrupted, or running now)."""
    folders = sorted(p for p in (root / RUNS_DIR).glob("*") if p.is_dir())
    return [{"run_id": f.name, **(read_json(f / "report.json") or {})} for f in folders]


def latest_report(root: Path) -> Path | None:
    """The newest run's ``report.html`` (else its ``report.json``), if one was written."""
    for folder in sorted((p for p in (root / RUNS_DIR).glob("*") if p.is_dir()), reverse=True):
        for name in ("report.html", "report.json"):
            if (folder / name).is_file():
                return folder / name
    return None


def lock_holder(root: OutputPath) -> tuple[dict, bool] | None:
    """What ``_lock`` says of the run writing the output now, and whether its process is
    known to be gone (on this host only; the kernel released the lock when it died). None
    when no run holds it."""
    info = lock.holder(root)
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


def run_state(report: dict, root: Path) -> str:
    """published, failed, running (its process holds the lock) or interrupted."""
    if len(report) > 1:
        return "published" if report.get("published") else "failed, not published"
    held = lock_holder(root)
    running = held is not None and held[0].get("run_id") == report["run_id"] and not held[1]
    return "running" if running else "interrupted"


def fingerprint_change(reports: list[dict]) -> tuple[str, str | None, str | None] | None:
    """The newest job fingerprint, the run that changed it and the fingerprint before (both
    None when no run changed it); None when no report names one."""
    seen = [(r["run_id"], r["job_fingerprint"]) for r in reports if r.get("job_fingerprint")]
    if not seen:
        return None
    newest = seen[-1][1]
    for (_, before), (run, fp) in reversed(list(zip(seen, seen[1:], strict=False))):
        if before != fp:
            return newest, run, before
    return newest, None, None


def published_rows(root: Path) -> tuple[int, int, list[str]]:
    """Published rows, part files, and the partition dates (sorted)."""
    parts = published_parts(root)
    if not parts:
        return 0, 0, []
    rows = scan_output(parts).select(pl.len()).collect().item()
    days = {p.parent.name.removeprefix(f"{PARTITION_COLUMN}=") for p in parts}
    return rows, len(parts), sorted(days)


def current_rows(root: OutputPath, id_column: str, columns: list[str] | None = None
                 ) -> pl.LazyFrame:
    """The output's current rows (newest per id) over its published parts; ``columns``:
    what an object-store read fetches besides the id and run id (None: every column)."""
    read = None if columns is None else list(dict.fromkeys([id_column, "run_id", "deleted",
                                                            *columns]))
    return latest_rows(scan_output(published_parts(root), read), id_column)


def current_counts(root: OutputPath, id_column: str, fingerprint: str, truncated: bool
                   ) -> tuple[int, int, int]:
    """Of the current rows that job ``fingerprint`` made: rows, rows with an error, and
    truncated rows (0 when the output has no ``truncated`` column)."""
    current = current_rows(root, id_column, ["job_fingerprint", "error"]
                           + ["truncated"] * truncated)
    return current.filter(pl.col("job_fingerprint") == fingerprint).select(
        pl.len(), pl.col("error").is_not_null().sum(),
        pl.col("truncated").sum() if truncated else pl.lit(0)).collect().row(0)


def published_shards(root: OutputPath, shards: set[str], fingerprint: str
                     ) -> tuple[list[ShardRecord], list[str]]:
    """The published records of ``shards`` (fingerprints) under job ``fingerprint``, and the
    other job fingerprints the manifest holds records of (sorted)."""
    every = read_records(root / MANIFEST_DIR)
    records = list(published_records(root, shards, fingerprint, every).values())
    return records, sorted({r.job_fingerprint for r in every.values()} - {fingerprint})


def first_rows(root: OutputPath, id_column: str, current: bool, n: int) -> pl.DataFrame:
    """The output's first ``n`` rows. ``current``: the first current rows by id (the keys are
    found on three columns, then only those rows are read whole); else the first rows of
    the first part file."""
    if not current:
        return scan_output(published_parts(root)[:1]).head(n).collect()
    keys = (current_rows(root, id_column, []).select(id_column, "run_id")
            .sort(id_column, nulls_last=True).head(n).collect())
    # is_in first: a predicate the Parquet scan can use; the join then pairs id and run
    return (scan_output(published_parts(root))
            .filter(pl.col(id_column).is_in(keys[id_column].implode()))
            .join(keys.lazy(), on=[id_column, "run_id"], how="semi")
            .sort(id_column, nulls_last=True).head(n).collect())


def label_rows(root: OutputPath, id_column: str, current: bool) -> pl.LazyFrame:
    """The label, score and error of every published row, or (``current``) of the current
    rows only."""
    columns = ["label", "score", "error"]
    if current:
        return current_rows(root, id_column, columns)
    return scan_output(published_parts(root), columns)
