"""Read an output directory's rows without a model (``inspect``): schema, partitions,
labels or embedding norms, errors, sample rows, SQL. Its runs (``status``): status.py.

Everything is a lazy polars scan of the published parts plus ``_schema.json``. Nothing here
imports torch, transformers or Dask, so it answers in a second on any machine that can
read the files.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pyarrow as pa
from rich.markup import escape
from rich.table import Table

from lepton_batch.output.contract import SCHEMA_FILE, read_contract, schema_of
from lepton_batch.output.dataset import (
    MARKER,
    is_ours,
    published_parts,
    staged_count,
)
from lepton_batch.plan.incremental import latest_rows, scan_output

SAMPLE_ROWS = 5  # sample rows shown by inspect when --rows is not given
SQL_ROWS = 100  # result rows shown for --sql when --rows is not given


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
    return frame.lazy().with_columns(pl.lit(None, pl.Date).alias("run_date"))


def id_column(root: Path, frame: pl.LazyFrame) -> str:
    """The id column: named in ``_schema.json``, else its first field, else the first column."""
    contract = read_contract(root) or {}
    fields = contract.get("fields") or [{"name": frame.collect_schema().names()[0]}]
    return contract.get("id_column") or fields[0]["name"]


def inspect_tables(root: Path, latest: bool = False, sql: str | None = None,
                   rows: int | None = None) -> list[Table]:
    """What ``lepton-batch inspect OUTPUT`` prints.

    Without ``sql``: an overview, the schema, rows per partition, the label distribution
    (classify), embedding L2 norms (embed) or finish reasons (generate), errors by message
    and ``rows`` sample rows (default 5). With ``sql``: only its result, at most ``rows``
    rows (default 100); table ``output`` is every row, ``latest`` the newest row per id.
    ``latest``: every figure (and table ``output``) counts only the newest row per id.
    """
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
    newest = latest_rows(frame, idc) if history else frame
    if sql is not None:
        return [sql_table(newest if latest else frame, newest, sql,
                          SQL_ROWS if rows is None else rows)]
    view = newest if latest else frame
    tables = [_overview(root, view, idc, latest), _schema_table(root, view),
              _partitions_table(root, view, latest)]
    names = view.collect_schema().names()
    if "label" in names:
        tables.append(_counts_table(view, "label", "score"))
    if "finish_reason" in names:
        tables.append(_counts_table(view, "finish_reason"))
    if "embedding" in names:
        tables.append(_norms_table(view))
    tables += [_errors_table(view, idc), _sample_table(view, SAMPLE_ROWS if rows is None
                                                       else rows)]
    return tables


def _overview(root: Path, view: pl.LazyFrame, idc: str, latest: bool) -> Table:
    contract = read_contract(root) or {}
    table = Table(title=f"output {escape(str(root))}" + (" (newest row per id)" if latest
                                                         else ""), show_header=False)
    for key in ("job", "task", "layout", "output_format"):
        if key in contract:
            table.add_row(key, escape(str(contract[key])))
    n, ids = view.select(pl.len(), pl.col(idc).n_unique()).collect().row(0)
    table.add_row("rows", f"{n:,}")
    table.add_row(f"distinct ids ({escape(idc)})", f"{ids:,}")
    if latest and n > ids:
        table.add_row("repeated ids", f"{n - ids:,} more row(s) than ids: an id that repeats in "
                      "the input has one row per input row")
    if not published_parts(root):
        table.add_row("published", f"nothing yet ({staged_count(root)} shard(s) staged by an "
                      "unfinished run)")
    return table


def _schema_table(root: Path, view: pl.LazyFrame) -> Table:
    stated = {f["name"]: f["type"] for f in (read_contract(root) or {}).get("fields", [])}
    table = Table(title="schema (run_date: the partition)", caption=None if stated else
                  f"no {SCHEMA_FILE}: written by a lepton-batch from before schema contracts")
    for column in ("column", *(["type"] if stated else []), "polars type"):
        table.add_column(column)
    for name, dtype in view.collect_schema().items():
        table.add_row(escape(name), *([escape(stated.get(name, ""))] if stated else []),
                      escape(str(dtype)))
    return table


def _partitions_table(root: Path, view: pl.LazyFrame, latest: bool) -> Table:
    has_runs = "run_id" in view.collect_schema().names()
    df = (view.group_by("run_date")
          .agg(pl.len().alias("rows"), pl.col("error").is_not_null().sum().alias("errors"),
               *([pl.col("run_id").n_unique().alias("runs")] if has_runs else []))
          .sort("run_date").collect())
    table = Table(title="rows per partition" + (" (newest row per id)" if latest else ""))
    columns = ["run_date", "rows", "errors"] + ["runs"] * has_runs + ["part files"] * (not latest)
    for column in columns:
        table.add_column(column, justify="left" if column == "run_date" else "right")
    for row in df.iter_rows(named=True):
        cells = [str(row["run_date"]), f"{row['rows']:,}", f"{row['errors']:,}"]
        if has_runs:
            cells.append(f"{row['runs']:,}")
        if not latest:
            cells.append(str(len(list(root.glob(f"run_date={row['run_date']}/*.parquet")))))
        table.add_row(*cells)
    return table


def _counts_table(view: pl.LazyFrame, column: str, score: str | None = None) -> Table:
    """Rows per value of ``column`` (null: the row's error), with the mean of ``score``."""
    aggs = [pl.len().alias("rows")] + ([pl.col(score).mean().alias("mean")] if score else [])
    df = view.group_by(column).agg(*aggs).sort("rows", column, descending=[True, False]
                                                ).collect()
    total = max(int(df["rows"].sum()), 1)
    table = Table(title=f"rows per {column}")
    for c in (column, "rows", "share") + ((f"mean {score}",) if score else ()):
        table.add_column(c, justify="left" if c == column else "right")
    for row in df.iter_rows(named=True):
        mean = [] if not score else ["-" if row["mean"] is None else f"{row['mean']:.3f}"]
        table.add_row("(error)" if row[column] is None else escape(str(row[column])),
                      f"{row['rows']:,}", f"{row['rows'] / total:.1%}", *mean)
    return table


def _norms_table(view: pl.LazyFrame) -> Table:
    """L2 norms of the embeddings (1.0 when the job normalizes), over rows that have one."""
    e = pl.col("embedding")
    norm = e.arr.to_list().list.eval(pl.element().cast(pl.Float64) ** 2).list.sum().sqrt()
    stats = view.select(e.is_not_null().sum().alias("n"), e.arr.len().max().alias("dim"),
                        norm.min().alias("min"), norm.mean().alias("mean"),
                        norm.max().alias("max")).collect().row(0, named=True)
    table = Table(title="embedding L2 norms")
    for column in ("rows with an embedding", "dim", "min", "mean", "max"):
        table.add_column(column, justify="right")
    table.add_row(f"{stats['n']:,}", str(stats["dim"] or "-"),
                  *("-" if stats[k] is None else f"{stats[k]:.4f}" for k in ("min", "mean",
                                                                              "max")))
    return table


def _errors_table(view: pl.LazyFrame, idc: str, top: int = 10) -> Table:
    df = (view.filter(pl.col("error").is_not_null()).group_by("error")
          .agg(pl.len().alias("rows"), pl.col(idc).sort().head(3).alias("ids"))
          .sort("rows", "error", descending=[True, False]).collect())
    table = Table(title="rows with an error, by message", caption=(
        f"{df.height - top} more message(s) not shown" if df.height > top else None))
    for column in ("error", "rows", f"e.g. {idc}"):
        table.add_column(column, overflow="fold", justify="right" if column == "rows" else
                         "left")
    for row in df.head(top).iter_rows(named=True):
        table.add_row(escape(row["error"]), f"{row['rows']:,}",
                      escape(", ".join(str(i) for i in row["ids"])))
    if df.is_empty():
        table.add_row("(none)", "0", "")
    return table


def _sample_table(view: pl.LazyFrame, n: int) -> Table:
    return _frame_table(view.head(n).collect(), f"sample rows (first {n})")


def sql_table(output: pl.LazyFrame, latest: pl.LazyFrame, sql: str, rows: int) -> Table:
    """The result of ``sql`` (polars SQL) over tables ``output`` and ``latest``, at most
    ``rows`` rows; InspectError with polars' message when the query cannot run."""
    context = pl.SQLContext(frames={"output": output, "latest": latest})
    try:
        df = context.execute(sql, eager=False).head(rows + 1).collect()
    except pl.exceptions.PolarsError as exc:
        # polars appends the plan it resolved; the first paragraph is the message
        message = str(exc).split("\n\nResolved plan")[0].strip()
        raise InspectError(f"--sql: {message}") from None
    more = df.height > rows
    return _frame_table(df.head(rows), "--sql result" + (
        f" (first {rows} rows; --rows N shows more)" if more else f" ({df.height} row(s))"))


def _frame_table(df: pl.DataFrame, title: str) -> Table:
    table = Table(title=escape(title))
    for name in df.columns:
        table.add_column(escape(name), overflow="fold", max_width=48)
    for row in df.iter_rows():
        table.add_row(*(escape(_cell(v)) for v in row))
    return table


def _cell(value: object) -> str:
    """A value, short: lists as their first three items and length, floats to 4 places."""
    if value is None:
        return ""
    if isinstance(value, list):
        head = ", ".join(f"{x:.3f}" if isinstance(x, float) else str(x) for x in value[:3])
        return f"[{head}{', …' if len(value) > 3 else ''}] ({len(value)})"
    if isinstance(value, float):
        return f"{value:.4f}"
    text = str(value)
    return text[:60].replace("\n", " ") + "…" if len(text) > 60 else text
