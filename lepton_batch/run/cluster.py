"""The one Dask boundary: a client, one task per shard, small records back. The run's
lifecycle around it (lock, staging, publish, report) is in ``run.py``.

Workers read their own shard and write their own part file; only a
:class:`~lepton_batch.output.manifest.ShardRecord` travels back to the driver. The engine is
cached on the worker object, so a model loads once per worker and later shards reuse it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import dask
import numpy as np
from dask.distributed import Client, LocalCluster, as_completed, get_worker, performance_report
from distributed import span
from distributed.metrics import context_meter

from lepton_batch.engine import BatchStats, EngineCache
from lepton_batch.faults import checkpoint
from lepton_batch.job.shards import Shard
from lepton_batch.job.spec import ClusterSpec
from lepton_batch.output.manifest import ShardRecord
from lepton_batch.plan.work import ShardWork
from lepton_batch.run import stopping
from lepton_batch.run.monitor import TOPIC, MetricsPlugin, ShardWatch
from lepton_batch.run.worker import PipelineCache, process_shard

log = logging.getLogger(__name__)
_CACHE_ATTR = "_lepton_batch_caches"
_CACHE_LOCK = threading.Lock()
_WARMING: list[threading.Event] = []  # warm-ups started in this process (see warm_up)
# Set in a worker's environment, beside TOKENIZERS_PARALLELISM=false, when open_client gave
# it one tokenizer thread for the warm-up; both go when the warm-up ends.
_ONE_THREAD = "LEPTON_BATCH_WARM_UP_TOKENIZER_THREAD"


class StartedCluster(Protocol):
    """A cluster started before the run needed it, by its owner (who also closes it), e.g.
    :class:`~lepton_batch.run.startup.EarlyCluster`: ``client()`` waits for it to be up;
    ``release()`` begins its shutdown once no more tasks will run on it."""

    def client(self) -> Client: ...

    def release(self) -> None: ...


@contextlib.contextmanager
def open_client(spec: ClusterSpec, warm: str | None = None) -> Iterator[Client]:
    """``Client(address)`` for an existing cluster, else an embedded LocalCluster.

    The embedded cluster binds scheduler and dashboard to 127.0.0.1 unless the job says
    otherwise; a busy dashboard port falls back to a free one. ``warm``: a model
    directory whose imports the embedded workers start at once (:func:`warm_up`).
    """
    if spec.address:
        with Client(spec.address) as client:
            yield client
        return
    # Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536. Setting it turns off
    # glibc's dynamic mmap threshold, so every activation tensor is mmapped and unmapped
    # again: measured 62 vs 81 rows/s for MiniLM on 2 cores, most of it page faults. Unset
    # it for our own workers (a value in the user's environment still wins).
    settings: dict = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
                      # Dask's statistical profiler samples torch's deep stacks every 10 ms
                      # and keeps an hour of them: the worker's peak RSS grew +25 % from a
                      # 2k- to a 20k-row corpus with it, +18 % without it (make
                      # bench-memory). Task timings and the dashboard do not need it.
                      "distributed.worker.profile.enabled": False}
    if spec.processes:  # worker processes leave Ctrl-C and SIGTERM to the driver
        settings["distributed.worker.preload"] = [
            *dask.config.get("distributed.worker.preload", []), stopping.PRELOAD]
    one_thread = warm and spec.processes and (os.cpu_count() or 1) <= 2 and (
        "TOKENIZERS_PARALLELISM" not in os.environ)
    if one_thread:
        # The worker tokenizes its first shard while its warm-up imports torch and
        # transformers on one of the two cores: the tokenizer on the other one alone is
        # faster than both fighting over two (20,000 rows, import + tokenize: 4.6 s vs 5.7 s
        # in parallel, 6.8 s in series). The warm-up gives the tokenizer its threads back.
        settings["distributed.nanny.environ.TOKENIZERS_PARALLELISM"] = "false"
        settings[f"distributed.nanny.environ.{_ONE_THREAD}"] = "1"
    host = spec.dashboard_address.rpartition(":")[0]
    if host and host not in ("0.0.0.0", "::", "[::]"):
        # Thread workers talk in-process and Dask would print this machine's public IP in
        # the link; the dashboard listens on ``host`` only, so link to that.
        settings["distributed.dashboard.link"] = f"http://{host}:{{port}}/status"
    with dask.config.set(settings), LocalCluster(
        n_workers=spec.n_workers,
        threads_per_worker=spec.threads_per_worker,
        processes=spec.processes,
        # Process workers talk TCP, bound to loopback; thread workers use in-process comms.
        host="127.0.0.1" if spec.processes else None,
        dashboard_address=spec.dashboard_address,
        # Thread workers would otherwise serve their own HTTP endpoint on 0.0.0.0.
        worker_dashboard_address=None if spec.processes else "127.0.0.1:0",
        silence_logs=logging.WARNING,
    ) as cluster, Client(cluster) as client:
        client.run(_quiet_worker_logs)
        if warm:
            client.run(warm_up, warm)
        yield client


class _ShutdownRace(logging.Filter):
    """Drops what an embedded worker may log as the driver shuts the cluster down: after a
    finished run, its heartbeat finding the scheduler's comm closed (a race inside Dask;
    the scheduler lives in the driver, so it never means a scheduler lost mid-run); after
    Ctrl-C or SIGTERM, the warning that its running task was cancelled."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("Failed to communicate with scheduler during heartbeat")
                    or msg.startswith("Async instruction for <Task cancelled")
                    and msg.endswith("ended with CancelledError"))


