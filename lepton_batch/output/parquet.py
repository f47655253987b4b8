"""``output.format: parquet``: a Hive-partitioned dataset of plain files, published whole.

A run writes its shards under ``_staging/`` (``_``-prefixed, so Hive readers such as DuckDB,
Spark and polars skip it) and publishes them only when every planned shard is done. Publish
first writes a journal of renames and deletes, then carries it out; a crash mid-publish is
rolled forward by the next run, so the published dataset is always the old one or the new
one once any run has finished.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from lepton_batch.faults import checkpoint
from lepton_batch.output.contract import read_contract
from lepton_batch.output.dataset import (
    OutputTarget,
    inside,
    output_problem,
    prepare_root,
    prepare_staging,
    published_records,
    write_contract,
    write_success,
)
from lepton_batch.output.layout import (
    JOURNAL,
    PARTITION_COLUMN,
    PARTITION_GLOB,
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
    write_record,
)
from lepton_batch.store import OutputPath, fsync_dir, move, remove_tree

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParquetSink(OutputTarget):
    """Parts wait in the staging folder; :meth:`publish` moves them into place at once."""

    @staticmethod
    def unavailable() -> str | None:
        return None  # pyarrow writes Parquet

    def prepare(self, shard_fps: set[str], contract: dict) -> dict[str, ShardRecord]:
        """Make ``root`` ready for a run (the caller holds the lock).

        Finishes a publish a crash interrupted, removes temp files, states the schema
        contract on a first run, and returns every shard that need not run: staged ones,
        and in mode resume, published ones whose record matches this plan and job
        fingerprint. Nothing published is changed here; readers keep seeing the last
        published dataset until this run publishes. Raises OutputError when the output's
        contract or mode forbids this run (see contract.py).
        """
        root, mode, job_fp = self.root, self.mode, self.job_fingerprint
        finished = roll_forward(root)
        problem = output_problem(root, mode, contract)
        if problem:
            raise OutputError(problem)
        prepare_root(root, contract)
        _, staged = prepare_staging(root, mode, job_fp, shard_fps, self.run_id)
        if mode == "incremental":  # rows, not shards, decide what is done (incremental.py)
            return staged
        # An overwrite killed while publishing has just been published by roll_forward: that
        # is the dataset this same command was making, so it is done, not to be recomputed.
        same_run = finished is not None and finished.get("job_fingerprint") == job_fp
        done = {} if mode == "overwrite" and not same_run else published_records(
            root, shard_fps, job_fp)
        return done | staged

    def part_path(self, name: str, day: str | None = None) -> str:
        """Where a worker writes the part called ``name`` (a shard fingerprint): the staging
        folder, whatever its partition (publish places it)."""
        return f"{self.staging}/part-{name}.parquet"

    def shard_done(self, record: ShardRecord) -> None:
        """Nothing: the record the worker staged beside the part is all publish needs."""

    def publish(self, shard_fps: set[str], summary: dict, contract: dict,
                partitions: dict[str, str] | None = None) -> None:
        """Publish the staged parts and ``_SUCCESS`` (see :func:`publish`)."""
        publish(self.root, self.staging, shard_fps, self.job_fingerprint, self.mode,
                self.run_date, self.run_id, summary, contract, partitions)


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
    days = partitions or {}
    moves = [(fp, f"{staging}/{Path(rec.part).name}",
              f"{PARTITION_COLUMN}={days.get(fp, run_date)}/part-{fp}{suffix}.parquet")
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
        source, target = inside(root, src), inside(root, dst)
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
        path = inside(root, rel)
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


