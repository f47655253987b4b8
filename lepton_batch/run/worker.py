"""One shard, start to finish, on whichever worker runs it. Knows nothing of Dask.

read (only the needed columns) -> prepare text (bad rows recorded) -> tokenize -> token-
budget batches -> pipeline -> Arrow table in input order -> part file (atomic) -> record.
What to do comes in one :class:`~lepton_batch.plan.work.ShardWork`, planned on the driver;
the worker keeps its engines and pipelines between shards.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lepton_batch.engine import BatchStats, EngineCache, Tokenized
from lepton_batch.engine.calibration import gate_sample
from lepton_batch.faults import checkpoint
from lepton_batch.job.shards import Shard, read_shard, redact
from lepton_batch.job.spec import EngineSpec
from lepton_batch.output.manifest import MANIFEST_DIR, ShardRecord, write_atomic, write_record
from lepton_batch.pipelines import Pipeline, encoder_task, make_pipeline
from lepton_batch.plan.incremental import content_hashes, first_occurrences
from lepton_batch.plan.work import ShardWork, TaskWork

if TYPE_CHECKING:
    from lepton_batch.engine.decoder import Decoder
    from lepton_batch.engine.encoder import Encoder


Meter = Callable[[str], AbstractContextManager]
LENGTH_BINS = 32  # sequence-length histogram bins per record, each max_length / 32 wide
BATCH_BINS = 16  # batch-size histogram: bin k holds batches of 2**k .. 2**(k+1) - 1 rows


class Stages:
    """Wall seconds per stage of one shard (read, prepare, warm_up, load, tokenize, compute,
    write). warm_up: waiting for the worker's start-up imports (``cluster.warm_up``).

    ``meter``: an outer timer each stage also runs under, e.g. Dask's
    ``context_meter.meter``, so the dashboard's fine performance metrics show the same
    split; None outside Dask.
    """

    def __init__(self, meter: Meter | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self._meter = meter

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        with self._meter(name) if self._meter else contextlib.nullcontext():
            yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.seconds.items()}


def length_histogram(lengths: np.ndarray, limit: int) -> tuple[int, list[int]]:
    """(bin width, counts) of token lengths over ``LENGTH_BINS`` bins up to ``limit``
    tokens (longer rows land in the last bin)."""
    width = max(1, -(-limit // LENGTH_BINS))
    idx = np.minimum(np.asarray(lengths, dtype=np.int64) // width, LENGTH_BINS - 1)
    return width, np.bincount(idx, minlength=LENGTH_BINS).tolist()


def batch_histogram(sizes: list[int]) -> list[int]:
    """Batches by rows, in power-of-two bins (see ``BATCH_BINS``)."""
    if not sizes:
        return [0] * BATCH_BINS
    idx = np.minimum(np.log2(np.maximum(sizes, 1)).astype(np.int64), BATCH_BINS - 1)
    return np.bincount(idx, minlength=BATCH_BINS).tolist()


def error_counts(errors: pa.Array, top: int = 20) -> dict[str, int]:
    """Rows per error message, numbers blanked so that messages of one kind group
    ("invalid UTF-8 at byte N"); the ``top`` most frequent."""
    counts = Counter(re.sub(r"\d+", "N", e) for e in errors.drop_null().to_pylist())
    return dict(counts.most_common(top))


def _expand(values: pa.Array, valid: np.ndarray, n: int,
            failed: np.ndarray | None = None) -> pa.Array:
    """Place k results at their rows in a length-n array; every other row is null.

    valid: (k,) int64 shard positions of the k results; failed: int64 shard positions
    (a subset of ``valid``) whose result is void and must be null too.
    """
    positions = np.zeros(n, dtype=np.int64)
    positions[valid] = np.arange(len(valid))
    missing = np.ones(n, dtype=bool)
    missing[valid] = False
    if failed is not None:
        missing[failed] = True
    return values.take(pa.array(positions, mask=missing))


def merge_errors(errors: pa.Array, rows: np.ndarray, reasons: list[str]) -> pa.Array:
    """``errors`` (n,) string with ``reasons[j]`` set at shard position ``rows[j]``."""
    if not len(rows):
        return errors
    mask = np.zeros(len(errors), dtype=bool)
    mask[rows] = True
    order = np.argsort(rows, kind="stable")  # replace_with_mask fills in position order
    return pc.replace_with_mask(errors, pa.array(mask),
                                pa.array([reasons[j] for j in order], pa.string()))


@dataclass(frozen=True)
class Computed:
    """A table's rows computed (:func:`compute_rows`): the task's ``columns`` plus
    ``num_tokens``, ``truncated``, ``error`` in row order, the engine that ran them, its
    load time (0.0: reused), the token lengths of the rows that ran, every row's
    ``content_hash`` and how many distinct rows were computed."""

    columns: dict[str, pa.Array]
    engine: Encoder | Decoder
    load_seconds: float
    lengths: np.ndarray
    hashes: pa.Array
    unique_rows: int


def compute_rows(table: pa.Table, work: TaskWork, pipeline: Pipeline, cache: EngineCache,
                 stats: BatchStats, stage: Stages) -> Computed:
    """The task over ``table``'s rows (a shard, or a Dask DataFrame's partition), bad rows
    recorded in ``error``. Rows with the same content (and, for sampled generation, the
    same id) are computed once and the result copied to each."""
    n = table.num_rows
    with stage("prepare"):
        hashes = content_hashes(table, pipeline.columns)
        keys = content_hashes(table, [work.input.id_column, *pipeline.columns]) if (
            pipeline.row_keyed) else hashes
        first, inverse = first_occurrences(keys)
        unique = table.take(pa.array(first)) if len(first) < n else table
    computed, engine, load_seconds, lengths = _compute(pipeline, unique, work, cache, stats,
                                                       stage)
    if len(first) < n:
        fan_out = pa.array(inverse, pa.int64())
        computed = {name: arr.take(fan_out) for name, arr in computed.items()}
    return Computed(computed, engine, load_seconds, lengths, hashes, len(first))


def _compute(pipeline: Pipeline, table: pa.Table, work: TaskWork, cache: EngineCache,
             stats: BatchStats, stage: Stages
             ) -> tuple[dict[str, pa.Array], Encoder | Decoder, float, np.ndarray]:
    """The task's columns plus ``num_tokens``, ``truncated``, ``error`` for ``table``'s rows
    (in row order), the engine that ran them, the seconds it took to load (0.0 when the
    worker's cached engine was reused) and the token lengths of the rows that ran.
    ``stats`` collects the batch figures as batches finish."""
    n = table.num_rows
    with stage("prepare"):
        texts, prep = pipeline.prepare(table)
    loads, config = cache.loads, work.engine
    chunkable = getattr(pipeline, "chunkable", False)
    pre = None
    if chunkable:  # the first shard of a warming worker: tokenize while it imports
        with stage("tokenize"):
            pre = cache.pretokenize(config, texts)
    with stage("warm_up"):  # what is left of the worker's imports and CUDA context
        cache.wait_for_warm_up()
    with stage("load"):
        engine = cache.get(config, lambda: gate_sample(texts, work.quality_sample_rows,
                                                        work.settings.apply))
    load_seconds = stage.seconds["load"] if cache.loads > loads else 0.0
    if chunkable:
        results, lengths, truncated = _run_chunks(pipeline, engine, texts, work.batching,
                                                  stats, stage, engine.adopt(pre))
    else:
        with stage("tokenize"):
            tok = pipeline.tokenize(engine, texts)
        with stage("compute"):
            results = pipeline.run(engine, tok, work.batching, stats)
        lengths, truncated = tok.lengths, tok.truncated
    # Rows the engine could not run (out of memory even alone): null results, an error.
    failed = prep.valid[np.asarray(stats.failed_rows, dtype=np.int64)]
    # A row that ran but whose result is unusable (a structured answer cut short) keeps its
    # results and gets the pipeline's reason in ``error``.
    ran_errors = results.pop("error", None)
    out = {name: _expand(arr, prep.valid, n, failed) for name, arr in results.items()}
    out["num_tokens"] = _expand(pa.array(lengths, pa.int32()), prep.valid, n)
    out["truncated"] = _expand(pa.array(truncated, pa.bool_()), prep.valid, n)
    out["error"] = merge_errors(prep.errors, failed, stats.failed_reasons)
    if ran_errors is not None:
        out["error"] = pc.coalesce(out["error"], _expand(ran_errors, prep.valid, n, failed))
    return out, engine, load_seconds, np.asarray(lengths)


FIRST_CHUNK_ROWS = 1024  # the first chunk of a chunked shard: its first batch starts soon


def chunk_bounds(n: int, chunk_rows: int | None) -> list[tuple[int, int]]:
    """[start, end) row ranges covering 0..n-1 in order: one range without ``chunk_rows``;
    else a first range of at most ``FIRST_CHUNK_ROWS`` and then ``chunk_rows`` each. Always
    at least one range (an empty shard runs as one empty chunk)."""
    if not chunk_rows or n <= chunk_rows:
        return [(0, n)]
    bounds, start, size = [], 0, min(chunk_rows, FIRST_CHUNK_ROWS)
    while start < n:
        bounds.append((start, min(n, start + size)))
        start, size = start + size, chunk_rows
    return bounds


def _run_chunks(pipeline: Pipeline, engine: Encoder, texts: list[str], spec: EngineSpec,
                stats: BatchStats, stage: Stages, ready: Tokenized | None = None
                ) -> tuple[dict[str, pa.Array], np.ndarray, np.ndarray]:
    """Tokenize and run ``texts`` in chunks (``Encoder.tokenize_chunk_rows``: on CUDA 8192
    by default), the next chunk tokenized on a helper thread while the engine runs this
    one: on a GPU the device no longer waits for the whole shard's tokenization. Returns
    the task's arrays and the rows' token lengths and truncation flags, in row order.

    ``ready``: the ids of the leading rows, tokenized already (``EngineCache.pretokenize``);
    they run as the first chunk, and the rest is chunked after them.
    The ``tokenize`` stage is the time spent waiting for tokens, ``compute`` the runs.
    ``stats.failed_rows`` are shifted to shard-wide positions; an out-of-memory cap found
    in one chunk holds for the next.
    """
    chunk_rows = engine.tokenize_chunk_rows(spec.tokenize_chunk_rows)
    done = len(ready) if ready is not None else 0
    bounds = [(0, done)] if done else []
    if done < len(texts) or not bounds:
        bounds += [(done + a, done + b) for a, b in chunk_bounds(len(texts) - done, chunk_rows)]
    parts, lengths, truncated = [], [], []
    with ThreadPoolExecutor(1, thread_name_prefix="lepton-tokenize") as pool:
        if done:
            ahead: Future[Tokenized] = Future()
            ahead.set_result(ready)
        else:
            ahead = pool.submit(pipeline.tokenize, engine, texts[slice(*bounds[0])])
        for k, (start, _) in enumerate(bounds):
            with stage("tokenize"):
                tok = ahead.result()
            if k + 1 < len(bounds):
                ahead = pool.submit(pipeline.tokenize, engine, texts[slice(*bounds[k + 1])])
            if stats.max_rows_cap is not None:
                spec = spec.model_copy(update={"max_rows_per_batch": stats.max_rows_cap})
            failed_before = len(stats.failed_rows)
            with stage("compute"):
                parts.append(pipeline.run(engine, tok, spec, stats))
            stats.failed_rows[failed_before:] = [
                start + r for r in stats.failed_rows[failed_before:]]
            lengths.append(tok.lengths)
            truncated.append(tok.truncated)
    results = {name: pa.concat_arrays([part[name] for part in parts]) for name in parts[0]}
    return results, np.concatenate(lengths), np.concatenate(truncated)


class PipelineCache:
    """The pipelines built in this process for the work it serves, next to its engines:
    built once per worker, not per shard. A pipeline keeps one shard's state between
    ``prepare`` and ``run``, so each shard running at the same time (a worker with
    several threads) checks out its own; a new work (another run) drops the old ones."""

    def __init__(self) -> None:
        self._key: tuple[str, str] | None = None
        self._idle: list[Pipeline] = []
        self._lock = threading.Lock()
        self.builds = 0

    @contextlib.contextmanager
    def checkout(self, work: TaskWork) -> Iterator[Pipeline]:
        """An idle pipeline for ``work``, built if there is none; back when the block ends."""
        with self._lock:
            if work.key != self._key:
                self._key, self._idle = work.key, []
            pipeline = self._idle.pop() if self._idle else None
        if pipeline is None:
            pipeline = make_pipeline(work.task, work.model, work.settings, work.input)
            with self._lock:
                self.builds += 1
        try:
            yield pipeline
        finally:
            with self._lock:
                if self._key == work.key:
                    self._idle.append(pipeline)


def process_shard(shard: Shard, work: ShardWork, cache: EngineCache,
                  rows: np.ndarray | None = None, *, pipelines: PipelineCache | None = None,
                  meter: Meter | None = None, stats: BatchStats | None = None) -> ShardRecord:
    """Run the work's task over one shard and write its part file and manifest record.

    ``rows``: (m,) int64 positions inside the shard to compute (an incremental run's
    changed rows); None computes every row. Rows with the same content (and, for sampled
    generation, the same id) are computed once and the result copied to each.
    ``pipelines``: this worker's pipelines (None: one built for this shard alone).
    ``meter``: see :class:`Stages`. ``stats``: filled as batches finish, so that another
    thread can report progress inside the shard.
    """
    start = time.perf_counter()
    stats = BatchStats() if stats is None else stats
    if not encoder_task(work.task):
        cache.wait_for_warm_up()  # an encoder's rows are read and tokenized meanwhile
    with (pipelines or PipelineCache()).checkout(work) as pipeline:
        return _process(shard, work, pipeline, cache, rows, Stages(meter), stats, start)


def _process(shard: Shard, ctx: ShardWork, pipeline: Pipeline, cache: EngineCache,
             rows: np.ndarray | None, stage: Stages, stats: BatchStats,
             start: float) -> ShardRecord:
    inp = ctx.input
    with stage("read"):
        table = read_shard(shard, list(ctx.columns))
        if rows is not None:
            table = table.take(pa.array(rows, pa.int64()))
    n = table.num_rows
    rows_out = compute_rows(table, ctx, pipeline, cache, stats, stage)
    computed, engine, lengths = rows_out.columns, rows_out.engine, rows_out.lengths

    meta = {**ctx.file_metadata, "shard": shard.fingerprint, "source": redact(shard.path),
            "row_groups": ",".join(map(str, shard.row_groups)),
            "first_row": shard.first_row,  # the shard's first row in the source file
            "dtype": str(engine.dtype).removeprefix("torch."),
            "quantization": engine.quantization,
            "attention": engine.attn_implementation, "forward": engine.forward_reason}
    if engine.quality is not None:
        meta["quality"] = json.dumps(engine.quality.to_dict())
    schema = ctx.schema.with_metadata({"lepton_batch": json.dumps(meta)})
    columns_out = {c: table[c].cast(schema.field(c).type)
                   for c in (inp.id_column, *inp.passthrough_columns)}
    columns_out |= {name: arr.cast(schema.field(name).type) for name, arr in computed.items()}
    columns_out["content_hash"] = rows_out.hashes
    columns_out["job_fingerprint"] = pa.array([ctx.job_fingerprint] * n, pa.string())
    columns_out["run_id"] = pa.array([ctx.run_id] * n, pa.string())
    if "deleted" in schema.names:  # output.tombstones: a computed row is a live one
        columns_out["deleted"] = pa.array(np.zeros(n, dtype=bool))
    out = pa.table(columns_out, schema=schema)
    bin_width, length_counts = length_histogram(
        lengths, ctx.settings.max_length or int(lengths.max(initial=1)))

    rel = Path(ctx.sink.part_path(shard.fingerprint))  # readers see it once the sink says
    codec = None if ctx.compression == "none" else ctx.compression
    checkpoint("shard-computed")
    with stage("write"):
        write_atomic(ctx.output_root / rel, lambda fh: pq.write_table(out, fh, compression=codec))
    record = ShardRecord(
        shard_index=shard.index,
        shard_fingerprint=shard.fingerprint,
        job_fingerprint=ctx.job_fingerprint,
        run_id=ctx.run_id,
        source=redact(shard.path),
        row_groups=list(shard.row_groups),
        first_row=shard.first_row,
        part=str(rel),
        rows=n,
        error_rows=n - out["error"].null_count,
        truncated_rows=int(pc.sum(out["truncated"]).as_py() or 0),
        deduplicated_rows=n - rows_out.unique_rows,
        tokens=stats.tokens,
        padded_tokens=stats.padded_tokens,
        batches=stats.batches,
        seconds=round(time.perf_counter() - start, 4),
        model_load_seconds=round(rows_out.load_seconds, 4),
        worker=f"{socket.gethostname()}:{os.getpid()}",
        finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        oom_splits=stats.oom_splits,
        engine=engine.describe(),
        stage_seconds=stage.rounded(),
        length_bin_width=bin_width,
        length_histogram=length_counts,
        batch_rows_histogram=batch_histogram(stats.sizes),
        errors_by_message=error_counts(out["error"]),
        first_batch_at=stats.first_batch_at,
    )
    checkpoint("part-written")
    write_record(ctx.output_root / ctx.staging / MANIFEST_DIR, record)
    return record
