"""A run's lifecycle: lock the output, stage, run shards on Dask, publish, report.

The order is what makes a run safe to kill anywhere: the directory is marked as ours
before anything else, one writer holds the lock, shards land in staging, and only a run
whose every planned shard is done publishes (the sink's business: output/sink.py).
Reporting comes after the publish and can only warn.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from lepton_batch.faults import checkpoint
from lepton_batch.output.dataset import init_output, published_parts, run_dir
from lepton_batch.output.lock import output_lock
from lepton_batch.output.manifest import ShardRecord
from lepton_batch.output.sink import make_sink
from lepton_batch.plan.build import Plan
from lepton_batch.plan.estimate import estimate_work
from lepton_batch.plan.incremental import RowPlan
from lepton_batch.plan.work import shard_work
from lepton_batch.run.cluster import StartedCluster, run_shards
from lepton_batch.run.progress import RunProgress
from lepton_batch.store import OutputPath

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """One run of a job, as ``run_job`` (and ``lepton_batch.submit``) returns it: what the
    CLI's summary prints (``rows``, ``error_rows``, ``tokens``, ``seconds``,
    ``rows_per_second``, ``shards_run`` / ``skipped`` / ``shards_failed``, ``output``,
    ``report_path``, ``run_id``, ``published``).

    >>> result = lepton_batch.submit("jobs/quickstart.yaml")
    >>> f"{result.rows} rows, {result.shards_run} run, {result.skipped} skipped"
    '2230 rows, 6 run, 0 skipped'
    """

    run_id: str
    planned: int
    skipped: int
    run_date: str = ""
    mode: str = "resume"
    rows_plan: RowPlan | None = None  # mode incremental: what the anti-join left to compute
    records: list[ShardRecord] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)  # shard key or input file -> cause
    seconds: float = 0.0
    report_dir: str = ""
    dashboard: str | None = None
    published: bool = False
    started: float = 0.0  # epoch seconds the run started (run_job's call)
    progress: RunProgress | None = None  # live figures while the shards run
    output: str = ""  # the output's root (output.path resolved)

    @property
    def started_at(self) -> str:
        """``started`` in UTC, to the second (ISO 8601); empty before the run starts."""
        if not self.started:
            return ""
        return datetime.fromtimestamp(self.started, timezone.utc).isoformat(timespec="seconds")

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def rows(self) -> int:
        return sum(r.rows for r in self.records)

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.records)

    @property
    def padded_tokens(self) -> int:
        return sum(r.padded_tokens for r in self.records)

    @property
    def error_rows(self) -> int:
        return sum(r.error_rows for r in self.records)

    @property
    def deduplicated_rows(self) -> int:
        return sum(r.deduplicated_rows for r in self.records)

    @property
    def shards_run(self) -> int:
        return len(self.records)

    @property
    def shards_failed(self) -> int:
        return len(self.failures)

    @property
    def rows_per_second(self) -> float:
        return self.rows / max(self.seconds, 1e-9)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    @property
    def report_path(self) -> str:
        """The run's ``report.html`` when it was written, else its ``report.json`` (or its
        folder, before the report is written)."""
        if "://" in self.report_dir or not self.report_dir:
            return self.report_dir
        for name in ("report.html", "report.json"):
            if (Path(self.report_dir) / name).is_file():
                return str(Path(self.report_dir) / name)
        return self.report_dir

    @property
    def first_batch_seconds(self) -> float | None:
        """Seconds from the run's start to the first batch any worker launched (workers on
        other machines: their clocks' skew included); None when no batch ran."""
        times = [r.first_batch_at for r in self.records if r.first_batch_at]
        return round(min(times) - self.started, 3) if times and self.started else None

    def summary(self, plan: Plan) -> dict:
        """The figures written to ``_SUCCESS`` and ``report.json``."""
        seconds = max(self.seconds, 1e-9)
        out = {
            "run_id": self.run_id,
            "job": plan.job.name,
            "job_fingerprint": plan.job_fingerprint,
            "mode": self.mode,
            "run_date": self.run_date,
            "shards_planned": self.planned,
            "shards_skipped": self.skipped,
            "shards_run": len(self.records),
            "shards_failed": len(self.failures),
            "failures": self.failures,
            "rows": self.rows,
            "tokens": self.tokens,
            "padded_tokens": self.padded_tokens,
            "error_rows": self.error_rows,
            # rows that took an identical row's result instead of a model call
            "rows_deduplicated": self.deduplicated_rows,
            "seconds": round(self.seconds, 3),
            "rows_per_second": round(self.rows / seconds, 2),
            "tokens_per_second": round(self.tokens / seconds, 1),
            "published": self.published,
        }
        if self.first_batch_seconds is not None:
            out["first_batch_seconds"] = self.first_batch_seconds
        if self.padded_tokens:
            out["padding_efficiency"] = round(self.tokens / self.padded_tokens, 4)
        if self.rows_plan is not None:
            out |= {"rows_input": self.rows_plan.input_rows,
                    "rows_unchanged": self.rows_plan.unchanged,
                    "rows_to_compute": self.rows_plan.to_compute,
                    "ids_gone_from_input": self.rows_plan.gone}
            if self.rows_plan.deleted is not None:  # output.tombstones
                out["ids_marked_deleted"] = len(self.rows_plan.deleted)
            if self.rows_plan.restated:  # a backfill (driver_rows.py)
                out["ids_restated"] = self.rows_plan.restated
        return out


