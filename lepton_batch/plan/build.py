"""Everything checked and decided before a model loads: model dir, inputs, shards.

``make_plan`` collects every problem into one :class:`JobSpecError`, so a user fixes a
job file in one pass instead of one error per run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from lepton_batch.engine.config import Head
from lepton_batch.job.modeldir import ModelInfo, inspect_model_dir, resolve_model_dir
from lepton_batch.job.settings import Settings, SettingsError, resolve_settings
from lepton_batch.job.shards import (
    BadFile,
    InputFile,
    Shard,
    check_columns,
    describe_files,
    plan_shards,
    redact,
)
from lepton_batch.job.spec import JobSpec, JobSpecError, fill_path, is_remote_url
from lepton_batch.output.contract import contract_document, output_schema
from lepton_batch.output.dataset import check_output_dir, computed_before, output_problem
from lepton_batch.output.sink import format_problem
from lepton_batch.plan.fingerprint import job_fingerprint
from lepton_batch.store import OutputPath, RemotePath, remote_root

if TYPE_CHECKING:
    from lepton_batch.pipelines import TaskShape
    from lepton_batch.plan.incremental import RowPlan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    job: JobSpec
    model: ModelInfo
    files: list[InputFile]
    shards: list[Shard]
    job_fingerprint: str
    output_root: OutputPath  # a local directory, or a RemotePath on an object store
    settings: Settings  # max_length, pooling, ...: from the job, else the model directory
    schema: pa.Schema  # the output's columns (the schema contract, see contract.py)
    run_date: date  # the run's partition, and what {run_date} in input.path means
    task_columns: list[str]  # input columns the task reads: what content_hash covers
    head: Head  # the engine the task runs on (its pipeline's head)
    bad_files: list[BadFile] = field(default_factory=list)  # unreadable; their rows not planned

    @property
    def rows(self) -> int:
        return sum(s.num_rows for s in self.shards)

    @property
    def contract(self) -> dict:
        """What ``_schema.json`` states for this job."""
        return contract_document(self.job, self.schema)

    def row_plan(self) -> RowPlan:
        """Mode incremental: the rows a run would compute against the output as it is now
        (reads the input's id and hashed columns; see incremental.py)."""
        from lepton_batch.output.dataset import published_parts
        from lepton_batch.plan.incremental import plan_rows

        root = self.output_root
        return plan_rows(self.shards, self.schema.field(self.job.input.id_column),
                         self.task_columns, self.job_fingerprint,
                         published_parts(root) if root.exists() else [], self.run_date,
                         self.job.output.tombstones)

    def backfill_note(self) -> str | None:
        """Mode incremental, a run date before the newest published night: what it does."""
        from lepton_batch.output.dataset import published_parts
        from lepton_batch.output.layout import RUNS_DIR
        from lepton_batch.plan.incremental import backfill_note, newest_night

        root = self.output_root
        if self.job.output.mode != "incremental" or not root.exists():
            return None
        return backfill_note(self.run_date, newest_night(
            published_parts(root), list(root.glob(f"{RUNS_DIR}/*/report.json"))))


def resolve_output_root(path: str, storage_options: dict | None = None) -> OutputPath:
    """A local directory, or a :class:`RemotePath` for an fsspec URL (``s3://...``)."""
    if is_remote_url(path):
        try:
            return remote_root(path, storage_options)
        except (ImportError, ValueError) as exc:  # an unknown protocol, s3fs not installed
            raise ValueError(f"output.path: {redact(path)}: {exc}") from None
    return Path(path.removeprefix("file://")).expanduser().resolve()


def today() -> date:
    """The default run date: today in UTC (``--run-date`` overrides it for backfills)."""
    return datetime.now(timezone.utc).date()


def resolve_task(job: JobSpec) -> tuple[ModelInfo | None, Settings | None,
                                       TaskShape | None, list[str]]:
    """The job's model directory checked, its settings resolved and its task's shape
    (engine head, input columns, output fields), with every problem found on the way; what
    a job and :func:`lepton_batch.map_partitions` both plan from. Loads no weights."""
    from lepton_batch.pipelines import task_shape

    problems: list[str] = []
    model = settings = None
    try:
        model = inspect_model_dir(resolve_model_dir(job.model.path),
                                  allow_pickle=job.model.allow_pickle,
                                  trust_remote_code=job.model.trust_remote_code)
    except (FileNotFoundError, ValueError) as exc:
        problems.append(str(exc))
    if model is not None:
        try:
            settings = resolve_settings(model, job.model, job.task, job.input.text_column)
        except SettingsError as exc:
            problems += exc.problems
    shape = None
    if model is not None and settings is not None:
        if model.max_positions and settings.max_length > model.max_positions:
            origin = settings.sources["max_length"]
            problems.append(
                f"model.max_length: {settings.max_length}"
                + ("" if origin == "job" else f" from the {origin}")
                + f" exceeds the model's max_position_embeddings ({model.max_positions})"
                + ("" if origin == "job" else "; set model.max_length")
            )
        try:
            shape = task_shape(job.task, model, settings, job.input)
        except ValueError as exc:
            problems.append(str(exc))
    return model, settings, shape, problems


def make_plan(job: JobSpec, source: str = "job file", run_date: date | None = None) -> Plan:
    """Check the model directory, the input files and columns, the output; cut shards.

    ``run_date`` (default today, UTC) fills ``{run_date}`` / ``{yesterday}`` in input.path.
    """
    given = run_date
    run_date = run_date or today()
    written = job.input.path
    job = job.model_copy(update={"input": job.input.model_copy(
        update={"path": fill_path(job.input.path, run_date)})})
    model, settings, shape, problems = resolve_task(job)
    files: list[InputFile] = []
    bad: list[BadFile] = []
    try:
        files, bad = describe_files(job.input.path)
    except (FileNotFoundError, OSError, ValueError) as exc:
        problem = str(exc) if str(exc).startswith("input.") else f"input.path: {exc}"
        if isinstance(exc, FileNotFoundError) and written != job.input.path:
            day = "--run-date" if given else "today (UTC); another night: --run-date YYYY-MM-DD"
            problem += f"; {written} was filled in for {run_date.isoformat()}, from {day}"
        problems.append(problem)
    if bad and not files:
        problems += [f"input.path: {b.path}: {b.reason}" for b in bad]
    for b in bad:
        log.warning("input file %s: %s; its rows are skipped and the run will not publish",
                    b.path, b.reason)
    inp = job.input
    if job.task.uses_template:
        # The prompt template names the columns; input.text_column is its default field.
        problems += check_columns(files, None, inp.id_column, inp.passthrough_columns,
                                  task_columns=list(shape.columns) if shape else [])
    else:
        problems += check_columns(files, inp.text_column, inp.id_column,
                                  inp.passthrough_columns)
    output_root = None
    try:
        output_root = resolve_output_root(job.output.path, job.output.storage_options)
    except ValueError as exc:
        problems.append(str(exc))
    if output_root is not None and (problem := check_output_dir(output_root)):
        problems.append(problem)
    if output_root is not None and (problem := _overlap(inp.path, output_root, files)):
        problems.append(problem)
    if problem := format_problem(job.output.format):  # a missing optional package
        problems.append(problem)
    schema = None
    if shape is not None and not problems:
        try:
            schema = output_schema(job, files, list(shape.fields))
        except ValueError as exc:
            problems.append(f"input: {exc}")
    if schema is not None and output_root is not None:
        problem = output_problem(output_root, job.output.mode, contract_document(job, schema))
        problems += [problem] if problem else []
    if problems:
        raise JobSpecError(problems, source)
    assert model is not None and settings is not None and output_root is not None
    assert shape is not None and schema is not None
    job_fp = job_fingerprint(job, model.revision, settings)
    # a large row group an earlier version computed as one shard stays one (resume)
    keep = computed_before(output_root, job_fp, job.output.mode) if output_root.exists() else None
    return Plan(
        job=job,
        model=model,
        files=files,
        shards=plan_shards(files, inp.rows_per_shard, keep_whole=keep),
        job_fingerprint=job_fp,
        output_root=output_root,
        settings=settings,
        schema=schema,
        run_date=run_date,
        task_columns=list(shape.columns),
        head=shape.head,
        bad_files=bad,
    )


def _input_dir(path: str) -> Path | None:
    """The local directory an input path scans (a glob's fixed prefix), or None for URLs."""
    if is_remote_url(path):
        return None
    local = Path(path.removeprefix("file://")).expanduser()
    parts = local.parts
    for i, part in enumerate(parts):
        if any(ch in part for ch in "*?["):
            return Path(*parts[:i]).resolve() if i else Path.cwd()
    local = local.resolve()
    return local if local.is_dir() else None


def _overlap(input_path: str, output_root: OutputPath, files: list[InputFile]) -> str | None:
    """Why input and output may not share a tree: either would read or delete the other."""
    if isinstance(output_root, RemotePath):
        inside = [f.path for f in files if f.path.startswith(output_root.uri + "/")]
        return f"output.path: {output_root} contains input file {inside[0]}" if inside else None
    for f in files:
        if "://" not in f.path and Path(f.path).resolve().is_relative_to(output_root):
            return f"output.path: {output_root} contains input file {f.path}"
    scanned = _input_dir(input_path)
    if scanned is not None and output_root.is_relative_to(scanned):
        return (f"output.path: {output_root} is inside the input directory {scanned}; the "
                "next run would read this output as input. Choose an output outside it")
    return None
