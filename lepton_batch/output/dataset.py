"""The output directory: its layout, what is ours, what readers see, staged shards.

Layout (the warehouse contract)::

    <root>/run_date=YYYY-MM-DD/part-<shard fp>.parquet   published parts: readers look here
    <root>/run_date=YYYY-MM-DD/part-<shard fp>-<run id>.parquet   ... incremental, and Delta
    <root>/_manifest/<shard fp>.json                     one record per published part
    <root>/_SUCCESS                                      the published dataset is complete
    <root>/_schema.json                                  the schema contract (contract.py)
    <root>/_staging/<job fp>/part-<shard fp>.parquet     a run's parts before it publishes
    <root>/_staging/<job fp>/_manifest/<shard fp>.json   ... and their records
    <root>/_publish.json                                 publish journal, only mid-publish
    <root>/_delta_log/                                   output.format delta: the table's log
    <root>/_runs/<run id>/report.json, dask-report.html
    <root>/_lepton_batch.json                            marks the directory as ours
    <root>/_lock                                         one writer at a time (lock.py)

How a run's parts become visible is the sink's business (sink.py: Parquet publishes staged
parts through a journal, Delta commits files); this module holds what both share.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from lepton_batch.output.contract import SCHEMA_FILE, contract_problem, read_contract
from lepton_batch.output.layout import (
    DELTA_LOG,
    JOURNAL,
    LOCK,
    MARKER,
    PARTITION_COLUMN,
    PARTITION_GLOB,
    PARTS_GLOB,
    RUNS_DIR,
    STAGING,
    SUCCESS,
    OutputError,
)
from lepton_batch.output.manifest import (
    MANIFEST_DIR,
    ShardRecord,
    read_record,
    read_records,
    write_json,
)
from lepton_batch.store import OutputPath, RemotePath, remove_tree

log = logging.getLogger(__name__)

_OURS = (MARKER, MANIFEST_DIR, SUCCESS, RUNS_DIR, STAGING, JOURNAL, LOCK, SCHEMA_FILE, DELTA_LOG)


@dataclass(frozen=True)
class OutputTarget:
    """Where one run writes and as what; small and picklable (workers get it with each
    task). Each sink (sink.py) is one of these plus how its parts become visible."""

    root: OutputPath  # a local directory or a RemotePath
    mode: str  # output.mode
    job_fingerprint: str
    run_id: str
    run_date: str  # YYYY-MM-DD: the partition this run's shards go to

    @property
    def staging(self) -> str:
        """This job's staging folder, relative to ``root``: its parts (Parquet) and the
        records of every shard it finished and has not yet published."""
        return f"{STAGING}/{self.job_fingerprint}"


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


def inside(root: OutputPath, rel: str) -> OutputPath | None:
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
        part = inside(root, rec.part)
        if (fp in shard_fps and rec.job_fingerprint == job_fp and part is not None
                and part.is_file() and rec.part.startswith(f"{PARTITION_COLUMN}=")):
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


def prepare_root(root: OutputPath, contract: dict) -> None:
    """What every sink does first under the lock: state the schema contract on a first run
    and remove temp files a killed writer left where readers or records look."""
    if read_contract(root) is None:
        write_contract(root, contract)
    for folder in (root / MANIFEST_DIR, *root.glob(PARTITION_GLOB)):
        if folder.is_dir():
            _remove_temp_files(folder)


def prepare_staging(root: OutputPath, mode: str, job_fp: str, shard_fps: set[str], run_id: str,
                    in_place: bool = False) -> tuple[str, dict[str, ShardRecord]]:
    """The staging folder for this job (relative to root) and the shards already in it.

    Staged shards of the same job fingerprint and mode are kept (a killed or failed run
    resumes from them); anything else under ``_staging/`` is removed. Within the folder,
    records that do not match the plan and parts without a record are deleted.
    ``in_place``: records point at parts where they will be published (root-relative,
    Delta), not at parts inside the staging folder.
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
            part = inside(root, rec.part) if in_place else inside(folder, Path(rec.part).name)
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


def output_problem(root: OutputPath, mode: str, contract: dict) -> str | None:
    """Why the output cannot take this run as it stands, or None: mode error_if_exists on a
    published dataset, a dataset of the other format (even for an overwrite: neither sink
    can replace the other's files in one step), or a schema or layout that differs from
    ``_schema.json``."""
    published = has_published(root)
    if mode == "error_if_exists" and published:
        return (f"output.path: {root} already holds a published dataset and output.mode is "
                "error_if_exists; choose a new path, or mode resume / overwrite")
    fmt = contract.get("output_format", "parquet")
    held = "delta" if is_delta(root) else "parquet"
    if mode == "overwrite" and published and held != fmt:
        return (f"output.path: {root} holds a {held} dataset; output.format is {fmt}. Keep "
                "the format, or choose a new output.path")
    return contract_problem(root, contract, mode, published)


def write_contract(root: OutputPath, contract: dict) -> None:
    write_json(root / SCHEMA_FILE, contract)


def write_success(root: OutputPath, summary: dict) -> None:
    write_json(root / SUCCESS, summary)


def staged_count(root: OutputPath) -> int:
    """Shards computed by an unfinished run and not yet published (for ``status``)."""
    return sum(1 for _ in (root / STAGING).glob(f"*/{MANIFEST_DIR}/*.json"))


def run_dir(root: OutputPath, run_id: str) -> OutputPath:
    path = root / RUNS_DIR / run_id
    path.mkdir(parents=True, exist_ok=True)
    return path