def _sum_counts(histograms: list[list[int]]) -> list[int]:
    out = [0] * max((len(h) for h in histograms), default=0)
    for h in histograms:
        for i, count in enumerate(h):
            out[i] += count
    return out


def report_document(plan: Plan, result: RunResult) -> dict:
    """``report.json``: the run's summary plus what the HTML report plots (see report.py)."""
    records = sorted(result.records, key=lambda r: r.shard_index)
    stages: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for r in records:
        stages.update(r.stage_seconds)
        errors.update(r.errors_by_message)
    lengths = _sum_counts([r.length_histogram for r in records])
    batches = _sum_counts([r.batch_rows_histogram for r in records])
    model = plan.model
    doc = result.summary(plan) | {
        "started_at": result.started_at,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "task": plan.job.task.kind,
        "model": {"name": plan.job.model.path, "path": str(model.path), "type": model.model_type,
                  "revision": model.revision},
        "settings": plan.settings.values(),
        "engines": sorted({r.engine for r in records if r.engine}),
        "stages": {k: round(v, 3) for k, v in stages.items()},
        "shards": [{"index": r.shard_index, "rows": r.rows, "tokens": r.tokens,
                    "padded_tokens": r.padded_tokens,
                    "padding_efficiency": round(r.tokens / r.padded_tokens, 4)
                    if r.padded_tokens else None,
                    "error_rows": r.error_rows, "truncated_rows": r.truncated_rows,
                    "batches": r.batches, "seconds": r.seconds, "stages": r.stage_seconds,
                    "worker": r.worker, "finished_at": r.finished_at, "engine": r.engine}
                   for r in records],
        "throughput": result.progress.timeline if result.progress else [],
        "length_histogram": {"bin_width": max((r.length_bin_width for r in records), default=0),
                             "counts": lengths},
        "batch_rows_histogram": {"edges": [2 ** k for k in range(len(batches))],
                                 "counts": batches},
        "errors_by_message": dict(errors.most_common()),
    }
    if isinstance(plan.output_root, Path) and result.records:  # Dask's report needs a local dir
        doc["dask_report"] = "dask-report.html"
    return doc


def write_report(report_dir: OutputPath, document: dict) -> list[str]:
    """``report.json`` and, made from it, ``report.html``; returns the paths written. The
    HTML needs a local folder and Bokeh; without them it is left out with a warning."""
    from lepton_batch.output.manifest import write_json

    write_json(report_dir / "report.json", document)
    written = [str(report_dir / "report.json")]
    if isinstance(report_dir, Path):
        from lepton_batch.run.report import write_html

        try:
            write_html(document, report_dir / "report.html")
            written.append(str(report_dir / "report.html"))
        except Exception as exc:  # a plot problem must not hide the figures
            log.warning("could not write %s: %s", report_dir / "report.html", exc)
    return written


