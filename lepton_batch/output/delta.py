"""``output.format: delta``: a Delta Lake table whose files the driver commits.

Workers write plain Parquet files into the table directory, Hive style
(``run_date=YYYY-MM-DD/part-<shard fp>-<run id>.parquet``, data columns only). A file that
no log entry references is invisible to Delta readers. The driver then calls
:func:`commit_file` once per finished shard, or :func:`replace_files` once for a whole
snapshot (delta_sink.py says which mode does which); each call is ONE Delta transaction
(``_delta_log/<version>.json``, written atomically), so a crash leaves a file either
committed or invisible, never half-visible.

Idempotency: :func:`commit_file` returns False without writing anything when the path is
already in the table, so a rerun simply commits every finished file again. Each commit also
carries a Delta app transaction (``txn``) keyed on the file's path; delta-rs fails a commit
whose ``txn`` app id appears in a commit that landed since its snapshot, so two committers
racing on the same file add it once (the loser re-reads the log and returns False).

Needs the optional ``deltalake`` package (``pip install 'lepton-batch[delta]'``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from lepton_batch.output.layout import PARTITION_COLUMN

log = logging.getLogger(__name__)

_TXN_PREFIX = "lepton-batch:"  # app transaction id of a file: prefix + its relative path
_STRING_STATS_MAX = 32  # longer strings get no min/max: a truncated max would be wrong


def require_deltalake() -> ModuleType:
    """The ``deltalake`` module, or ImportError with the install hint."""
    try:
        import deltalake
    except ImportError as e:
        raise ImportError(
            "output.format delta needs the deltalake package: "
            "pip install 'lepton-batch[delta]'") from e
    return deltalake


def _table(uri: str, storage_options: dict[str, str] | None) -> Any:
    return require_deltalake().DeltaTable(uri, storage_options=storage_options)


def _columns(delta_schema: Any) -> dict[str, tuple[Any, bool]]:
    """``{name: (Delta type as JSON, nullable)}`` in schema order."""
    fields = json.loads(delta_schema.to_json())["fields"]
    return {f["name"]: (f["type"], f["nullable"]) for f in fields}


def _schema_problems(want: dict[str, tuple[Any, bool]], have: dict[str, tuple[Any, bool]],
                     where: str, strict: bool = True) -> list[str]:
    """How ``have`` (a ``_columns`` map of ``where``) differs from ``want``; empty if it
    does not. ``strict`` also compares nullability and column order."""
    problems = [f"{where} lacks column {n!r}" for n in want if n not in have]
    problems += [f"{where} has extra column {n!r}" for n in have if n not in want]
    for name in (n for n in want if n in have):
        (wt, wn), (ht, hn) = want[name], have[name]
        if wt != ht:
            problems.append(f"column {name!r} is {json.dumps(ht)} in {where}, "
                            f"expected {json.dumps(wt)}")
        elif strict and wn != hn:
            problems.append(f"column {name!r} has nullable={hn} in {where}, expected {wn}")
    if strict and not problems and list(want) != list(have):
        problems.append(f"{where} has columns in order {list(have)}, expected {list(want)}")
    return problems


def ensure_table(uri: str, schema: pa.Schema, partition_by: list[str] | None = None,
                 storage_options: dict[str, str] | None = None,
                 check_schema: bool = True) -> None:
    """Create the Delta table at ``uri`` if absent, else check it has this schema.

    ``schema`` holds the data columns only; each ``partition_by`` column (default
    ``["run_date"]``) is appended as a string column and partitions the table. Raises
    ValueError naming every differing column when an existing table disagrees
    (``check_schema`` False: only its partition columns, for a commit that replaces the
    schema).
    """
    dl = require_deltalake()
    partition_by = list(partition_by or [PARTITION_COLUMN])
    clash = [c for c in partition_by if c in schema.names]
    if clash:
        raise ValueError(f"partition column(s) {clash} must not be data columns of the output")
    full = schema
    for col in partition_by:
        full = full.append(pa.field(col, pa.string()))
    # mode="ignore" leaves an existing table alone; creating version 0 is atomic, so two
    # drivers racing here end up with one table.
    dl.DeltaTable.create(uri, full, mode="ignore", partition_by=partition_by,
                         storage_options=storage_options)
    dt = _table(uri, storage_options)
    problems = _schema_problems(_columns(dl.Schema.from_arrow(full)), _columns(dt.schema()),
                                "the table") if check_schema else []
    have_parts = list(dt.metadata().partition_columns)
    if have_parts != partition_by:
        problems.append(f"table is partitioned by {have_parts}, expected {partition_by}")
    if problems:
        raise ValueError(f"Delta table {uri} does not match the job's output schema: "
                         + "; ".join(problems)
                         + ". Write to a new output.path or drop the old table.")


def _live(dt: Any) -> dict[str, tuple[int, dict[str, str | None]]]:
    """``{relative path on storage: (size, partition values)}`` of the table's live files."""
    adds = pa.table(dt.get_add_actions(flatten=True)).to_pydict()  # arro3 -> pyarrow
    parts = {k.removeprefix("partition."): v for k, v in adds.items() if k.startswith("partition.")}
    # The log stores paths percent-encoded (delta-rs encodes on commit); give back real names.
    return {unquote(p): (size, {k: v[i] for k, v in parts.items()})
            for i, (p, size) in enumerate(zip(adds["path"], adds["size_bytes"], strict=True))}


