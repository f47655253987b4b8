"""The output dataset's housekeeping: overwrite/resume, stale parts, ``_SUCCESS``.

Layout (the warehouse contract)::

    <root>/run_date=YYYY-MM-DD/part-<shard fingerprint>.parquet
    <root>/_manifest/<shard fingerprint>.json
    <root>/_runs/<run id>/report.json, dask-report.html
    <root>/_SUCCESS
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from lepton_batch.manifest import (
    MANIFEST_DIR,
    ShardRecord,
    read_records,
    remove_record,
    write_atomic,
)

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS"
RUNS_DIR = "_runs"
PARTITION_GLOB = "run_date=*"
PARTS_GLOB = f"{PARTITION_GLOB}/*.parquet"  # every part file of the dataset, relative to root


class OutputError(ValueError):
    """The output directory cannot be used as asked."""


def _is_ours(root: Path) -> bool:
    return (root / MANIFEST_DIR).is_dir() or (root / SUCCESS).exists() or any(
        root.glob(PARTITION_GLOB)
    )


def check_output_dir(root: Path) -> str | None:
    """Why ``root`` cannot hold this job's output, or None when it can."""
    if root.exists() and not root.is_dir():
        return f"output.path: {root} is a file, not a directory"
    if root.is_dir() and any(root.iterdir()) and not _is_ours(root):
        return (f"output.path: {root} is not empty and holds no lepton-batch output; "
                "choose an empty or new directory")
    return None


def prepare_output(root: Path, mode: str, shard_fps: set[str], job_fp: str
                   ) -> dict[str, ShardRecord]:
    """Make ``root`` ready for a run; return the records of shards that can be skipped.

    overwrite: remove the previous dataset (only lepton-batch's own files).
    resume: keep parts whose record matches a planned shard and this job's fingerprint;
    delete every other part and record, so no row is ever left twice in the dataset.
    """
    problem = check_output_dir(root)
    if problem:
        raise OutputError(problem)
    root.mkdir(parents=True, exist_ok=True)
    (root / SUCCESS).unlink(missing_ok=True)
    if mode == "overwrite":
        for part_dir in root.glob(PARTITION_GLOB):
            shutil.rmtree(part_dir)
        shutil.rmtree(root / MANIFEST_DIR, ignore_errors=True)
        return {}
    keep: dict[str, ShardRecord] = {}
    referenced: set[Path] = set()
    for fp, rec in read_records(root).items():
        part = (root / rec.part).resolve()
        usable = part.is_relative_to(root.resolve()) and part.is_file()  # never leave root
        if fp in shard_fps and rec.job_fingerprint == job_fp and usable:
            keep[fp] = rec
            referenced.add(part)
        else:
            remove_record(root, fp)
    stale = [p for p in root.glob(f"{PARTITION_GLOB}/*")
             if p.is_file() and p.resolve() not in referenced]
    for p in stale:
        p.unlink()
    for part_dir in root.glob(PARTITION_GLOB):
        if part_dir.is_dir() and not any(part_dir.iterdir()):
            part_dir.rmdir()
    if stale:
        log.info("resume: removed %d part file(s) with no matching record", len(stale))
    return keep


def write_success(root: Path, summary: dict) -> None:
    blob = json.dumps(summary, indent=1).encode()
    write_atomic(root / SUCCESS, lambda fh: fh.write(blob))


def run_dir(root: Path, run_id: str) -> Path:
    path = root / RUNS_DIR / run_id
    path.mkdir(parents=True, exist_ok=True)
    return path
