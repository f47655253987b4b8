"""A run's progress on the driver: figures from worker events and shard records, and the
three ways to show them (``--progress rich|plain|none``).

Workers post cumulative figures for the shard they run about once a second (see
``monitor.py``); a finished shard's record then replaces its live figures. The ETA comes
from the planned work: each shard's estimated tokens (``plan.estimate_work``), counted done
in proportion to the rows that ran, over the time since the first batch finished.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from lepton_batch.output.manifest import ShardRecord
from lepton_batch.run.monitor import INTERVAL
from lepton_batch.run.stopping import deferred

log = logging.getLogger(__name__)
SAMPLE_SECONDS = 0.5  # the throughput timeline keeps at most one point per this interval
# Padding efficiency is headlined (progress line, summary) only for runs of at least this
# many rows: on a few rows it measures one or two batches' length spread, not the engine
# ("padding eff. 5.9 %" on an 8-row night). report.json and report.html always carry it.
PADDING_MIN_ROWS = 256


@dataclass(frozen=True)
class Snapshot:
    shards_done: int
    shards_total: int
    shards_failed: int
    rows: int
    rows_total: int
    tokens: int
    padded: int
    errors: int
    fraction: float  # of the planned work (estimated tokens) done
    seconds: float  # since the first batch finished (0 before)
    eta: float | None  # seconds left, None until something finished

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def padding(self) -> float | None:
        return self.tokens / self.padded if self.padded else None


class RunProgress:
    """Thread-safe: events arrive on the Dask client's thread, records on the driver's.

    ``work``: shard index -> (rows to compute, estimated tokens) for the shards this run
    will compute; ``shards_total``/``skipped``: the plan's shards and those already done.
    """

    def __init__(self, work: dict[int, tuple[int, int]], shards_total: int, skipped: int) -> None:
        self.work = work
        self.total_work = sum(w for _, w in work.values()) or 1
        self.shards_total, self.skipped = shards_total, skipped
        self.start = time.monotonic()
        self.first: float | None = None  # when the first batch finished
        self.live: dict[int, tuple[int, int, int]] = {}  # shard -> rows, tokens, padded
        self.done: dict[int, ShardRecord] = {}
        self.failed = 0
        self.timeline: list[dict] = [{"t": 0.0, "rows": 0, "tokens": 0}]
        self._lock = threading.Lock()

    def event(self, msg: dict) -> None:
        """A worker's progress event for one of this run's shards (see monitor.py)."""
        if msg.get("kind") != "shard":
            return
        shard = int(msg["shard"])
        with self._lock:
            if shard in self.done or msg.get("done"):
                return  # the record is the shard's final word
            self.live[shard] = (int(msg["rows"]), int(msg["tokens"]), int(msg["padded"]))
            self._sample(force=False)

    def record(self, record: ShardRecord) -> None:
        with self._lock:
            self.live.pop(record.shard_index, None)
            self.done[record.shard_index] = record
            self._sample(force=True)

    def fail(self) -> None:
        with self._lock:
            self.failed += 1

    def _totals(self) -> tuple[int, int, int]:
        rows = sum(r.rows for r in self.done.values()) + sum(v[0] for v in self.live.values())
        tokens = (sum(r.tokens for r in self.done.values())
                  + sum(v[1] for v in self.live.values()))
        padded = (sum(r.padded_tokens for r in self.done.values())
                  + sum(v[2] for v in self.live.values()))
        return rows, tokens, padded

    def _sample(self, force: bool) -> None:
        now = time.monotonic()
        rows, tokens, _ = self._totals()
        if self.first is None and rows:
            # Events come every INTERVAL seconds: the first batch began up to one earlier.
            self.first = max(now - INTERVAL, self.start + self.timeline[-1]["t"])
        t = round(now - self.start, 3)
        if force or t - self.timeline[-1]["t"] >= SAMPLE_SECONDS:
            self.timeline.append({"t": t, "rows": rows, "tokens": tokens})

    def snapshot(self) -> Snapshot:
        with self._lock:
            rows, tokens, padded = self._totals()
            done_work = sum(self.work.get(i, (0, 0))[1] for i in self.done)
            for i, (live_rows, _, _) in self.live.items():
                planned_rows, w = self.work.get(i, (0, 0))
                done_work += w * min(1.0, live_rows / planned_rows) if planned_rows else 0
            fraction = min(1.0, done_work / self.total_work)
            seconds = time.monotonic() - self.first if self.first is not None else 0.0
            eta = seconds * (1 - fraction) / fraction if fraction > 0 and seconds else None
            return Snapshot(
                shards_done=self.skipped + len(self.done), shards_total=self.shards_total,
                shards_failed=self.failed, rows=rows,
                rows_total=sum(r for r, _ in self.work.values()), tokens=tokens, padded=padded,
                errors=sum(r.error_rows for r in self.done.values()), fraction=fraction,
                seconds=seconds, eta=eta)


def padding_headline(rows: int, tokens: int, padded: int) -> str:
    """The summary's ", padding efficiency 97.0%", or nothing for a run of fewer than
    :data:`PADDING_MIN_ROWS` rows."""
    if not padded or rows < PADDING_MIN_ROWS:
        return ""
    return f", padding efficiency {tokens / padded:.1%}"


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "ETA -:--:--"
    s = int(seconds + 0.5)
    return f"ETA {s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def describe(s: Snapshot) -> str:
    """One line: shards, rows, tokens/s, padding efficiency, errors, ETA."""
    parts = [f"shards {s.shards_done}/{s.shards_total}"
             + (f" ({s.shards_failed} failed)" if s.shards_failed else ""),
             f"rows {s.rows:,}/{s.rows_total:,}",
             f"{s.tokens_per_second:,.0f} tokens/s"]
    if s.padding is not None and s.rows_total >= PADDING_MIN_ROWS:
        parts.append(f"padding eff. {s.padding:.1%}")
    parts.append(f"errors {s.errors:,}")
    parts.append(_eta(0.0 if s.fraction >= 1 else s.eta))
    return " | ".join(parts)


class Display:
    """``--progress none``: shows nothing. The base of the other two."""

    def start(self, progress: RunProgress) -> None:
        self.progress = progress

    def update(self, finished: bool = False) -> None:
        pass

    def stop(self) -> None:
        pass


class PlainDisplay(Display):
    """``--progress plain`` (the default when stdout is not a terminal, e.g. cron): a log
    line per finished shard and at most one per ``every`` seconds in between."""

    def __init__(self, console: Console, every: float = 30.0) -> None:
        self.console, self.every, self._last = console, every, time.monotonic()

    def update(self, finished: bool = False) -> None:
        now = time.monotonic()
        if finished or now - self._last >= self.every:
            self._last = now
            with deferred():  # printed once and whole, even when a stop signal comes
                self.console.print(f"progress: {describe(self.progress.snapshot())}",
                                   soft_wrap=True)


class _TwoLines(Progress):
    """A bar, and under it the run's figures (one line would not fit 80 columns)."""

    line = ""

    def get_renderables(self):
        yield self.make_tasks_table(self.tasks)
        yield self.line


class RichDisplay(Display):
    """``--progress rich`` (the default on a terminal): a live bar over the planned work."""

    def __init__(self, console: Console) -> None:
        self.bar = _TwoLines(TextColumn("[bold]run"), BarColumn(),
                             TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(),
                             TextColumn("{task.fields[eta]}"), console=console)
        self.task = self.bar.add_task("run", total=1000, eta="")

    def start(self, progress: RunProgress) -> None:
        super().start(progress)
        self.bar.start()
        self.update()

    def update(self, finished: bool = False) -> None:
        s = self.progress.snapshot()
        line = describe(s)
        head, _, eta = line.rpartition(" | ")
        self.bar.line = head
        self.bar.update(self.task, completed=int(s.fraction * 1000), eta=eta)

    def stop(self) -> None:
        self.bar.stop()


def make_display(mode: str, console: Console) -> Display:
    """``rich``, ``plain`` or ``none``; ``auto``: rich on a terminal, plain otherwise."""
    if mode == "auto":
        mode = "rich" if console.is_terminal else "plain"
    return {"rich": RichDisplay, "plain": PlainDisplay}.get(mode, lambda c: Display())(console)