def _quiet_worker_logs() -> None:
    """On an embedded worker: no log lines that report nothing wrong."""
    # Dask's statistical profiler records torch's deep call stacks; sizing them for the
    # dashboard overflows the recursion limit and logs a harmless warning per run.
    logging.getLogger("distributed.sizeof").setLevel(logging.ERROR)
    for name in ("distributed.worker", "distributed.worker.state_machine"):
        worker_log = logging.getLogger(name)
        if not any(isinstance(f, _ShutdownRace) for f in worker_log.filters):
            worker_log.addFilter(_ShutdownRace())


def warm_up(model_dir: str) -> None:
    """Start importing what the first shard will need, on a thread of this process.

    A fresh worker spends seconds importing torch, transformers and the model's modeling
    module, and on a GPU creating the CUDA context, before its first batch; started here,
    that overlaps the driver's planning. Meanwhile the first task reads its shard and, for
    an encoder task, tokenizes it (``EngineCache.pretokenize``); it waits for the warm-up
    to end before anything imports transformers (:func:`_after_warm_up`): transformers'
    lazy module is not safe to import from two threads at once. Best effort: a failure
    here only means the first task does the work itself.
    """
    done = threading.Event()
    with _CACHE_LOCK:
        _WARMING.append(done)
    threading.Thread(target=_warm_imports, args=(model_dir, done), daemon=True,
                     name="lepton-warm-up").start()


def _warming() -> bool:
    """Whether a warm-up started in this process is still importing."""
    with _CACHE_LOCK:
        return not all(done.is_set() for done in _WARMING)


def _after_warm_up(timeout: float = 300.0) -> None:
    """Block until every warm-up started in this process has ended."""
    with _CACHE_LOCK:
        pending = list(_WARMING)
    for done in pending:
        done.wait(timeout)
    _tokenizer_threads_back()  # a restarted worker has no warm-up to do it


def _tokenizer_threads_back() -> None:
    """The tokenizer's thread pool back, once the warm-up is over (see open_client)."""
    if os.environ.pop(_ONE_THREAD, None):
        os.environ.pop("TOKENIZERS_PARALLELISM", None)


def _warm_imports(model_dir: str, done: threading.Event) -> None:
    try:
        import torch
        import transformers

        import lepton_batch.engine.encoder  # noqa: F401  (and the kernels it imports)
        from lepton_batch.job.modeldir import resolve_model_dir

        config = transformers.AutoConfig.from_pretrained(str(resolve_model_dir(model_dir)))
        for name in getattr(config, "architectures", None) or []:
            getattr(transformers, name, None)  # imports the architecture's modeling module
        if torch.cuda.is_available():
            torch.zeros(1, device="cuda")  # the CUDA context
    except Exception as exc:  # the first task will import (and report) it again
        log.debug("warm-up of %s stopped: %s", model_dir, exc)
    finally:
        _tokenizer_threads_back()
        done.set()


class _Process:
    """Where the caches live when a task runs outside a Dask worker (Dask's local
    schedulers, for a Dask DataFrame computed without a distributed Client)."""


def worker_caches() -> tuple[EngineCache, PipelineCache]:
    """The engine and pipeline caches that live on this Dask worker (created on first
    use): a model loads, and a pipeline is built, once per worker. Outside a worker: once
    per process."""
    try:
        holder: object = get_worker()
    except ValueError:  # not in a distributed worker
        holder = _Process
    with _CACHE_LOCK:
        caches = getattr(holder, _CACHE_ATTR, None)
        if caches is None:
            caches = EngineCache(warming=_warming, wait=_after_warm_up), PipelineCache()
            setattr(holder, _CACHE_ATTR, caches)
    return caches


def _run_shard(shard: Shard, work: ShardWork, rows: np.ndarray | None) -> ShardRecord:
    """The task: one shard, its stages timed by Dask's ``context_meter`` (the dashboard's
    fine performance metrics) and its progress posted on :data:`~lepton_batch.run.monitor.TOPIC`."""
    worker = get_worker()
    stats = BatchStats()
    engines, pipelines = worker_caches()
    with ShardWatch(lambda event: worker.log_event(TOPIC, event), work.job_name, work.run_id,
                    shard.index, stats) as watch:
        record = process_shard(shard, work, engines, rows, pipelines=pipelines,
                               meter=context_meter.meter, stats=stats)
    watch.finish(record.rows, record.tokens, record.padded_tokens, record.error_rows)
    return record


