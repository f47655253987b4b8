"""The output dataset: layout, staging, publish, ``_SUCCESS``.

Layout (the warehouse contract)::

    <root>/run_date=YYYY-MM-DD/part-<shard fp>.parquet   published parts: readers look here
    <root>/run_date=YYYY-MM-DD/part-<shard fp>-<run id>.parquet   ... in mode incremental
    <root>/_manifest/<shard fp>.json                     one record per published part
    <root>/_SUCCESS                                      the published dataset is complete
    <root>/_schema.json                                  the schema contract (contract.py)
    <root>/_staging/<job fp>/part-<shard fp>.parquet     a run's parts before it publishes
    <root>/_staging/<job fp>/_manifest/<shard fp>.json   ... and their records
    <root>/_publish.json                                 publish journal, only mid-publish
    <root>/_runs/<run id>/report.json, dask-report.html
    <root>/_lepton_batch.json                            marks the directory as ours
    <root>/_lock                                         one writer at a time (lock.py)

A run writes its shards under ``_staging/`` (``_``-prefixed, so Hive readers such as DuckDB,
Spark and polars skip it) and publishes them only when every planned shard is done. Publish
first writes a journal of renames and deletes, then carries it out; a crash mid-publish is
rolled forward by the next run, so the published dataset is always the old one or the new
one once any run has finished.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from lepton_batch.faults import checkpoint
from lepton_batch.output.contract import SCHEMA_FILE, contract_problem, read_contract, schema_of
from lepton_batch.output.manifest import (
    MANIFEST_DIR,
    ShardRecord,
    read_record,
    read_records,
    write_json,
    write_record,
)
from lepton_batch.store import OutputPath, RemotePath, fsync_dir, move, remove_tree

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS"
RUNS_DIR = "_runs"
STAGING = "_staging"
JOURNAL = "_publish.json"
MARKER = "_lepton_batch.json"
LOCK = "_lock"
DELTA_LOG = "_delta_log"  # output.format delta: the table's log (delta.py)
PARTITION_COLUMN = "run_date"
PARTITION_GLOB = f"{PARTITION_COLUMN}=*"
PARTS_GLOB = f"{PARTITION_GLOB}/*.parquet"  # every published part, relative to root
_OURS = (MARKER, MANIFEST_DIR, SUCCESS, RUNS_DIR, STAGING, JOURNAL, LOCK, SCHEMA_FILE, DELTA_LOG)


class OutputError(ValueError):
    """The output directory cannot be used as asked."""


def is_ours(root: OutputPath) -> bool:
    return any((root / name).exists() for name in _OURS) or any(root.glob(PARTITION_GLOB))


def check_output_dir(root: OutputPath) -> str | None:
    """Why ``root`` cannot hold this job's output, or None when it can."""
    if isinstance(root, RemotePath):
        return _check_remote(root)
    if root.exists() and not root.is_dir():
        return f"output.path: {root} is a file, not a directory"
    existing = next(p for p in (root, *root.parents) if p.exists())
    if not existing.is_dir():
        return f"output.path: cannot create {root}: {existing} is a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"output.path: cannot create or write {root}: {existing} is not writable"
    return _foreign(root)


def _foreign(root: OutputPath) -> str | None:
    """Refuse a non-empty directory (or prefix) that lepton-batch did not write."""
    if root.is_dir() and any(root.iterdir()) and not is_ours(root):
        return (f"output.path: {root} is not empty and holds no lepton-batch output; "
                "choose an empty or new directory")
    return None


def _check_remote(root: RemotePath) -> str | None:
    """An object-store root: its bucket must be reachable, the prefix ours or empty."""
    bucket = root.path.split("/", 1)[0]
    try:
        if not root.fs.exists(bucket):
            return f"output.path: bucket {bucket!r} of {root} does not exist (or is not visible)"
        return _foreign(root)
    except (OSError, ValueError) as exc:  # no credentials, no endpoint, denied
        return f"output.path: cannot reach {root}: {type(exc).__name__}: {exc}"


def has_published(root: OutputPath) -> bool:
    """Whether ``root`` holds a published dataset (a finished run, or parts of one)."""
    return (root / SUCCESS).exists() or bool(published_parts(root))


def is_delta(root: OutputPath) -> bool:
    return (root / DELTA_LOG).is_dir()


def published_parts(root: OutputPath) -> list[OutputPath]:
    """The part files readers see: a Delta table's committed files, else every
    ``run_date=*/*.parquet``."""
    if is_delta(root):
        from lepton_batch.output.delta import committed_files

        return [root / rel for rel in sorted(committed_files(str(root)))]
    return sorted(root.glob(PARTS_GLOB))