def committed_files(uri: str, storage_options: dict[str, str] | None = None) -> set[str]:
    """Relative paths (as on storage, e.g. ``run_date=2026-03-01/part-x.parquet``) of the
    data files the table's current version references."""
    return set(_live(_table(uri, storage_options)))


def _exact(stats: Any) -> bool:
    # pyarrow marks a min/max it truncated (long byte arrays) as inexact.
    return all(getattr(stats, a, True) for a in ("is_min_value_exact", "is_max_value_exact"))


def _file_stats(meta: pq.FileMetaData, arrow_schema: pa.Schema) -> dict[str, Any]:
    """Delta ``stats`` (numRecords, nullCount, minValues, maxValues) from a Parquet footer.

    Top-level columns get a null count; integer and short string ones also min/max. A
    column is left out whenever a row group lacks statistics, so the stats never claim more
    than is true (no float min/max: Parquet's skip NaN, which Delta readers order above all).
    """
    mins: dict[str, Any] = {}
    maxs: dict[str, Any] = {}
    nulls: dict[str, int] = {}
    leaf = {meta.schema.column(i).path: i for i in range(meta.num_columns)}
    for field in arrow_schema:
        t = field.type
        if field.name not in leaf:  # nested: its Parquet leaves are named e.g. emb.list.element
            continue
        col_stats = [meta.row_group(g).column(leaf[field.name]).statistics
                     for g in range(meta.num_row_groups)]
        if not col_stats or any(s is None or not s.has_null_count for s in col_stats):
            continue
        nulls[field.name] = sum(s.null_count for s in col_stats)
        if not (pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)):
            continue
        vals = [s for s in col_stats if s.has_min_max]
        if not vals or not all(_exact(s) for s in vals):
            continue
        lo, hi = min(s.min for s in vals), max(s.max for s in vals)
        if isinstance(lo, str) and max(len(lo), len(hi)) > _STRING_STATS_MAX:
            continue
        mins[field.name], maxs[field.name] = lo, hi
    return {"numRecords": meta.num_rows, "minValues": mins, "maxValues": maxs, "nullCount": nulls}


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" not in uri:
        uri = os.path.abspath(uri)
    return pafs.FileSystem.from_uri(uri)


def _data_file(uri: str, rel_path: str) -> tuple[pafs.FileSystem, pafs.FileInfo]:
    """The filesystem and file info of ``rel_path`` under the table root."""
    if rel_path.startswith("/") or ".." in rel_path.split("/") or "://" in rel_path:
        raise ValueError(f"commit_file: {rel_path!r} must be a path relative to the table root")
    fs, root = _filesystem(uri)
    info = fs.get_file_info(f"{root.rstrip('/')}/{rel_path}")
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"commit_file: no data file {rel_path} under {uri}")
    return fs, info


