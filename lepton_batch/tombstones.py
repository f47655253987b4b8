"""``output.tombstones``: a row that marks an id deleted on the night it left the input.

An incremental output is a history, so an id that disappears keeps its last row, and
``latest`` would show it for ever. With tombstones, the night an id is gone its partition
gets one row for it: the id, ``deleted`` true, the job fingerprint and run id, every other
column null. ``latest`` leaves such ids out (incremental.latest_rows); an id that comes back
is computed again. The driver writes these rows (no model runs for them) as one more part,
published or committed with the run's shards.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lepton_batch.manifest import MANIFEST_DIR, ShardRecord, write_atomic, write_record
from lepton_batch.runner import RunContext

# The part's name in place of a shard fingerprint: run_date=D/part-deleted-<run id>.parquet
TOMBSTONES = "deleted"


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


def write_tombstones(ctx: RunContext, id_column: str, ids: pa.Array,
                     compression: str) -> ShardRecord:
    """Write this run's tombstones as a part (staged, or into the Delta partition) and its
    record, like a shard's; the caller publishes or commits it with the others."""
    start = time.perf_counter()
    meta = {**ctx.file_metadata, "shard": TOMBSTONES, "source": "ids gone from the input"}
    table = tombstone_table(ctx.schema.with_metadata({"lepton_batch": json.dumps(meta)}),
                            id_column, ids, ctx.job_fingerprint, ctx.run_id)
    if ctx.delta_partition:
        rel = Path(ctx.delta_partition) / f"part-{TOMBSTONES}-{ctx.run_id}.parquet"
    else:
        rel = Path(ctx.staging) / f"part-{TOMBSTONES}.parquet"
    codec = None if compression == "none" else compression
    write_atomic(ctx.output_root / rel, lambda fh: pq.write_table(table, fh, compression=codec))
    record = ShardRecord(
        shard_index=-1, shard_fingerprint=TOMBSTONES, job_fingerprint=ctx.job_fingerprint,
        run_id=ctx.run_id, source="ids gone from the input", row_groups=[], part=str(rel),
        rows=len(ids), error_rows=0, truncated_rows=0, tokens=0, padded_tokens=0,
        batches=0, seconds=round(time.perf_counter() - start, 4), model_load_seconds=0.0,
        worker="driver", finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    write_record(ctx.output_root / ctx.staging / MANIFEST_DIR, record)
    return record