def init_output(root: OutputPath) -> None:
    """Create ``root`` and mark it as ours first thing, so that whatever a killed run leaves
    behind, the same command accepts the directory again."""
    problem = check_output_dir(root)
    if problem:
        raise OutputError(problem)
    try:
        root.mkdir(parents=True, exist_ok=True)
        if not (root / MARKER).exists():
            write_json(root / MARKER, {"format": 1, "created": _now()})
    except OSError as exc:
        raise OutputError(f"output.path: cannot write to {root}: {exc.strerror or exc}") from None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _inside(root: OutputPath, rel: str) -> OutputPath | None:
    """``root / rel`` if it stays inside ``root`` (a record's path is never trusted)."""
    path = (root / rel).resolve()
    return path if path.is_relative_to(root.resolve()) else None


def _remove_temp_files(folder: OutputPath) -> None:
    """Hidden ``.tmp-*`` files a killed writer left (write_atomic names them so)."""
    for tmp in folder.rglob(".*.tmp-*"):
        if tmp.is_file():
            tmp.unlink()


def published_records(root: OutputPath, shard_fps: set[str], job_fp: str,
                      records: dict[str, ShardRecord] | None = None) -> dict[str, ShardRecord]:
    """Published records of planned shards, made by this job, whose part file is there.

    ``records``: every record in ``_manifest/`` when the caller has read them already.
    """
    if records is None:
        records = read_records(root / MANIFEST_DIR)
    keep = {}
    for fp, rec in records.items():
        part = _inside(root, rec.part)
        if (fp in shard_fps and rec.job_fingerprint == job_fp and part is not None
                and part.is_file() and rec.part.startswith("run_date=")):
            keep[fp] = rec
    return keep


def computed_before(root: OutputPath, job_fp: str, mode: str) -> Callable[[str], bool]:
    """``computed(shard fingerprint)``: True when this job staged that shard, or (mode
    resume) published it with its part in place; the plan then keeps the shard as it was
    cut (``plan_shards``'s ``keep_whole``). Reads one record per question, not them all."""
    staged = root / STAGING / job_fp / MANIFEST_DIR

    def computed(fp: str) -> bool:
        name = f"{fp}.json"
        if (staged / name).is_file() and (rec := read_record(staged / name)) is not None:
            return rec.job_fingerprint == job_fp  # its part: prepare_staging checks it
        if mode != "resume" or not (root / MANIFEST_DIR / name).is_file():
            return False
        rec = read_record(root / MANIFEST_DIR / name)
        return rec is not None and bool(published_records(root, {fp}, job_fp, {fp: rec}))

    return computed


def prepare_staging(root: OutputPath, mode: str, job_fp: str, shard_fps: set[str], run_id: str,
                    delta: bool = False) -> tuple[str, dict[str, ShardRecord]]:
    """The staging folder for this job (relative to root) and the shards already in it.

    Staged shards of the same job fingerprint and mode are kept (a killed or failed run
    resumes from them); anything else under ``_staging/`` is removed. Within the folder,
    records that do not match the plan and parts without a record are deleted. ``delta``:
    records point at files in the table's partitions, written there by the workers.
    """
    base = root / STAGING
    folder = base / job_fp
    info = folder / "_run.json"
    reuse = False
    if info.is_file():
        try:
            reuse = json.loads(info.read_text()).get("mode") == mode
        except (OSError, ValueError):
            reuse = False
    if base.is_dir():
        for child in base.iterdir():
            if child != folder or not reuse:
                remove_tree(child) if child.is_dir() else child.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    if not reuse:
        write_json(info, {"mode": mode, "job_fingerprint": job_fp, "run_id": run_id,
                          "started": _now()})
    _remove_temp_files(folder)
    staged: dict[str, ShardRecord] = {}
    for f in sorted((folder / MANIFEST_DIR).glob("*.json")):
        rec = read_record(f)
        part = None
        if rec is not None:
            part = _inside(root, rec.part) if delta else _inside(folder, Path(rec.part).name)
        if (rec and f.stem == rec.shard_fingerprint and rec.shard_fingerprint in shard_fps
                and rec.job_fingerprint == job_fp and part is not None and part.is_file()):
            staged[rec.shard_fingerprint] = rec
        else:
            f.unlink()
    referenced = {Path(r.part).name for r in staged.values()}
    for part in folder.glob("*.parquet"):
        if part.name not in referenced:
            part.unlink()
    return f"{STAGING}/{job_fp}", staged


