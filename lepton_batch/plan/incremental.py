"""Row-level incremental runs: content hashes, the rows a run must compute, and identical
rows computed once.

A row's ``content_hash`` covers the input columns its task reads (the text column, or a
prompt template's fields), so a nightly run computes only rows whose (id, content_hash)
has no output under the job fingerprint yet; everything else was computed before. Within
a shard, rows with the same content share one model call.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from datetime import date

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lepton_batch.job.shards import InputReadError, Shard, read_shards
from lepton_batch.output.history import as_of, latest_rows, scan_output
from lepton_batch.output.layout import PARTITION_COLUMN
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
    unchanged: int = 0  # rows of ids whose rows in the output as of the run date match
    gone: int = 0  # ids with output (as of the run date) that no input row has any more
    # When no output row is this job fingerprint's: the fingerprints the output holds (the
    # model revision or task changed, so every row is computed again).
    previous_fingerprints: list[str] = field(default_factory=list)
    # output.tombstones: the gone ids, each to get a ``deleted`` row in this run's partition
    deleted: pa.Array | None = None
    # A backfill: the next published night after its run date, the ids whose rows it writes
    # and that night has none of (they would read the backfill's row there), to be restated
    # there as they were (``restate``: a copy of their rows as of the run date;
    # ``restate_deleted``: ids with no row before, marked deleted, output.tombstones only).
    restate_night: date | None = None
    restate_cutoff: str | None = None  # that night's newest run id: the rows it saw
    restate: pa.Array | None = None
    restate_deleted: pa.Array | None = None

    @property
    def to_compute(self) -> int:
        return sum(len(r) for r in self.rows.values())

    @property
    def restated(self) -> int:
        return sum(len(a) for a in (self.restate, self.restate_deleted) if a is not None)

    def describe(self) -> str:
        return (f"{self.input_rows:,} input rows, {self.unchanged:,} unchanged, "
                f"{self.to_compute:,} to compute in {len(self.rows)} shard(s); {self.gone:,} "
                "id(s) with output are gone from the input"
                + ("" if self.deleted is None else f" ({len(self.deleted):,} marked deleted)")
                + (f"; {self.restated:,} id(s) restated as they were on {self.restate_night}"
                   if self.restated else ""))


def newest_night(parts: list[OutputPath], reports: list[OutputPath]) -> date | None:
    """The greatest run date of the output: of a partition with published ``parts``, or of
    a published run (its ``report.json`` among ``reports``; a night with nothing to
    compute adds no partition), or None."""
    days = [p.parent.name.partition("=")[2] for p in parts]
    for path in reports:
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a run killed while writing it
        if isinstance(report, dict) and report.get("published"):
            days.append(str(report.get("run_date") or ""))
    return max((date.fromisoformat(d) for d in days if d), default=None)


def backfill_note(run_date: date, newest: date | None) -> str | None:
    """What a run for a night before the newest published one does (None when it is not
    one): the warning ``validate`` and ``submit`` print."""
    if newest is None or run_date >= newest:
        return None
    return (f"run date {run_date} is older than the newest published night {newest}: a "
            f"backfill. It computes the rows that differ from the output as of {run_date} "
            f"(partitions up to it) and adds them to run_date={run_date}; later nights keep "
            f"what they say (an id it writes that the next night has no row for is restated "
            f"there as it was), so latest keeps each id's rows from its newest night, and the "
            f"next night computes what differs from {newest}")


def _restate(history, idc: str, day: date, written, tombstones: bool, id_type: pa.DataType
             ) -> dict:
    """A backfill of ``day`` writing rows for the ids in ``written``: RowPlan's restate
    fields, so that the next published night N keeps saying what it said when it ran.

    The ids are those this run writes, and those earlier backfills of ``day`` wrote (rows
    there from runs that started after N's newest run: a resumed Delta run committed some
    already), that N has no row for; their rows are the ones N saw (runs up to its own)."""
    import polars as pl

    later = history.filter(pl.col(PARTITION_COLUMN) > pl.lit(day))
    night = later.select(pl.col(PARTITION_COLUMN).min()).collect().item()
    if night is None:
        return {}
    there = later.filter(pl.col(PARTITION_COLUMN) == pl.lit(night))
    cutoff = there.select(pl.col("run_id").max()).collect().item()
    since = history.filter((pl.col(PARTITION_COLUMN) == pl.lit(day)) & (pl.col("run_id") > cutoff))
    affected = pl.concat([written, since.select(idc).drop_nulls().collect()],
                         how="vertical_relaxed").unique().join(
        there.select(idc).unique().collect(), on=idc, how="anti")
    seen = history.filter(pl.col("run_id") <= cutoff)
    before = latest_rows(as_of(seen, day), idc, keep_deleted=True).select(idc).unique()
    before = before.collect()
    copy = affected.join(before, on=idc, how="semi")[idc].sort().to_arrow().cast(id_type)
    fresh = affected.join(before, on=idc, how="anti")[idc].sort().to_arrow().cast(id_type)
    return {"restate_night": night, "restate_cutoff": cutoff, "restate": copy,
            "restate_deleted": fresh if tombstones else None}


def _changed_ids(inputs, done, idc: str):
    """Ids whose multiset of content hashes in ``inputs`` differs from ``done``'s (their
    current output rows): rows are matched on (id, content_hash, occurrence number)."""
    import polars as pl

    key = [idc, "content_hash", "_k"]

    def keyed(frame):
        frame = frame.select(idc, "content_hash")
        if frame[idc].n_unique() == frame.height:  # no id repeats: skip the window (1 s/M)
            return frame.with_columns(pl.lit(0, pl.Int64).alias("_k"))
        return frame.with_columns(pl.int_range(pl.len()).over(idc, "content_hash").alias("_k"))

    a, b = keyed(inputs), keyed(done)
    return pl.concat([a.join(b, on=key, how="anti").select(idc),
                      b.join(a, on=key, how="anti").select(idc)]).unique()


def plan_rows(shards: list[Shard], id_field: pa.Field, columns: list[str], job_fp: str,
              parts: list[OutputPath], run_date: date | None = None,
              tombstones: bool = False) -> RowPlan:
    """The input rows an incremental run for night ``run_date`` computes: all rows of each
    id whose rows differ from its current rows in the output as of that night (partitions
    up to ``run_date``; all of them when None) under ``job_fp``. polars: a lazy scan of
    the published ``parts``, then anti-joins. Reads only the id and hashed columns of the
    input.

    Comparing with each id's newest rows, not with any earlier one, keeps "latest rows per
    id" right when a text changes back to an older version; comparing as of the run date
    makes a backfill fill in its own night and leave later nights as they are. An id that
    repeats is computed as a whole (all its rows, in one run), so its newest run holds one
    row per input row. A row with a null id is always computed (it cannot be matched).
    ``tombstones``: ids gone from the input (and not already marked) go in ``deleted``.
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
    inputs = pl.concat(frames) if frames else None
    unchanged = gone = 0
    previous: list[str] = []
    deleted = pa.array([], id_field.type) if tombstones else None
    todo = inputs
    restate: dict = {}
    if parts and inputs is not None:
        everything = scan_output(parts, [idc, "content_hash", "job_fingerprint", "run_id",
                                         "deleted"])
        history = everything if run_date is None else as_of(everything, run_date)
        state = latest_rows(history, idc).filter(pl.col(idc).is_not_null()).select(
            idc, "content_hash", "job_fingerprint").collect()
        done = state.filter(pl.col("job_fingerprint") == job_fp)
        matched = inputs.filter(pl.col(idc).is_not_null())
        todo = pl.concat([
            matched.join(_changed_ids(matched, done, idc), on=idc, how="semi"),
            inputs.filter(pl.col(idc).is_null())])
        unchanged = inputs.height - todo.height
        gone_ids = state.select(idc).unique().join(matched.select(idc).unique(), on=idc,
                                                   how="anti")
        gone = gone_ids.height
        if tombstones:
            deleted = gone_ids[idc].sort().to_arrow().cast(id_field.type)
        if done.is_empty() and not state.is_empty():
            previous = sorted(state["job_fingerprint"].unique().to_list())
        if run_date is not None:
            # ids this run writes a row for: computed ones, and tombstones
            written = pl.concat([todo.select(idc), *([gone_ids] if tombstones else [])],
                                how="vertical_relaxed").drop_nulls().unique()
            restate = _restate(everything, idc, run_date, written, tombstones, id_field.type)
    by_index = {s.index: s.fingerprint for s in shards}
    rows = dict(unreadable)
    if todo is not None and not todo.is_empty():
        for (index,), group in todo.group_by("shard"):
            rows[by_index[index]] = np.sort(group["pos"].to_numpy()).astype(np.int64)
    plan = RowPlan(rows=rows, input_rows=0 if inputs is None else inputs.height,
                   unchanged=unchanged, gone=gone, previous_fingerprints=previous,
                   deleted=deleted, **restate)
    log.info("incremental: %d input rows, %d unchanged, %d to compute in %d shard(s), %d ids "
             "gone from the input", plan.input_rows, plan.unchanged, plan.to_compute,
             len(rows), plan.gone)
    return plan
