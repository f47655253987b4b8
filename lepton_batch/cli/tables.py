"""The tables that show an output's rows: what ``inspect OUTPUT`` prints, and submit's first
rows and rows per label (the same tables, over the current rows). The reading is
``lepton_batch.output.readers``'; this module only lays it out. Imported lazily: it
imports polars (through the readers), which submit's driver otherwise does without."""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape
from rich.table import Table

from lepton_batch.output import readers
from lepton_batch.output.contract import SCHEMA_FILE, read_contract
from lepton_batch.output.dataset import published_parts, staged_count

SAMPLE_ROWS = 5  # sample rows shown by inspect when --rows is not given
SQL_ROWS = 100  # result rows shown for --sql when --rows is not given
PREVIEW_ROWS = 5  # rows submit's summary shows
# submit's preview leaves out the columns that are long or say little at a glance
PREVIEW_HIDDEN = ("labels", "scores", "num_tokens", "truncated")


def inspect_tables(root: Path, latest: bool = False, sql: str | None = None,
                   rows: int | None = None) -> list[Table]:
    """What ``lepton-batch inspect OUTPUT`` prints.

    Without ``sql``: an overview, the schema, rows per partition, the label distribution
    (classify), embedding L2 norms (embed) or finish reasons (generate), errors by message
    and ``rows`` sample rows (default 5). With ``sql``: only its result, at most ``rows``
    rows (default 100); table ``output`` is every row, ``latest`` the newest row per id.
    ``latest``: every figure (and table ``output``) counts only the newest row per id.
    """
    out = readers.read_rows(root)
    view = out.newest if latest else out.every
    if sql is not None:
        limit = SQL_ROWS if rows is None else rows
        df, more = readers.run_sql(view, out.newest, sql, limit)
        return [frame_table(df, "--sql result" + (
            f" (first {limit} rows; --rows N shows more)" if more else f" ({df.height} row(s))"))]
    tables = [_overview(root, view, out.id_column, latest), _schema_table(root, view),
              _partitions_table(root, view, latest)]
    names = view.collect_schema().names()
    if "label" in names:
        tables.append(counts_table(readers.value_counts(view, "label", "score"), "label",
                                   "score", "rows per label"))
    if "finish_reason" in names:
        tables.append(counts_table(readers.value_counts(view, "finish_reason"),
                                   "finish_reason", None, "rows per finish_reason"))
    if "embedding" in names:
        tables.append(_norms_table(readers.embedding_norms(view)))
    n = SAMPLE_ROWS if rows is None else rows
    tables += [_errors_table(readers.errors_by_message(view, out.id_column), out.id_column),
               frame_table(view.head(n).collect(), f"sample rows (first {n})")]
    return tables


def preview_table(root, id_column: str, current: bool, n: int = PREVIEW_ROWS) -> Table:
    """Submit's first output rows: ``current`` (mode incremental), the first current rows by
    id; else the first rows of the first part file."""
    df = readers.first_rows(root, id_column, current, n)
    title = (f"first {min(n, df.height)} current rows of the output (newest per id, by id)"
             if current else f"first {min(n, df.height)} rows of the output")
    return frame_table(df.drop(PREVIEW_HIDDEN, strict=False), title)


def label_counts_table(root, id_column: str, current: bool) -> Table:
    """Submit's rows per label (classify), over the current rows: in mode incremental
    (``current``) the newest row per id, not the history of every night."""
    title = "rows per label (top 1)" + (", over the current rows (newest per id)"
                                        if current else "")
    frame = readers.label_rows(root, id_column, current)
    return counts_table(readers.value_counts(frame, "label", "score"), "label", "score", title)


def counts_table(df, column: str, score: str | None, title: str) -> Table:
    """Rows per value of ``column`` (``readers.value_counts``), their share and the mean of
    ``score``."""
    total = max(int(df["rows"].sum()), 1)
    table = Table(title=title)
    for c in (column, "rows", "share") + ((f"mean {score}",) if score else ()):
        table.add_column(c)
    for row in df.iter_rows(named=True):
        mean = [] if not score else ["-" if row["mean"] is None else f"{row['mean']:.3f}"]
        table.add_row(escape(str(row[column])), f"{row['rows']:,}",
                      f"{row['rows'] / total:.1%}", *mean)
    return table


def frame_table(df, title: str) -> Table:
    """A polars DataFrame, each value short (``cell``)."""
    table = Table(title=escape(title))
    for name in df.columns:
        table.add_column(escape(name), overflow="fold", max_width=48)
    for row in df.iter_rows():
        table.add_row(*(escape(cell(v)) for v in row))
    return table


def cell(value: object) -> str:
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


def _overview(root: Path, view, idc: str, latest: bool) -> Table:
    contract = read_contract(root) or {}
    table = Table(title=f"output {escape(str(root))}" + (" (newest row per id)" if latest
                                                         else ""), show_header=False)
    for key in ("job", "task", "layout", "output_format"):
        if key in contract:
            table.add_row(key, escape(str(contract[key])))
    n, ids = readers.row_count(view, idc)
    table.add_row("rows", f"{n:,}")
    table.add_row(f"distinct ids ({escape(idc)})", f"{ids:,}")
    if latest and n > ids:
        table.add_row("repeated ids", f"{n - ids:,} more row(s) than ids: an id that repeats in "
                      "the input has one row per input row")
    if not published_parts(root):
        table.add_row("published", f"nothing yet ({staged_count(root)} shard(s) staged by an "
                      "unfinished run)")
    return table


def _schema_table(root: Path, view) -> Table:
    stated = {f["name"]: f["type"] for f in (read_contract(root) or {}).get("fields", [])}
    table = Table(title="schema (run_date: the partition)", caption=None if stated else
                  f"no {SCHEMA_FILE}: written by a lepton-batch from before schema contracts")
    for column in ("column", *(["type"] if stated else []), "polars type"):
        table.add_column(column)
    for name, dtype in view.collect_schema().items():
        table.add_row(escape(name), *([escape(stated.get(name, ""))] if stated else []),
                      escape(str(dtype)))
    return table


def _partitions_table(root: Path, view, latest: bool) -> Table:
    df = readers.partitions(view)
    has_runs = "runs" in df.columns
    table = Table(title="rows per partition" + (" (newest row per id)" if latest else ""))
    columns = ["run_date", "rows", "errors"] + ["runs"] * has_runs + ["part files"] * (not latest)
    for column in columns:
        table.add_column(column, justify="left" if column == "run_date" else "right")
    for row in df.iter_rows(named=True):
        cells = [str(row["run_date"]), f"{row['rows']:,}", f"{row['errors']:,}"]
        if has_runs:
            cells.append(f"{row['runs']:,}")
        if not latest:
            cells.append(str(readers.part_files(root, row["run_date"])))
        table.add_row(*cells)
    return table


def _norms_table(stats: dict) -> Table:
    table = Table(title="embedding L2 norms")
    for column in ("rows with an embedding", "dim", "min", "mean", "max"):
        table.add_column(column, justify="right")
    table.add_row(f"{stats['n']:,}", str(stats["dim"] or "-"),
                  *("-" if stats[k] is None else f"{stats[k]:.4f}" for k in ("min", "mean",
                                                                              "max")))
    return table


def _errors_table(df, idc: str, top: int = 10) -> Table:
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
