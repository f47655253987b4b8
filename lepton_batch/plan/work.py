"""One shard's work, described once on the driver: what every task of a run ships.

``shard_work`` turns a :class:`~lepton_batch.plan.build.Plan` and the run's id and output
sink into a :class:`ShardWork`: the task, the resolved settings, the engine to load (its
head and threads decided here), the input columns to read and the output to write. A
worker needs nothing else: no job file, no second look at the model directory. It is
small and picklable, and the same for every shard of a run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import TYPE_CHECKING

import pyarrow as pa

from lepton_batch.engine.config import EngineConfig, Head
from lepton_batch.job.modeldir import ModelInfo
from lepton_batch.job.settings import Settings
from lepton_batch.job.spec import EngineSpec, InputSpec, JobSpec, TaskSpec
from lepton_batch.output.sink import Sink
from lepton_batch.plan.build import Plan
from lepton_batch.store import OutputPath

if TYPE_CHECKING:
    from lepton_batch.pipelines import TaskShape


@dataclass(frozen=True)
class TaskWork:
    """What computing a table of rows takes, with no output attached: the task, its
    resolved settings, the engine to load. A job's shards get a :class:`ShardWork`;
    :func:`lepton_batch.map_partitions` ships this to the partitions of a Dask DataFrame."""

    run_id: str
    job_name: str
    job_fingerprint: str
    task: TaskSpec
    input: InputSpec  # the id, text and passthrough columns (input.path is not read)
    model: ModelInfo
    settings: Settings  # resolved from the job and the model directory (plan.settings)
    engine: EngineConfig  # the engine to load: head, dtype, threads, quality gate, ...
    batching: EngineSpec  # batch sizes, chunking, KV cache (the job's engine section)
    quality_sample_rows: int  # rows of the first table the quality gate checks
    task_columns: tuple[str, ...]  # the task's input columns: what content_hash covers

    @property
    def key(self) -> tuple[str, str]:
        """Identifies this work on a worker (its pipelines are built once per key)."""
        return self.run_id, self.job_fingerprint


@dataclass(frozen=True)
class ShardWork(TaskWork):
    """What every shard of one run does; built once per run (:func:`shard_work`)."""

    columns: tuple[str, ...]  # what a shard reads: id, passthrough, then the task's columns
    output_root: OutputPath  # a local directory or a RemotePath (picklable either way)
    sink: Sink  # the output format's: where each part goes, what waits for publish
    schema: pa.Schema  # the output's columns, the same for every part (plan.schema)
    compression: str = "zstd"  # the part files' codec; "none": uncompressed
    file_metadata: dict[str, str] = field(default_factory=dict)

    @property
    def staging(self) -> str:
        """The folder under output_root where this run's shard records wait for publish."""
        return self.sink.staging


def default_threads(job: JobSpec) -> int | None:
    """Torch threads per worker: the job's; on an embedded cluster, this machine's cores
    split between the workers."""
    if job.engine.threads or job.cluster.address:
        return job.engine.threads
    return max(1, (os.cpu_count() or 1) // job.cluster.n_workers)


def engine_config(job: JobSpec, model: ModelInfo, head: Head, settings: Settings,
                  threads: int | None) -> EngineConfig:
    """The engine the job's task runs on (the cache on each worker is keyed by it)."""
    return EngineConfig(
        model_dir=str(model.path),
        head=head,
        dtype=job.model.dtype,
        device=job.model.device,
        max_length=settings.max_length,
        trust_remote_code=job.model.trust_remote_code,
        allow_pickle=job.model.allow_pickle,
        threads=threads,
        quantization=job.model.quantization,
        packed=job.engine.packed,
        compile=job.engine.compile,
        min_cosine=job.quality.min_cosine,
        min_label_agreement=job.quality.min_label_agreement,
        on_fail=job.quality.on_fail,
    )


def file_metadata(plan: Plan, run_id: str) -> dict[str, str]:
    """What every part file of the run states about how it was made (its ``lepton_batch``
    schema metadata, beside the shard's own entries)."""
    versions = {p: version(p) for p in ("lepton-batch", "torch", "transformers", "pyarrow")}
    return {
        "job_name": plan.job.name,
        "job_fingerprint": plan.job_fingerprint,
        "task": plan.job.task.kind,
        "model": plan.model.path.name,
        "model_path": str(plan.model.path),
        "model_revision": plan.model.revision,
        # the resolved max_length / pooling / normalize / prompt, so a reader can tell
        # which settings made these values (see settings.py)
        "settings": json.dumps(plan.settings.values(), sort_keys=True),
        "run_id": run_id,
        "versions": ",".join(f"{k}=={v}" for k, v in versions.items()),
    }


def shard_work(plan: Plan, run_id: str, sink: Sink) -> ShardWork:
    """The run's :class:`ShardWork`: ``plan`` with the run's id and its output sink."""
    job = plan.job
    inp = job.input
    threads = default_threads(job)
    columns = [inp.id_column, *inp.passthrough_columns]
    columns += [c for c in plan.task_columns if c not in columns]
    return ShardWork(
        run_id=run_id,
        job_name=job.name,
        job_fingerprint=plan.job_fingerprint,
        task=job.task,
        input=inp,
        model=plan.model,
        settings=plan.settings,
        engine=engine_config(job, plan.model, plan.head, plan.settings, threads),
        batching=job.engine.model_copy(update={"threads": threads}),
        quality_sample_rows=job.quality.sample_rows,
        columns=tuple(columns),
        task_columns=tuple(plan.task_columns),
        output_root=plan.output_root,
        sink=sink,
        schema=plan.schema,
        compression=job.output.compression,
        file_metadata=file_metadata(plan, run_id),
    )


def task_work(job: JobSpec, model: ModelInfo, settings: Settings, shape: TaskShape,
              run_id: str, job_fp: str) -> TaskWork:
    """The :class:`TaskWork` of a job with no input files or output (the Dask DataFrame
    path): ``model``, ``settings`` and ``shape`` as :func:`~lepton_batch.plan.build.
    resolve_task` returns them. Torch threads: the job's, else torch's default."""
    threads = job.engine.threads
    return TaskWork(
        run_id=run_id,
        job_name=job.name,
        job_fingerprint=job_fp,
        task=job.task,
        input=job.input,
        model=model,
        settings=settings,
        engine=engine_config(job, model, shape.head, settings, threads),
        batching=job.engine,
        quality_sample_rows=job.quality.sample_rows,
        task_columns=tuple(shape.columns),
    )