def _add_action(dt: Any, uri: str, rel_path: str, partition: dict[str, str], num_rows: int,
                table_cols: dict[str, tuple[Any, bool]] | None = None) -> Any:
    """The ``AddAction`` of the existing Parquet file ``rel_path``, checked against the table
    (``table_cols``: the table's ``_columns`` after the commit; default: as it is now)."""
    dl = require_deltalake()
    from deltalake.transaction import AddAction

    fs, info = _data_file(uri, rel_path)
    meta = pq.read_metadata(info.path, filesystem=fs)
    file_schema = meta.schema.to_arrow_schema()
    parts = list(dt.metadata().partition_columns)
    data_cols = {k: v for k, v in (table_cols or _columns(dt.schema())).items()
                 if k not in parts}
    problems = _schema_problems(data_cols, _columns(dl.Schema.from_arrow(file_schema)),
                                "the file", strict=False)
    if sorted(partition) != sorted(parts):
        problems.append(f"partition values {partition} do not name the table's partition "
                        f"columns {parts}")
    if meta.num_rows != num_rows:
        problems.append(f"footer says {meta.num_rows} rows, the driver expected {num_rows}")
    if problems:
        raise ValueError(f"cannot commit {rel_path} to {uri}: " + "; ".join(problems))
    mtime_ms = info.mtime_ns // 1_000_000 if info.mtime_ns else int(time.time() * 1000)
    return AddAction(
        path=rel_path,  # delta-rs percent-encodes it for the log
        size=info.size,
        partition_values=dict(partition),
        modification_time=mtime_ms,
        data_change=True,
        stats=json.dumps(_file_stats(meta, file_schema)),
    )


def _removes(live: dict[str, tuple[int, dict[str, str | None]]], paths: set[str]) -> list[Any]:
    """``RemoveAction``s of those ``paths`` that are live (the files stay on storage)."""
    from deltalake.transaction import RemoveAction

    now = int(time.time() * 1000)
    return [RemoveAction(p, True, now, live[p][0], live[p][1]) for p in sorted(paths) if p in live]


def commit_file(uri: str, rel_path: str, partition: dict[str, str], num_rows: int,
                app_id: str | None = None,
                storage_options: dict[str, str] | None = None,
                replaces: set[str] | None = None) -> bool:
    """Add the existing Parquet file ``rel_path`` to the table in one Delta transaction.

    ``rel_path`` is relative to the table root, as on storage (not URL-encoded); the file
    holds exactly the table's data columns, and ``partition`` (``{"run_date": "..."}``)
    gives the partition values its directory encodes. ``num_rows`` must match the footer.
    ``app_id`` (e.g. the job and run id) is recorded in the commit's ``commitInfo``.
    ``replaces``: committed paths the same transaction removes (a shard computed again).
    Returns False and commits nothing when the path is already committed; raises
    RuntimeError when it is committed with another size (the file was rewritten since),
    ValueError when the file does not fit the table.
    """
    dl = require_deltalake()
    from deltalake.exceptions import CommitFailedError

    _, info = _data_file(uri, rel_path)
    dt = _table(uri, storage_options)
    live = _live(dt)
    if rel_path in live:
        if live[rel_path][0] != info.size:
            raise RuntimeError(
                f"{rel_path} is committed to {uri} with {live[rel_path][0]} bytes but the file "
                f"now has {info.size}: it was rewritten after its commit, which corrupts the "
                "table; never rewrite a committed path")
        return False
    add = _add_action(dt, uri, rel_path, partition, num_rows)
    removes = _removes(live, (replaces or set()) - {rel_path})
    txn_id = _TXN_PREFIX + rel_path
    # A path removed earlier and added again needs a higher txn version.
    last = dt.transaction_version(txn_id)
    txn_version = 0 if last is None else last + 1
    props = dl.CommitProperties(
        custom_metadata={"lepton_batch.file": rel_path, "lepton_batch.num_rows": num_rows,
                         **({"lepton_batch.app_id": app_id} if app_id else {}),
                         **({"lepton_batch.removed": len(removes)} if removes else {})},
        app_transactions=[dl.Transaction(txn_id, txn_version)],
    )
    try:
        dt.create_write_transaction([add, *removes], "append", dt.schema(),
                                    partition_by=list(dt.metadata().partition_columns),
                                    commit_properties=props)
    except CommitFailedError:
        # Another committer landed this same file since our snapshot (txn conflict).
        if rel_path in committed_files(uri, storage_options):
            log.info("delta: %s was committed concurrently; skipping", rel_path)
            return False
        raise
    log.debug("delta: committed %s (%d rows) to %s", rel_path, num_rows, uri)
    return True


