"""Watching a run from outside the worker: progress events and Prometheus metrics.

A worker posts a small event on the Dask topic :data:`TOPIC` about once a second while a
shard runs (the shard attempt's rows, tokens and padded tokens so far, cumulative) and once
when it finishes. Two consumers read the same stream: the driver's progress display
(``Client.subscribe_topic``) and :class:`MetricsPlugin` on the scheduler, which turns it
into Prometheus counters served on the scheduler's own ``/metrics`` endpoint (the dashboard
port), for Grafana.

Events are plain dicts (msgpack): ``{"kind": "shard", "job", "run", "shard", "attempt",
"rows", "tokens", "padded", "errors", "done"}``; the driver adds ``{"kind": "run", "job",
"run", "shards", "rows"}`` at start and ``{"kind": "failed", "job", "run", "shard"}``
when a shard fails for good.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from distributed.diagnostics.plugin import SchedulerPlugin

if TYPE_CHECKING:  # the scheduler unpickles MetricsPlugin: keep torch out of its imports
    from lepton_batch.engine import BatchStats

TOPIC = "lepton-batch"
INTERVAL = 1.0  # seconds between a running shard's progress events
RATE_WINDOW = 30.0  # seconds over which the tokens/s and rows/s gauges are measured
log = logging.getLogger(__name__)


class ShardWatch:
    """Posts a running shard's progress every :data:`INTERVAL` seconds from a thread.

    ``post(event)``: e.g. ``Worker.log_event`` bound to :data:`TOPIC`. ``stats`` is the
    engine's :class:`BatchStats`, which the compute thread fills as batches finish; reading
    its counters from another thread is safe (ints and a list that only grows).
    """

    def __init__(self, post: Callable[[dict], None], job: str, run_id: str, shard: int,
                 stats: BatchStats) -> None:
        self._post, self.stats = post, stats
        self._base = {"kind": "shard", "job": job, "run": run_id, "shard": shard,
                      "attempt": uuid.uuid4().hex[:8]}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True,
                                        name=f"lepton-batch-progress-{shard}")

    def __enter__(self) -> ShardWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def event(self, rows: int, tokens: int, padded: int, errors: int = 0,
              done: bool = False) -> dict:
        return self._base | {"rows": rows, "tokens": tokens, "padded": padded,
                             "errors": errors, "done": done}

    def _loop(self) -> None:
        last = None
        while not self._stop.wait(INTERVAL):
            s = self.stats
            now = (sum(s.sizes), s.tokens, s.padded_tokens)
            if now != last:
                self._send(self.event(*now))
                last = now

    def finish(self, rows: int, tokens: int, padded: int, errors: int) -> None:
        """The shard's final figures (from its record: copied rows included)."""
        self._send(self.event(rows, tokens, padded, errors, done=True))

    def _send(self, event: dict) -> None:
        try:
            self._post(event)
        except Exception as exc:  # progress is a nice to have; the shard is what counts
            log.debug("could not post progress: %s", exc)