def prepare_output(root: OutputPath, mode: str, shard_fps: set[str], job_fp: str, run_id: str,
                   contract: dict) -> tuple[str, dict[str, ShardRecord]]:
    """Make ``root`` ready for a run (the caller holds the lock).

    Finishes a publish a crash interrupted, removes temp files, states the schema contract
    on a first run, and returns the staging folder plus every shard that need not run:
    staged ones, and in mode resume, published ones whose record matches this plan and job
    fingerprint. Nothing published is changed here; readers keep seeing the last published
    dataset until this run publishes. Raises OutputError when the output's contract or
    mode forbids this run (see contract.py).
    """
    finished = roll_forward(root)
    problem = output_problem(root, mode, contract)
    if problem:
        raise OutputError(problem)
    delta = contract.get("output_format") == "delta"
    if delta:
        from lepton_batch.output.delta import ensure_table

        try:
            ensure_table(str(root), schema_of(contract), [PARTITION_COLUMN])
        except ValueError as exc:
            raise OutputError(f"output.path: the Delta table at {root}: {exc}") from None
    if read_contract(root) is None:
        write_contract(root, contract)
    for folder in (root / MANIFEST_DIR, *root.glob(PARTITION_GLOB)):
        if folder.is_dir():
            _remove_temp_files(folder)
    staging, staged = prepare_staging(root, mode, job_fp, shard_fps, run_id, delta)
    if delta:
        _remove_uncommitted(root, {rec.part for rec in staged.values()})
    if mode == "incremental":  # rows, not shards, decide what is done (incremental.py)
        return staging, staged
    # An overwrite killed while publishing has just been published by roll_forward: that is
    # the dataset this same command was making, so it is done, not to be recomputed.
    same_run = finished is not None and finished.get("job_fingerprint") == job_fp
    done = {} if mode == "overwrite" and not same_run else published_records(root, shard_fps,
                                                                             job_fp)
    return staging, done | staged


def _remove_uncommitted(root: OutputPath, keep: set[str]) -> None:
    """Delta: delete files in the partitions that no commit and no staged record names (a
    killed worker's part); invisible to Delta readers, but not to a plain Parquet glob."""
    live = {str(p.relative_to(root)) for p in published_parts(root)} | keep
    for path in root.glob(PARTS_GLOB):
        if str(path.relative_to(root)) not in live:
            log.info("removing %s: written by a killed run, never committed", path)
            path.unlink()


def commit_delta(root: OutputPath, staging: str, run_id: str, summary: dict,
                 contract: dict) -> None:
    """Delta: commit the staged shards an earlier, killed run wrote (this run committed its
    own as each finished; one already committed is skipped), then state the contract and
    write ``_SUCCESS``."""
    for rec in read_records(root / staging / MANIFEST_DIR).values():
        if rec.run_id != run_id:
            commit_shard(root, rec, run_id)
    write_contract(root, contract)
    write_success(root, summary)
    remove_tree(root / STAGING)


def commit_shard(root: OutputPath, record: ShardRecord, run_id: str) -> bool:
    """Delta: add one finished shard's file (``run_date=<date>/part-….parquet``) to the
    table as one transaction; False when it was committed already."""
    from lepton_batch.output.delta import commit_file

    partition = {PARTITION_COLUMN: Path(record.part).parent.name.partition("=")[2]}
    done = commit_file(str(root), record.part, partition, record.rows, app_id=run_id)
    checkpoint("delta-committed")
    return done


def output_problem(root: OutputPath, mode: str, contract: dict) -> str | None:
    """Why the output cannot take this run as it stands, or None: mode error_if_exists on a
    published dataset, or a schema or layout that differs from ``_schema.json``."""
    published = has_published(root)
    if mode == "error_if_exists" and published:
        return (f"output.path: {root} already holds a published dataset and output.mode is "
                "error_if_exists; choose a new path, or mode resume / overwrite")
    return contract_problem(root, contract, mode, published)


def write_contract(root: OutputPath, contract: dict) -> None:
    write_json(root / SCHEMA_FILE, contract)