def task_key(work: ShardWork, shard: Shard) -> str:
    """``embed-<job>-shard-0042``: the dashboard groups tasks by the part before the number."""
    return f"{work.task.kind}-{work.job_name}-shard-{shard.index:04d}"


def _start_metrics(client: Client) -> None:
    """Our counters on the scheduler's ``/metrics`` (see monitor.py); a warning if the
    scheduler cannot take the plugin (lepton-batch or prometheus_client not installed
    where it runs)."""
    try:
        client.register_plugin(MetricsPlugin())
    except Exception as exc:  # monitoring is optional; the run is what counts
        log.warning("no lepton-batch metrics on the scheduler's /metrics: %s", exc)


@contextlib.contextmanager
def optional_performance_report(filename: Path | None) -> Iterator[None]:
    """Dask's performance report around the block, if it can be made: the report is a nice
    to have, so a failure to start or save it (bokeh missing, say) is a warning, never an
    error that hides a finished run. ``filename`` None: no report."""
    if filename is None:
        yield
        return
    try:
        report = performance_report(filename=str(filename))
        report.__enter__()
    except Exception as exc:  # an optional step: the data is what counts
        log.warning("no Dask performance report: %s", exc)
        yield
        return
    try:
        yield
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: stop at once (the report takes seconds)
        raise
    except BaseException as exc:
        _save_report(report, (type(exc), exc, exc.__traceback__), filename)
        raise
    _save_report(report, (None, None, None), filename)


def _save_report(report, exc_info: tuple, filename: Path) -> None:
    try:
        report.__exit__(*exc_info)
    except Exception as exc:
        log.warning("could not save the Dask performance report %s: %s", filename, exc)


def run_shards(todo: list[Shard], work: ShardWork, spec: ClusterSpec, report_file: Path | None,
               on_start: Callable[[str | None], None],
               on_record: Callable[[ShardRecord], None],
               on_failure: Callable[[str, str], None],
               rows: dict[str, np.ndarray] | None = None,
               on_progress: Callable[[dict], None] | None = None,
               early: StartedCluster | None = None) -> None:
    """Submit one task per shard, each with ``work``, on the cluster ``spec`` names, and
    report each record (or failure) as it finishes.

    ``on_start(dashboard_link)`` is called once the cluster is up; ``report_file``: where
    Dask's performance report goes (a local path), or None. ``rows``: shard
    fingerprint -> the positions to compute in that shard (mode incremental); None: all.
    ``on_progress(event)``: this run's progress events (see monitor.py), called on the
    client's event-loop thread. All tasks run inside one Dask span named after the job.
    ``early``: an embedded cluster already started for this run; its shutdown begins here
    once the tasks are done (``early.release()``), and its owner closes it.
    """
    clients = contextlib.nullcontext(early.client()) if early else open_client(
        spec, warm=str(work.model.path))
    with clients as client:
        checkpoint("cluster-started")
        _start_metrics(client)
        if on_progress is not None:
            client.subscribe_topic(TOPIC, lambda event: _ours(event, work.run_id, on_progress))
        client.log_event(TOPIC, {"kind": "run", "job": work.job_name, "run": work.run_id,
                                 "shards": len(todo), "rows": sum(
                                     s.num_rows if rows is None else len(rows[s.fingerprint])
                                     for s in todo)})
        on_start(client.dashboard_link)
        with optional_performance_report(report_file), span(work.job_name):
            futures = [
                client.submit(_run_shard, shard, work,
                              None if rows is None else rows[shard.fingerprint],
                              key=task_key(work, shard), retries=spec.retries, pure=False)
                for shard in todo
            ]
            for future in as_completed(futures):
                if future.status == "error":
                    client.log_event(TOPIC, {"kind": "failed", "job": work.job_name,
                                             "run": work.run_id, "shard": future.key})
                    on_failure(future.key, _describe_failure(future.exception()))
                    continue
                on_record(future.result())
                future.release()
        if on_progress is not None:
            client.unsubscribe_topic(TOPIC)
    if early:  # nothing more runs on it: let the workers exit while the driver publishes
        early.release()


def _ours(event: tuple[float, dict], run_id: str, handler: Callable[[dict], None]) -> None:
    _, msg = event
    if isinstance(msg, dict) and msg.get("run") == run_id:
        try:
            handler(msg)
        except Exception as exc:  # a display problem must not stop the event stream
            log.debug("progress handler failed: %s", exc)


def _describe_failure(exc: BaseException) -> str:
    """A shard's failure in one line: the exception type and message (which, for input
    errors, name the file and row groups)."""
    return f"{type(exc).__name__}: {exc}"