def run_job(plan: Plan, on_start: Callable[[RunResult], None] | None = None,
            on_shard: Callable[[ShardRecord], None] | None = None,
            on_progress: Callable[[RunProgress], None] | None = None,
            early: StartedCluster | None = None) -> RunResult:
    """Run every shard not already done; publish the dataset and ``_SUCCESS`` when all are.

    ``on_start(result)``: once the cluster is up (``result.progress`` is then set);
    ``on_shard(record)``: each finished shard; ``on_progress(progress)``: after each worker
    progress event, on the Dask client's thread. ``early``: an embedded cluster the caller
    started while planning (:class:`~lepton_batch.run.startup.EarlyCluster`); the caller
    closes it.

    Raises OutputError (OutputLocked) before any work when the output cannot be used.
    A failed shard or unreadable input file leaves the finished shards staged and the
    published dataset untouched; rerunning the same job resumes from the staged shards.
    """
    job = plan.job
    started = time.perf_counter()
    now = datetime.now(timezone.utc)
    # Sorts by start time to the millisecond: "newest row per id" orders runs by it.
    run_id = f"{now:%Y%m%dT%H%M%S}{now.microsecond // 1000:03d}-{uuid.uuid4().hex[:6]}"
    root = plan.output_root
    mode = job.output.mode
    sink = make_sink(job.output.format, root, mode=mode, job_fingerprint=plan.job_fingerprint,
                     run_id=run_id, run_date=plan.run_date.isoformat())
    shard_fps = {s.fingerprint for s in plan.shards}
    init_output(root)
    with output_lock(root, run_id):
        checkpoint("locked")
        done = sink.prepare(shard_fps, plan.contract)
        checkpoint("prepared")
        rows_plan = None
        if mode == "incremental":
            rows_plan = plan.row_plan()
            shard_fps = set(rows_plan.rows)  # the shards publish waits for
        todo = [s for s in plan.shards if s.fingerprint in shard_fps and s.fingerprint not in done]
        result = RunResult(run_id=run_id, planned=len(plan.shards),
                           skipped=len(plan.shards) - len(todo), mode=mode,
                           run_date=plan.run_date.isoformat(), rows_plan=rows_plan,
                           started=now.timestamp(), output=str(root))
        work = estimate_work(plan, rows_plan.rows if rows_plan else None) if todo else {}
        result.progress = RunProgress({s.index: work[s.index] for s in todo if s.index in work},
                                      len(plan.shards), result.skipped)
        report = run_dir(root, run_id)
        result.report_dir = str(report)
        ctx = shard_work(plan, run_id, sink)

        def started_cluster(dashboard: str | None) -> None:
            result.dashboard = dashboard
            if on_start:
                on_start(result)

        def finished(record: ShardRecord) -> None:
            sink.shard_done(record)  # Delta commits it now in some modes
            result.records.append(record)
            result.progress.record(record)
            checkpoint("shard-recorded")
            if on_shard:
                on_shard(record)

        def failed(key: str, cause: str) -> None:
            result.failures[key] = cause
            result.progress.fail()
            log.error("shard %s failed: %s", key, cause)

        def progressed(event: dict) -> None:
            result.progress.event(event)
            if on_progress:
                on_progress(result.progress)

        if todo:
            # Dask writes its report to a local file; an object-store output goes without.
            dask_report = report / "dask-report.html" if isinstance(report, Path) else None
            run_shards(todo, ctx, job.cluster, dask_report, started_cluster, finished, failed,
                       rows=rows_plan.rows if rows_plan else None, on_progress=progressed,
                       early=early)
        else:
            started_cluster(None)
        for bad in plan.bad_files:
            result.failures[f"input {bad.path}"] = bad.reason
        partitions = {}  # tombstones and a backfill's restated rows (driver_rows.py)
        if result.ok and rows_plan is not None and (rows_plan.deleted or rows_plan.restated):
            from lepton_batch.run.driver_rows import write_driver_rows

            for marks, day in write_driver_rows(ctx, job.input.id_column, rows_plan,
                                                plan.run_date, published_parts(root),
                                                job.output.compression):
                shard_fps = shard_fps | {marks.shard_fingerprint}
                partitions[marks.shard_fingerprint] = day
                sink.shard_done(marks)
        result.seconds = time.perf_counter() - started
        if result.ok:
            result.published = True
            sink.publish(shard_fps, result.summary(plan), plan.contract, partitions)
    checkpoint("published")
    try:
        write_report(report, report_document(plan, result))
    except Exception as exc:  # the data is published; a report can only warn
        log.warning("could not write the run report in %s: %s", report, exc)
    return result