def replace_files(uri: str, adds: list[tuple[str, dict[str, str], int]], keep: set[str],
                  schema: pa.Schema, app_id: str | None = None,
                  storage_options: dict[str, str] | None = None) -> bool:
    """ONE transaction after which the table's files are exactly ``keep`` plus ``adds``.

    ``adds``: ``(relative path, partition values, rows)`` of files on storage, as for
    :func:`commit_file` (those committed already are kept as they are); every other live
    file is removed (it stays on storage for older versions). ``schema``: the table's full
    schema after the commit (data and partition columns); when it differs from the table's,
    the commit also replaces the schema (a Delta ``overwrite``; ``keep`` must then be
    empty). Readers see the old version or the new, never a mix. Returns False, committing
    nothing, when the table already is that.
    """
    dl = require_deltalake()
    dt = _table(uri, storage_options)
    live = _live(dt)
    want_cols = _columns(dl.Schema.from_arrow(schema))
    same_schema = not _schema_problems(want_cols, _columns(dt.schema()), "the table")
    new = [a for a in adds if a[0] not in live]
    gone = set(live) - keep - {a[0] for a in adds}
    if same_schema and not new and not gone:
        return False
    actions = [_add_action(dt, uri, path, part, rows, want_cols) for path, part, rows in new]
    meta = {"lepton_batch.added": len(new), "lepton_batch.removed": len(gone),
            **({"lepton_batch.app_id": app_id} if app_id else {})}
    props = dl.CommitProperties(custom_metadata=meta)
    parts = list(dt.metadata().partition_columns)
    if same_schema:
        dt.create_write_transaction([*actions, *_removes(live, gone)], "append", dt.schema(),
                                    partition_by=parts, commit_properties=props)
    else:  # overwrite removes every live file itself, and states the new schema
        assert not keep & set(live), "a schema change replaces every file"
        assert not set(live) & {a[0] for a in adds}, "a schema change replaces every file"
        dt.create_write_transaction(actions, "overwrite", schema, partition_by=parts,
                                    commit_properties=props)
    log.info("delta: committed %d file(s), removed %d, in %s", len(new), len(gone), uri)
    return True


def logged_files(uri: str) -> set[str]:
    """Relative paths of every data file the table's log names, live or removed: a file
    outside this set was never committed (a killed writer's), one inside may still be read
    by an older version. deltalake lists only live files, so this reads the JSON commits
    (local tables only, as output.format delta is for now); what a checkpoint folded in and
    log clean-up deleted is still live, or older than any version that can be read."""
    names = set(committed_files(uri))
    for commit in sorted(Path(uri, "_delta_log").glob("*.json")):
        for line in commit.read_text().splitlines():
            action = json.loads(line) if line.strip() else {}
            for kind in ("add", "remove"):
                if kind in action:
                    names.add(unquote(action[kind]["path"]))
    return names


def remove_files(uri: str, rel_paths: list[str] | set[str], app_id: str | None = None,
                 storage_options: dict[str, str] | None = None) -> int:
    """Remove the given committed paths from the table in one transaction (for an overwrite).

    Paths not in the table are ignored; returns how many were removed. The data files stay
    on storage (older versions still read them) until ``DeltaTable.vacuum`` deletes them.
    """
    dl = require_deltalake()
    dt = _table(uri, storage_options)
    removes = _removes(_live(dt), set(rel_paths))
    if not removes:
        return 0
    meta = {"lepton_batch.removed": len(removes),
            **({"lepton_batch.app_id": app_id} if app_id else {})}
    dt.create_write_transaction(removes, "append", dt.schema(),
                                partition_by=list(dt.metadata().partition_columns),
                                commit_properties=dl.CommitProperties(custom_metadata=meta))
    return len(removes)
