"""``output.format: delta``: the sink that turns a run's files into Delta commits.

Workers write each part straight into its partition (``run_date=D/part-<fp>-<run id>
.parquet``), invisible to Delta readers until a commit names it, and stage its record.
What the driver then commits depends on the mode:

- ``incremental``: each shard as it finishes (one commit per shard); the table is a history.
- ``resume``: each shard as it finishes, removing in the same commit the file an earlier
  run published for that shard; the last commit drops what the new snapshot no longer
  holds. A killed run's commits stay; its rerun commits the rest.
- ``overwrite`` and ``error_if_exists``: nothing until every shard is done, then ONE commit
  that makes the table exactly this run's files (with a new schema, if the job's changed):
  readers see the old version or the new one, never a mix.

Removed files stay on storage, so older versions remain readable (time travel) until a
``VACUUM``; a file no commit ever named (a killed worker's) is deleted by the next run.
Snapshot modes also keep ``_manifest/`` records of the published shards, as Parquet does,
so that mode resume knows what is done.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from lepton_batch.faults import checkpoint
from lepton_batch.output.contract import schema_of
from lepton_batch.output.dataset import (
    OutputTarget,
    output_problem,
    prepare_root,
    prepare_staging,
    published_records,
    write_contract,
    write_success,
)
from lepton_batch.output.layout import PARTITION_COLUMN, PARTS_GLOB, STAGING, OutputError
from lepton_batch.output.manifest import (
    MANIFEST_DIR,
    ShardRecord,
    read_record,
    read_records,
    write_record,
)
from lepton_batch.store import remove_tree

log = logging.getLogger(__name__)

_PER_SHARD = ("incremental", "resume")  # modes that commit each shard as it finishes


@dataclass(frozen=True)
class DeltaSink(OutputTarget):
    """Parts go where they will be read; commits make them visible (see the module)."""

    @property
    def uri(self) -> str:
        return str(self.root)

    @staticmethod
    def unavailable() -> str | None:
        """Why this machine cannot write Delta (no ``deltalake``), or None."""
        from lepton_batch.output.delta import require_deltalake

        try:
            require_deltalake()
        except ImportError as exc:
            return f"output.format: {exc}"
        return None

    def prepare(self, shard_fps: set[str], contract: dict) -> dict[str, ShardRecord]:
        """Create the table (or check it), remove files a killed run never committed, and
        return every shard that need not run: staged ones, and in modes resume and
        error_if_exists, those the table holds from this job. Raises OutputError when the
        output's contract or mode forbids this run."""
        from lepton_batch.output.delta import ensure_table

        root, mode = self.root, self.mode
        problem = output_problem(root, mode, contract)
        if problem:
            raise OutputError(problem)
        try:
            # An overwrite may change the schema: its one commit states the new one.
            ensure_table(self.uri, schema_of(contract), [PARTITION_COLUMN],
                         check_schema=mode != "overwrite")
        except ValueError as exc:
            raise OutputError(f"output.path: the Delta table at {root}: {exc}") from None
        prepare_root(root, contract)
        _, staged = prepare_staging(root, mode, self.job_fingerprint, shard_fps, self.run_id,
                                    in_place=True)
        self._remove_uncommitted({rec.part for rec in staged.values()})
        if mode in ("incremental", "overwrite"):  # incremental: rows decide (incremental.py)
            return staged
        return self._published(shard_fps) | staged

    def part_path(self, name: str, day: str | None = None) -> str:
        """Where a worker writes the part called ``name`` (a shard fingerprint): its
        partition, ``day`` or this run's date, named with the run id (never rewritten)."""
        return f"{PARTITION_COLUMN}={day or self.run_date}/part-{name}-{self.run_id}.parquet"

    def shard_done(self, record: ShardRecord) -> None:
        """Modes incremental and resume: commit the shard's file now (resume: replacing
        the file an earlier run published for the shard). The others wait for publish."""
        if self.mode not in _PER_SHARD:
            return
        from lepton_batch.output.delta import commit_file

        replaces = set()
        if self.mode == "resume":  # the shard's published file, e.g. another job's
            old = read_record(self.root / MANIFEST_DIR / f"{record.shard_fingerprint}.json")
            replaces = {old.part} if old is not None else set()
        commit_file(self.uri, record.part, _partition(record), record.rows, app_id=self.run_id,
                    replaces=replaces)
        checkpoint("delta-committed")

    def publish(self, shard_fps: set[str], summary: dict, contract: dict,
                partitions: dict[str, str] | None = None) -> None:
        """Commit what is still to commit, then state the contract and write ``_SUCCESS``.

        Mode incremental: the shards an earlier, killed run staged (this run committed its
        own as each finished; one already committed is skipped). The snapshot modes: one
        commit that leaves the table exactly the planned shards, then ``_manifest/``
        records them. ``partitions`` is unused: each part was written into its partition.
        """
        staged = {fp: rec for fp, rec in read_records(self.root / self.staging
                                                      / MANIFEST_DIR).items()
                  if rec.job_fingerprint == self.job_fingerprint}
        if self.mode == "incremental":
            for rec in staged.values():
                if rec.run_id != self.run_id:
                    self._commit_staged(rec)
        else:
            self._replace(shard_fps, staged, contract)
        write_contract(self.root, contract)
        write_success(self.root, summary)
        remove_tree(self.root / STAGING)

    def _commit_staged(self, record: ShardRecord) -> None:
        from lepton_batch.output.delta import commit_file

        commit_file(self.uri, record.part, _partition(record), record.rows, app_id=self.run_id)
        checkpoint("delta-committed")

    def _replace(self, shard_fps: set[str], staged: dict[str, ShardRecord],
                 contract: dict) -> None:
        """Snapshot modes: ONE commit to the planned shards, then their records."""
        from lepton_batch.output.delta import replace_files

        staged = {fp: rec for fp, rec in staged.items() if fp in shard_fps}
        keep = {} if self.mode == "overwrite" else self._published(shard_fps)
        keep = {fp: rec for fp, rec in keep.items() if fp not in staged}
        missing = shard_fps - set(staged) - set(keep)
        assert not missing, f"publish called with {len(missing)} shard(s) not done"
        schema = schema_of(contract).append(pa.field(PARTITION_COLUMN, pa.string()))
        checkpoint("delta-replacing")
        replace_files(self.uri, [(r.part, _partition(r), r.rows) for r in staged.values()],
                      {rec.part for rec in keep.values()}, schema, app_id=self.run_id)
        checkpoint("delta-committed")
        manifest = self.root / MANIFEST_DIR
        for rec in staged.values():
            write_record(manifest, rec)
        for fp in set(read_records(manifest)) - set(staged) - set(keep):
            (manifest / f"{fp}.json").unlink(missing_ok=True)

    def _published(self, shard_fps: set[str]) -> dict[str, ShardRecord]:
        """Records of planned shards from this job whose file the table holds now."""
        from lepton_batch.output.delta import committed_files

        live = committed_files(self.uri)
        return {fp: rec for fp, rec in published_records(self.root, shard_fps,
                                                         self.job_fingerprint).items()
                if rec.part in live}

    def _remove_uncommitted(self, keep: set[str]) -> None:
        """Delete files in the partitions that no commit and no staged record names (a
        killed worker's part): invisible to Delta readers, not to a plain Parquet glob.
        Files an older version still reads stay."""
        from lepton_batch.output.delta import logged_files

        logged = logged_files(self.uri) | keep
        for path in self.root.glob(PARTS_GLOB):
            if str(path.relative_to(self.root)) not in logged:
                log.info("removing %s: written by a killed run, never committed", path)
                path.unlink()


def _partition(record: ShardRecord) -> dict[str, str]:
    """The partition values of a record's part, from its folder (``run_date=D``)."""
    return {PARTITION_COLUMN: Path(record.part).parent.name.partition("=")[2]}
