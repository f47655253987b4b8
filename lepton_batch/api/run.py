"""``submit``, ``validate`` and ``read``: the job path of ``lepton-batch submit`` (load and
validate, plan, lock, resume, publish, report) called from Python, with typed exceptions
instead of exit codes. The functions underneath are the CLI's own: ``load_job`` /
``validate_job``, ``make_plan``, ``EarlyCluster`` and ``run_job``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import date
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lepton_batch.api.errors import Interrupted, JobError, OutputInUse, RunFailed
from lepton_batch.job.spec import (
    JobSpec,
    JobSpecError,
    load_job,
    parse_run_date,
    validate_job,
)
from lepton_batch.output.layout import OutputError
from lepton_batch.output.lock import OutputLocked

if TYPE_CHECKING:
    import polars as pl
    from rich.console import Console

    from lepton_batch.plan.build import Plan
    from lepton_batch.run.lifecycle import RunResult

Job = str | PathLike | Mapping[str, Any] | JobSpec


def _job_spec(job: Job, overrides: list[str] | None) -> tuple[JobSpec, str]:
    """The job validated, and the name its problems are reported under."""
    if isinstance(job, JobSpec):
        if overrides:  # overrides go through the same validation as a file's
            return validate_job(job.model_dump(exclude_unset=True), overrides, "job"), "job"
        return job, "job"
    if isinstance(job, Mapping):
        return validate_job(dict(job), overrides, "job"), "job"
    return load_job(Path(job), overrides), str(job)


def _as_job_error(exc: JobSpecError | OutputError) -> JobError:
    if isinstance(exc, JobSpecError):
        return JobError(exc.problems, exc.source)
    error = JobError([str(exc)], "output")
    error.args = (str(exc),)  # the output's own message, as the CLI prints it
    return error


def _plan(job: Job, set: list[str] | None, run_date: str | date | None,
          on_valid=None) -> Plan:
    from lepton_batch.plan.build import make_plan

    try:
        day = parse_run_date(run_date, "run_date", "arguments")
        spec, source = _job_spec(job, list(set or []))
        if on_valid is not None:
            on_valid(spec)
        return make_plan(spec, source, day)
    except OutputLocked:
        raise
    except (JobSpecError, OutputError) as exc:
        if isinstance(exc, JobError):
            raise
        raise _as_job_error(exc) from None


def _in_use(exc: OutputLocked, spec: JobSpec | None) -> OutputInUse:
    from lepton_batch.output.lock import holder
    from lepton_batch.plan.build import resolve_output_root

    output = spec.output.path if spec is not None else ""
    try:
        info = holder(resolve_output_root(output, spec.output.storage_options)) if spec else {}
    except Exception:  # who holds it is extra detail: the refusal stands without it
        info = {}
    return OutputInUse(str(exc), output, info)


def validate(job: Job, *, set: list[str] | None = None,
             run_date: str | date | None = None) -> Plan:
    """The job validated and planned, as ``lepton-batch validate`` shows it: its shards,
    settings (each with its source), job fingerprint and output schema (``plan.schema``,
    a pyarrow schema). Loads no model weights and starts no cluster.

    ``job``: a job file's path, a dict of its content, or a ``JobSpec``; ``set``: overrides
    as ``--set`` takes them (``["task.top_k=3"]``); ``run_date``: ``YYYY-MM-DD`` or a date
    (default today, UTC). Raises :class:`JobError` naming every bad field.

    >>> plan = lepton_batch.validate("jobs/quickstart.yaml", set=["output.path=/tmp/q"])
    >>> len(plan.shards), plan.rows, plan.schema.names[:2]
    (6, 2230, ['id', 'source'])
    """
    return _plan(job, set, run_date)


PROGRESS = ("none", "plain", "rich", "auto")


def submit(job: Job, *, set: list[str] | None = None,
           run_date: str | date | None = None, progress: str = "none") -> RunResult:
    """Run a job as ``lepton-batch submit`` does: plan it, take the output's lock, skip
    the shards already done (mode resume) or the unchanged rows (mode incremental), run the
    rest on Dask workers (an embedded cluster, started while the job is planned, or
    ``cluster.address``), publish only when every shard is done, and write the run report.

    ``progress``: ``"none"`` (default: print nothing), ``"plain"`` (a log line per finished
    shard and every 30 s, on stdout), ``"rich"`` (the live bar: shards, rows, tokens/s,
    padding, errors, ETA) or ``"auto"`` (rich on a terminal, else plain), as ``--progress``.

    Returns the :class:`~lepton_batch.run.lifecycle.RunResult`: ``rows``, ``error_rows``,
    ``tokens``, ``seconds``, ``rows_per_second``, ``shards_run`` / ``skipped`` /
    ``shards_failed``, ``output``, ``report_path``, ``run_id``, ``published``.

    Raises :class:`JobError` (invalid job or output; nothing ran), :class:`OutputInUse`
    (another run holds the output), :class:`RunFailed` (a shard or input file failed;
    nothing published, finished shards kept: submit again to resume) and
    :class:`Interrupted` (Ctrl-C or SIGTERM; stopped cleanly, resumable).

    >>> result = lepton_batch.submit("jobs/quickstart.yaml", set=["output.path=/tmp/q"])
    >>> result.rows, result.published, result.output
    (2230, True, '/tmp/q')
    """
    return run_submission(job, set, run_date, progress=progress)


def run_submission(job: Job, set: list[str] | None, run_date: str | date | None, *,
                   progress: str = "none", console: Console | None = None,
                   on_plan: Callable[[Plan], None] | None = None,
                   on_start: Callable[[RunResult], None] | None = None) -> RunResult:
    """:func:`submit`, with the hooks ``lepton-batch submit`` prints from: ``on_plan``
    once the job is planned, ``on_start`` as the run starts (shards to run known);
    ``console``: where the progress display draws (default: stdout)."""
    from lepton_batch.run.stopping import stoppable

    if progress not in PROGRESS:
        raise JobError([f"progress: {progress!r} is not one of {', '.join(PROGRESS)}"],
                       "arguments")
    early: list = []
    specs: list[JobSpec] = []

    def start_cluster(spec: JobSpec) -> None:
        specs.append(spec)
        if not spec.cluster.address:
            from lepton_batch.run.startup import EarlyCluster

            early.append(EarlyCluster.for_job(spec))  # the output's lock checked first

    result = None
    with stoppable(lambda: [cluster.close() for cluster in early]) as stop:
        try:
            plan = _plan(job, set, run_date, on_valid=start_cluster)
            if on_plan is not None:
                on_plan(plan)
            result = _run(plan, early[0] if early else None, progress, console, on_start)
        except OutputLocked as exc:
            raise _in_use(exc, specs[0] if specs else None) from None
        except OutputError as exc:  # a bad output found as the run starts
            raise _as_job_error(exc) from None
    if stop.signal:
        raise Interrupted(stop.signal, stop.exit_code, stop.line)
    assert result is not None, "run_job returned or raised"
    if not result.ok:
        raise RunFailed(result)
    return result


def _run(plan: Plan, early, progress: str, console: Console | None,
         on_start: Callable[[RunResult], None] | None) -> RunResult:
    """The planned job run, its progress drawn on ``console``."""
    from rich.console import Console

    from lepton_batch.run.lifecycle import run_job
    from lepton_batch.run.progress import make_display

    display = make_display(progress, console or Console())

    def started(result: RunResult) -> None:
        if on_start is not None:
            on_start(result)
        if result.progress is not None and result.skipped < result.planned:
            display.start(result.progress)

    try:
        return run_job(plan, on_start=started,
                       on_shard=lambda record: _quietly(display.update, True),
                       on_progress=lambda _: _quietly(display.update), early=early)
    finally:
        display.stop()


def _quietly(step, *args) -> None:
    """A progress display update: it may fail (a closed terminal), the run goes on."""
    try:
        step(*args)
    except Exception as exc:  # display only
        logging.getLogger(__name__).debug("progress display: %s", exc)


def read(output: str | PathLike, latest: bool = False) -> pl.LazyFrame:
    """The published rows of an output directory (a job's ``output.path``, Parquet or
    Delta) as a polars LazyFrame, with the ``run_date`` partition column: the rows
    ``lepton-batch inspect`` sees. ``latest``: each id's current rows only (its newest run;
    ids marked deleted left out), as ``inspect --latest``; in a snapshot output (modes
    resume, overwrite) every row is current.

    Raises ``InspectError`` (a ValueError) when ``output`` is not an output.

    >>> frame = lepton_batch.read("/tmp/q")
    >>> frame.select("id", "embedding").head(2).collect()
    """
    from lepton_batch.output.readers import read_rows

    rows = read_rows(Path(output))
    return rows.newest if latest else rows.every