class MetricTotals:
    """Per-job counters built from the event stream (what ``/metrics`` serves).

    A shard attempt's events are cumulative; only the increase since its last event is
    added, so an attempt that is retried counts the work it did before failing too
    (counters of work done, as Prometheus expects).
    """

    COUNTERS = ("rows", "tokens", "padded", "errors", "shards_done", "shards_failed")

    def __init__(self) -> None:
        self.counts: dict[str, dict[str, float]] = defaultdict(
            lambda: dict.fromkeys(self.COUNTERS, 0))
        self.planned: dict[str, dict[str, int]] = {}
        self.started: dict[str, float] = {}  # job -> when its latest run started (monotonic)
        self.running: dict[str, set[str]] = defaultdict(set)
        self._last: dict[tuple[str, str], tuple[int, int, int, int]] = {}
        self._recent: dict[str, deque[tuple[float, int, int]]] = defaultdict(deque)
        self._lock = threading.Lock()

    def add(self, msg: dict, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        job = str(msg.get("job", ""))
        with self._lock:
            kind = msg.get("kind")
            if kind == "run":
                self.planned[job] = {"shards": int(msg["shards"]), "rows": int(msg["rows"])}
                self.started[job] = now
            elif kind == "failed":
                self.counts[job]["shards_failed"] += 1
            elif kind == "shard":
                self._shard(job, msg, now)

    def _shard(self, job: str, msg: dict, now: float) -> None:
        key = (str(msg["run"]), str(msg["attempt"]))
        new = (int(msg["rows"]), int(msg["tokens"]), int(msg["padded"]), int(msg["errors"]))
        old = self._last.get(key, (0, 0, 0, 0))
        delta = [max(0, a - b) for a, b in zip(new, old, strict=True)]
        counts = self.counts[job]
        for name, d in zip(("rows", "tokens", "padded", "errors"), delta, strict=True):
            counts[name] += d
        self._recent[job].append((now, delta[0], delta[1]))
        if msg.get("done"):
            counts["shards_done"] += 1
            self._last.pop(key, None)
            self.running[job].discard(key[1])
        else:
            self._last[key] = new
            self.running[job].add(key[1])

    def rates(self, job: str, now: float | None = None) -> tuple[float, float]:
        """(rows/s, tokens/s) over the last :data:`RATE_WINDOW` seconds, or since the job's
        latest run started when that is more recent: the work done over the time it took,
        not over a window the run has not lived yet (8 s into a run, rows / 8 s)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            since = max(now - RATE_WINDOW, self.started.get(job, now - RATE_WINDOW))
            recent = self._recent[job]
            while recent and recent[0][0] <= since:  # an event counts the second before it
                recent.popleft()
            seconds = max(now - since, INTERVAL)  # events come once per INTERVAL
            return (sum(r for _, r, _ in recent) / seconds,
                    sum(t for _, _, t in recent) / seconds)


class PrometheusCollector:
    """A ``prometheus_client`` collector over :class:`MetricTotals` (metric names start
    with ``lepton_batch_``; every metric is labelled with the job name)."""

    HELP = {"rows": "Rows finished (copies of identical rows included)",
            "tokens": "Tokens run through the model",
            "padded": "Tokens the dense layers computed, padding included",
            "errors": "Rows with a value in the error column",
            "shards_done": "Shards finished",
            "shards_failed": "Shards that failed after their retries"}
    NAMES = {"padded": "padded_tokens", "errors": "error_rows"}

    def __init__(self, totals: MetricTotals) -> None:
        self.totals = totals

    def collect(self) -> Iterator:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        jobs = sorted(set(self.totals.counts) | set(self.totals.planned))
        for name, text in self.HELP.items():
            metric = CounterMetricFamily(f"lepton_batch_{self.NAMES.get(name, name)}", text,
                                         labels=["job"])
            for job in jobs:
                metric.add_metric([job], self.totals.counts[job][name])
            yield metric
        gauges = {
            "rows_per_second": ("Rows per second over the last 30 s (or since the run "
                                "started, if later)",
                                lambda j: self.totals.rates(j)[0]),
            "tokens_per_second": ("Tokens per second over the last 30 s (or since the "
                                  "run started, if later)",
                                  lambda j: self.totals.rates(j)[1]),
            "padding_efficiency": ("Real tokens / computed tokens so far",
                                   lambda j: self._efficiency(j)),
            "shards_running": ("Shard attempts running now", lambda j: len(self.totals.running[j])),
            "shards_planned": ("Shards the job's latest run planned",
                               lambda j: self.totals.planned.get(j, {}).get("shards", 0)),
        }
        for name, (text, value) in gauges.items():
            metric = GaugeMetricFamily(f"lepton_batch_{name}", text, labels=["job"])
            for job in jobs:
                metric.add_metric([job], value(job))
            yield metric

    def _efficiency(self, job: str) -> float:
        counts = self.totals.counts[job]
        return counts["tokens"] / counts["padded"] if counts["padded"] else 1.0


_registered: PrometheusCollector | None = None  # this process's collector, if any


class MetricsPlugin(SchedulerPlugin):
    """Scheduler plugin: lepton-batch counters on the scheduler's ``/metrics``.

    Registered once per scheduler (idempotent), so on a long-lived cluster the counters add
    up over runs, as Prometheus counters should. Needs ``prometheus_client`` and
    lepton-batch importable where the scheduler runs.
    """

    name = "lepton-batch-metrics"
    idempotent = True  # a second run on the same scheduler keeps the first one's counters

    totals: MetricTotals | None = None  # made on the scheduler: the plugin travels pickled

    async def start(self, scheduler) -> None:
        global _registered
        import prometheus_client

        self.totals = MetricTotals()
        if _registered is not None:  # a previous scheduler in this process
            prometheus_client.REGISTRY.unregister(_registered)
        _registered = PrometheusCollector(self.totals)
        prometheus_client.REGISTRY.register(_registered)

    async def close(self) -> None:
        global _registered
        import prometheus_client

        if _registered is not None and _registered.totals is self.totals:
            prometheus_client.REGISTRY.unregister(_registered)
            _registered = None

    def log_event(self, topic: str, msg) -> None:
        if topic == TOPIC and isinstance(msg, dict) and self.totals is not None:
            self.totals.add(msg)


def quiet_logs() -> None:
    """Keep the console for the run's own progress: Dask's and transformers' loggers at ERROR,
    the dashboard's web server (bokeh on tornado) silent. That server logs a traceback at
    ERROR when a browser tab closes mid-load, and Dask sets tornado.application to ERROR
    itself, on import (this module imports distributed first, so it runs after that)."""
    for name in ["bokeh", "tornado", *logging.root.manager.loggerDict]:
        top = name.split(".")[0]
        if top in ("bokeh", "tornado"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        elif top in ("distributed", "transformers"):
            logging.getLogger(name).setLevel(logging.ERROR)
