"""An output's history read back: every published part as one frame, each id's current
rows, the output as it stood on a night. What ``inspect --latest``, ``status``, the
incremental row plan and the driver's restated rows all read (one definition of "latest")."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lepton_batch.output.layout import PARTITION_COLUMN
from lepton_batch.store import OutputPath


def scan_output(parts: list[OutputPath], columns: list[str] | None = None):
    """A polars LazyFrame over published part files, with ``run_date`` (a date) from the
    Hive partition each lies in. ``columns``: what an object-store read fetches (local
    files are scanned lazily, so only what the query uses is read anyway)."""
    import polars as pl

    if not parts or isinstance(parts[0], Path):
        return pl.scan_parquet([str(p) for p in parts], hive_partitioning=True)
    # polars' object-store reader takes other option names than fsspec; read the few
    # columns through the fsspec filesystem that wrote them.
    tables = []
    for p in parts:
        names = pq.read_schema(p.path, filesystem=p.fs).names
        table = pq.read_table(p.path, filesystem=p.fs, columns=None if columns is None else
                              [c for c in columns if c in names])
        day = date.fromisoformat(p.parent.name.partition("=")[2])
        tables.append(table.append_column(PARTITION_COLUMN, pa.array([day] * table.num_rows,
                                                                  pa.date32())))
    return pl.from_arrow(pa.concat_tables(tables)).lazy()


def latest_rows(frame, id_column: str, keep_deleted: bool = False):
    """Each id's current rows: every row of its newest run (greatest ``run_date``, then
    ``run_id``, which starts with the run's start time). An id that repeats in the input
    has one row per input row there, since a run computes all of an id's rows or none.
    Rows marking an id deleted (``deleted`` true, output.tombstones) remove the id, unless
    ``keep_deleted``. Equivalent SQL: ``qualify rank() over (partition by id order by
    run_date desc, run_id desc) = 1``, then ``where not deleted``."""
    import polars as pl

    order = pl.col(PARTITION_COLUMN).cast(pl.String) + "/" + pl.col("run_id")
    newest = frame.filter(order == order.max().over(id_column))
    if keep_deleted or "deleted" not in frame.collect_schema().names():
        return newest
    return newest.filter(~pl.col("deleted").fill_null(False))


def as_of(frame, day: date):
    """The output as it stood for night ``day``: its partitions up to and including it."""
    import polars as pl

    return frame.filter(pl.col(PARTITION_COLUMN) <= pl.lit(day))
