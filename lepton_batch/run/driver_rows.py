"""Rows the driver writes itself, without a model: tombstones and a backfill's restated rows.

Tombstones (``output.tombstones``): an incremental output is a history, so an id that
disappears keeps its last row, and ``latest`` would show it for ever. With tombstones, the
night an id is gone its partition gets one row for it: the id, ``deleted`` true, the job
fingerprint and run id, every other column null. ``latest`` leaves such ids out
(history.latest_rows); an id that comes back is computed again.

Restated rows: a backfill of night D writes rows at D; an id it writes that the next
published night N has no row for would read D's row as of N (``latest`` takes each id's
rows from its greatest run date). So the backfill also adds, at N, a copy of the id's rows
as they stood before D's new rows (or, with tombstones, a tombstone for an id that had
none): later nights keep saying what they said.

Each set is one more part, written where the sink says with a record like a shard's, and
published or committed with the run's shards.
"""

from __future__ import annotations

import json
import time
from datetime import date, datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lepton_batch.output.history import as_of, latest_rows, scan_output
from lepton_batch.output.manifest import MANIFEST_DIR, ShardRecord, write_atomic, write_record
from lepton_batch.plan.incremental import RowPlan
from lepton_batch.plan.work import ShardWork
from lepton_batch.store import OutputPath

# Their parts' names in place of a shard fingerprint: run_date=D/part-deleted-<run id>.parquet
TOMBSTONES = "deleted"
RESTATED = "restated"


def tombstone_table(schema: pa.Schema, id_column: str, ids: pa.Array, job_fp: str,
                    run_id: str) -> pa.Table:
    """One row per id in ``ids``, of the output ``schema``: ``deleted`` true, the job
    fingerprint and run id, nulls elsewhere."""
    n = len(ids)
    filled = {id_column: ids, "deleted": pa.array(np.ones(n, dtype=bool)),
              "job_fingerprint": pa.array([job_fp] * n, pa.string()),
              "run_id": pa.array([run_id] * n, pa.string())}
    return pa.table({f.name: filled[f.name].cast(f.type) if f.name in filled
                     else pa.nulls(n, f.type) for f in schema}, schema=schema)


def restated_table(parts: list[OutputPath], schema: pa.Schema, id_column: str, day: date,
                   ids: pa.Array, cutoff: str) -> pa.Table:
    """The rows of ``ids`` in the output as of ``day``, from runs up to run id ``cutoff``
    (not this run's, whose shards a Delta table has committed already): each id's newest
    rows, tombstones included, as written then (their run ids too), in ``schema``."""
    import polars as pl

    keys = pl.from_arrow(pa.table({id_column: ids}))
    earlier = scan_output(parts).filter(pl.col("run_id") <= cutoff)
    frame = latest_rows(as_of(earlier, day), id_column, keep_deleted=True)
    rows = frame.join(keys.lazy(), on=id_column, how="semi").collect().to_arrow()
    return pa.table({f.name: rows[f.name].cast(f.type) for f in schema}, schema=schema)


def write_driver_rows(ctx: ShardWork, id_column: str, rows_plan: RowPlan, run_date: date,
                      parts: list[OutputPath], compression: str
                      ) -> list[tuple[ShardRecord, str]]:
    """Write this run's tombstones and restated rows, each set as a part with its record;
    returns each record with the run_date its part belongs to."""
    schema = ctx.schema
    out = []
    if rows_plan.deleted:
        table = tombstone_table(schema, id_column, rows_plan.deleted, ctx.job_fingerprint,
                                ctx.run_id)
        out.append((_write(ctx, TOMBSTONES, table, run_date, "ids gone from the input",
                           compression), run_date.isoformat()))
    if rows_plan.restated:
        night = rows_plan.restate_night
        assert night is not None and rows_plan.restate_cutoff is not None
        tables = []
        if rows_plan.restate:
            tables.append(restated_table(parts, schema, id_column, run_date,
                                         rows_plan.restate, rows_plan.restate_cutoff))
        if rows_plan.restate_deleted:
            tables.append(tombstone_table(schema, id_column, rows_plan.restate_deleted,
                                          ctx.job_fingerprint, ctx.run_id))
        out.append((_write(ctx, RESTATED, pa.concat_tables(tables), night,
                           f"rows as of {run_date}, restated by a backfill", compression),
                    night.isoformat()))
    return out


def _write(ctx: ShardWork, name: str, table: pa.Table, day: date, source: str,
           compression: str) -> ShardRecord:
    start = time.perf_counter()
    meta = {**ctx.file_metadata, "shard": name, "source": source}
    table = table.replace_schema_metadata({"lepton_batch": json.dumps(meta)})
    rel = Path(ctx.sink.part_path(name, day.isoformat()))
    codec = None if compression == "none" else compression
    write_atomic(ctx.output_root / rel, lambda fh: pq.write_table(table, fh, compression=codec))
    record = ShardRecord(
        shard_index=-1, shard_fingerprint=name, job_fingerprint=ctx.job_fingerprint,
        run_id=ctx.run_id, source=source, row_groups=[], part=str(rel), rows=table.num_rows,
        error_rows=0, truncated_rows=0, tokens=0, padded_tokens=0, batches=0,
        seconds=round(time.perf_counter() - start, 4), model_load_seconds=0.0,
        worker="driver", finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    write_record(ctx.output_root / ctx.staging / MANIFEST_DIR, record)
    return record