def publish(root: OutputPath, staging: str, shard_fps: set[str], job_fp: str, mode: str,
            run_date: str, run_id: str, summary: dict, contract: dict,
            partitions: dict[str, str] | None = None) -> None:
    """Move the staged parts into ``run_date=<run_date>/`` and (snapshot modes) drop what the
    new dataset no longer holds, through a journal, then write ``_SUCCESS``.

    ``shard_fps``: the shards this run planned; each must be staged or (mode resume)
    published already. Mode incremental adds its parts, named with the run id, beside the
    earlier runs' and deletes nothing. ``partitions``: a staged part's run_date when it is
    not ``run_date`` (a backfill's restated rows, driver_rows.py).
    """
    folder = root / staging
    staged = {fp: rec for fp, rec in read_records(folder / MANIFEST_DIR).items()
              if fp in shard_fps and rec.job_fingerprint == job_fp}
    published = read_records(root / MANIFEST_DIR)
    if mode == "incremental":
        keep, suffix = {}, f"-{run_id}"
    else:
        keep = {} if mode == "overwrite" else published_records(root, shard_fps, job_fp,
                                                                published)
        keep, suffix = {fp: rec for fp, rec in keep.items() if fp not in staged}, ""
    missing = shard_fps - set(staged) - set(keep)
    assert not missing, f"publish called with {len(missing)} shard(s) not done"
    moves = [(fp, f"{staging}/{Path(rec.part).name}",
              f"run_date={(partitions or {}).get(fp, run_date)}/part-{fp}{suffix}.parquet")
             for fp, rec in sorted(staged.items())]
    deletes: list[str] = []
    drop: list[str] = []
    if mode != "incremental":
        live = {rec.part for rec in keep.values()} | {dst for _, _, dst in moves}
        deletes = sorted(str(p.relative_to(root)) for p in root.glob(f"{PARTITION_GLOB}/*")
                         if p.is_file() and str(p.relative_to(root)) not in live)
        drop = sorted(set(published) - set(keep) - set(staged))
    if not (moves or deletes or drop) and (root / SUCCESS).exists() and (
            read_contract(root) == contract):
        remove_tree(root / STAGING)
        return  # the published dataset is already this one
    journal = {"staging": staging, "job_fingerprint": job_fp, "moves": moves,
               "deletes": deletes, "drop_records": drop, "success": summary,
               "contract": contract}
    write_json(root / JOURNAL, journal)
    checkpoint("publish-journaled")
    _carry_out(root, journal)


def roll_forward(root: OutputPath) -> dict | None:
    """Finish a publish that a crash interrupted (every step is idempotent); return its
    journal, or None when there was nothing to finish."""
    path = root / JOURNAL
    if not path.is_file():
        return None
    log.warning("finishing the publish an earlier run started (%s)", path)
    journal = json.loads(path.read_text())
    _carry_out(root, journal)
    return journal


def _carry_out(root: OutputPath, journal: dict) -> None:
    (root / SUCCESS).unlink(missing_ok=True)
    staged_records = root / journal["staging"] / MANIFEST_DIR
    for fp, src, dst in journal["moves"]:
        source, target = _inside(root, src), _inside(root, dst)
        assert source is not None and target is not None, f"journal path leaves {root}"
        if source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            move(source, target)
        staged = staged_records / f"{fp}.json"
        if staged.is_file():
            rec = read_record(staged)
            if rec is not None:
                write_record(root / MANIFEST_DIR, replace(rec, part=dst))
            staged.unlink()
        checkpoint("publish-moved")
    for rel in journal["deletes"]:
        path = _inside(root, rel)
        if path is not None:
            path.unlink(missing_ok=True)
    for fp in journal["drop_records"]:
        (root / MANIFEST_DIR / f"{fp}.json").unlink(missing_ok=True)
    for part_dir in root.glob(PARTITION_GLOB):
        if part_dir.is_dir() and not any(part_dir.iterdir()):
            part_dir.rmdir()
    if "contract" in journal:  # an overwrite may state a new schema; the others restate it
        write_contract(root, journal["contract"])
    checkpoint("publish-before-success")
    write_success(root, journal["success"])
    checkpoint("success-written")
    remove_tree(root / STAGING)
    fsync_dir(root)
    (root / JOURNAL).unlink()


def write_success(root: OutputPath, summary: dict) -> None:
    write_json(root / SUCCESS, summary)


def staged_count(root: OutputPath) -> int:
    """Shards computed by an unfinished run and not yet published (for ``status``)."""
    return sum(1 for _ in (root / STAGING).glob(f"*/{MANIFEST_DIR}/*.json"))


def run_dir(root: OutputPath, run_id: str) -> OutputPath:
    path = root / RUNS_DIR / run_id
    path.mkdir(parents=True, exist_ok=True)
    return path

