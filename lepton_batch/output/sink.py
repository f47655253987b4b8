"""One protocol for every output format: how a run's parts become what readers see.

A run calls, in order (the driver holds the output's lock throughout)::

    sink = make_sink(job.output.format, root, mode=..., job_fingerprint=..., run_id=...,
                     run_date=...)
    done = sink.prepare(shard_fps, contract)        # before any shard runs
    rel = sink.part_path(shard.fingerprint)         # on the worker: where the part goes
    sink.shard_done(record)                         # on the driver, as each shard finishes
    sink.publish(shard_fps, summary, contract)      # once every planned shard is done

Workers write each part (``part_path``) and its record (``<staging>/_manifest/``) whatever
the format; the sink decides where the part lies and when readers see it. Nothing outside
``output/`` branches on the format. Implementations: :class:`~.parquet.ParquetSink`,
:class:`~.delta_sink.DeltaSink`.
"""

from __future__ import annotations

from typing import Protocol

from lepton_batch.output.delta_sink import DeltaSink
from lepton_batch.output.manifest import ShardRecord
from lepton_batch.output.parquet import ParquetSink
from lepton_batch.store import OutputPath

SINKS: dict[str, type[ParquetSink] | type[DeltaSink]] = {"parquet": ParquetSink,
                                                          "delta": DeltaSink}


class Sink(Protocol):
    """What the run lifecycle and the shard worker know of an output format. A sink is a
    small frozen dataclass, picklable: workers get it with each task."""

    root: OutputPath
    mode: str
    run_id: str

    @property
    def staging(self) -> str:
        """This job's staging folder, relative to ``root`` (records of unpublished shards)."""

    def prepare(self, shard_fps: set[str], contract: dict) -> dict[str, ShardRecord]:
        """Make the output ready for a run; the shards that need not run (staged by a
        killed run of this job, or published already where the mode keeps them). Raises
        OutputError when the output or its contract forbids the run."""

    def part_path(self, name: str, day: str | None = None) -> str:
        """Where (relative to ``root``) a worker writes the part called ``name``, a shard
        fingerprint or a driver set's name; ``day``: its run date when not the run's."""

    def shard_done(self, record: ShardRecord) -> None:
        """A shard's part and record are written (called on the driver, in finish order)."""

    def publish(self, shard_fps: set[str], summary: dict, contract: dict,
                partitions: dict[str, str] | None = None) -> None:
        """Every planned shard (``shard_fps``) is done: make the run visible as one, state
        the contract, write ``_SUCCESS`` (``summary``). ``partitions``: a staged part's run
        date when not the run's (a backfill's restated rows)."""


def make_sink(output_format: str, root: OutputPath, *, mode: str, job_fingerprint: str,
              run_id: str, run_date: str) -> Sink:
    """The sink of ``output.format`` (``parquet`` or ``delta``) for one run."""
    return SINKS[output_format](root=root, mode=mode, job_fingerprint=job_fingerprint,
                                run_id=run_id, run_date=run_date)


def format_problem(output_format: str) -> str | None:
    """Why ``output.format`` cannot be written here (a missing optional package), or None."""
    return SINKS[output_format].unavailable()
