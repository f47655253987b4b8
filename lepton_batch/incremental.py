"""Row-level incremental runs: content hashes, the rows a run must compute, and identical
rows computed once.

A row's ``content_hash`` covers the input columns its task reads (the text column, or a
prompt template's fields), so a nightly run computes only rows whose (id, content_hash)
has no output under the job fingerprint yet; everything else was computed before. Within
a shard, rows with the same content share one model call.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lepton_batch.shards import InputReadError, Shard, read_shards
from lepton_batch.store import OutputPath

log = logging.getLogger(__name__)


def _encode(value: object) -> bytes:
    """One value as unambiguous bytes: a type tag, a length, the content. Text read as
    string or as binary UTF-8 hashes the same, so a file rewritten with the other type
    does not look changed."""
    if value is None:
        return b"\x00"
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogatepass")
    if isinstance(value, bytes):
        return b"t" + len(value).to_bytes(8, "little") + value
    text = repr(value).encode()
    return b"v" + len(text).to_bytes(8, "little") + text


def content_hashes(table: pa.Table, columns: list[str]) -> pa.Array:
    """(n,) string: 16 hex digits of BLAKE2b over each row's values in ``columns``.

    Stable across versions, machines and processes (unlike polars' or Python's hash).
    """
    values = [table[c].to_pylist() for c in columns]
    out = []
    for row in zip(*values, strict=True) if values else ([()] * table.num_rows):
        h = hashlib.blake2b(digest_size=8)
        for v in row:
            h.update(_encode(v))
        out.append(h.hexdigest())
    return pa.array(out, pa.string())


def first_occurrences(keys: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Distinct keys: ``first`` (k,) int64, ascending row of each key's first occurrence,
    and ``inverse`` (n,) int64, each row's index into ``first``."""
    if len(keys) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    inverse = pc.index_in(keys, value_set=pc.unique(keys)).to_numpy().astype(np.int64)
    # pc.unique keeps first-occurrence order, so key j first appears before key j + 1.
    _, first = np.unique(inverse, return_index=True)
    return first.astype(np.int64), inverse


@dataclass(frozen=True)
class RowPlan:
    """What an incremental run computes: shard fingerprint -> (m,) int64 row positions
    inside that shard, ascending. Shards with nothing to compute are absent."""

    rows: dict[str, np.ndarray] = field(default_factory=dict)
    input_rows: int = 0
    unchanged: int = 0  # rows whose (id, content_hash) already has output
    gone: int = 0  # ids with output that no input row has any more
    # When no output row is this job fingerprint's: the fingerprints the output holds (the
    # model revision or task changed, so every row is computed again).
    previous_fingerprints: list[str] = field(default_factory=list)

    @property
    def to_compute(self) -> int:
        return sum(len(r) for r in self.rows.values())

    def describe(self) -> str:
        return (f"{self.input_rows:,} input rows, {self.unchanged:,} unchanged, "
                f"{self.to_compute:,} to compute in {len(self.rows)} shard(s); {self.gone:,} "
                "id(s) with output are gone from the input")


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
        table = pq.read_table(p.path, columns=columns, filesystem=p.fs)
        day = date.fromisoformat(p.parent.name.partition("=")[2])
        tables.append(table.append_column("run_date", pa.array([day] * table.num_rows,
                                                                  pa.date32())))
    return pl.from_arrow(pa.concat_tables(tables)).lazy()


def latest_rows(frame, id_column: str):
    """The rows of each id's newest run (greatest ``run_date``, then ``run_id``, which starts
    with the run's start time): the output's current value per id."""
    import polars as pl

    order = pl.col("run_date").cast(pl.String) + "/" + pl.col("run_id")
    return frame.filter(order == order.max().over(id_column))


def plan_rows(shards: list[Shard], id_field: pa.Field, columns: list[str], job_fp: str,
              parts: list[OutputPath]) -> RowPlan:
    """The input rows an incremental run computes: those whose (id, content_hash) is not
    the id's current output row under ``job_fp`` (polars: a lazy scan of the published
    ``parts``, then an anti-join). Reads only the id and hashed columns of the input.

    Comparing with each id's newest row, not with any earlier one, keeps "latest row per
    id" right when a text changes back to an older version. A row with a null id is always
    computed (it cannot be matched).
    """
    import polars as pl

    idc = id_field.name
    frames, unreadable = [], {}
    # the row ranges of one large row group: that group is read once
    for shard, table in read_shards(shards, list(dict.fromkeys([idc, *columns]))):
        if isinstance(table, InputReadError):
            # Computed as a whole: its worker fails it with this error, so the run reports
            # the file and row group and does not publish.
            log.warning("%s", table)
            unreadable[shard.fingerprint] = np.arange(shard.num_rows, dtype=np.int64)
            continue
        frames.append(pl.from_arrow(pa.table({
            "shard": pa.array(np.full(table.num_rows, shard.index, dtype=np.int32)),
            "pos": pa.array(np.arange(table.num_rows, dtype=np.int64)),
            idc: table[idc].cast(id_field.type),
            "content_hash": content_hashes(table, columns),
        })))
    inputs = pl.concat(frames) if frames else pl.DataFrame()
    unchanged = gone = 0
    previous: list[str] = []
    if not parts or inputs.is_empty():
        todo = inputs
    else:
        columns = [idc, "content_hash", "job_fingerprint", "run_id"]
        latest = latest_rows(scan_output(parts, columns), idc).select(
            idc, "content_hash", "job_fingerprint").collect()
        done = latest.filter(pl.col("job_fingerprint") == job_fp).select(idc, "content_hash")
        todo = inputs.join(done, on=[idc, "content_hash"], how="anti")
        unchanged = inputs.height - todo.height
        gone = latest.select(idc).unique().join(inputs.select(idc).unique(), on=idc,
                                                how="anti").height
        if done.is_empty():
            previous = sorted(latest["job_fingerprint"].unique().to_list())
    by_index = {s.index: s.fingerprint for s in shards}
    rows = dict(unreadable)
    if not todo.is_empty():
        for (index,), group in todo.group_by("shard"):
            rows[by_index[index]] = np.sort(group["pos"].to_numpy()).astype(np.int64)
    plan = RowPlan(rows=rows, input_rows=inputs.height, unchanged=unchanged, gone=gone,
                   previous_fingerprints=previous)
    log.info("incremental: %d input rows, %d unchanged, %d to compute in %d shard(s), %d ids "
             "gone from the input", plan.input_rows, plan.unchanged, plan.to_compute,
             len(rows), plan.gone)
    return plan
