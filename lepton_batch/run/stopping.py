"""Stopping a run on request: Ctrl-C (SIGINT) and SIGTERM, what Airflow, Kubernetes and
systemd send, end a run the same way.

SIGTERM raises :class:`Terminated` in the main thread, a ``KeyboardInterrupt``, so every
cleanup that handles Ctrl-C handles it too: the lock is released, finished shards stay
staged, the cluster shuts down, and the same command resumes. Only the driver decides:
the embedded cluster's worker processes ignore both signals (:func:`dask_setup`, a Dask
worker preload), so a signal sent to the whole process group (a terminal's Ctrl-C,
systemd's ``KillMode=control-group``, Airflow) prints no worker traceback; the driver
stops them as it shuts the cluster down. Exit codes follow the shell's ``128 + signal``:
130 for SIGINT, 143 for SIGTERM.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
PRELOAD = __name__  # the module Dask imports on each embedded worker (distributed.worker.preload)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C's KeyboardInterrupt is."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (main thread only)."""
    if not _main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def held() -> Iterator[list[int]]:
    """SIGINT and SIGTERM wait while the block runs (a critical section such as the
    cluster's shutdown, where a second Ctrl-C would only cut it short and print Dask's
    traceback); the list the block gets holds the signals that arrived meanwhile."""
    arrived: list[int] = []
    if not _main_thread():
        yield arrived
        return
    previous = {s: signal.signal(s, lambda signum, frame: arrived.append(signum))
                for s in STOP_SIGNALS}
    try:
        yield arrived
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """As :func:`held`, but a stop signal that arrived is delivered right after the block,
    to the handler in place. For a line being printed: rich writes its buffer, then clears
    it, and a Ctrl-C in between would print the line again before the next one."""
    with held() as arrived:
        yield
    if arrived:
        signal.raise_signal(arrived[0])


def block_in_this_thread() -> None:
    """Block SIGINT and SIGTERM in the calling (helper) thread. Threads it starts, and the
    processes they spawn, inherit the mask: the embedded cluster is started from such a
    thread, so its worker processes cannot be hit by a signal before :func:`dask_setup`
    runs. The main thread, which decides, still receives both."""
    if not _main_thread():
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def _ignore(signum: int, frame: object) -> None:
    """A no-op handler rather than SIG_IGN: a handler is reset by exec, so programs the
    worker starts (a compiler's process pool, say) keep the default dispositions."""


def dask_setup(worker: object) -> None:
    """Dask worker preload: an embedded worker process ignores SIGINT and SIGTERM (the
    driver shuts it down; its nanny kills it if it must). Nothing on a thread worker,
    which runs in the driver's own process."""
    if not _main_thread():
        return
    for s in STOP_SIGNALS:
        signal.signal(s, _ignore)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # see block_in_this_thread


@dataclass
class Stop:
    """How a :func:`stoppable` block ended: ``signal`` None, or the signal that stopped it."""

    signal: str | None = None

    @property
    def exit_code(self) -> int:
        return 128 + getattr(signal, self.signal) if self.signal else 0

    @property
    def line(self) -> str:
        """The one line to print after a stop on request."""
        kept = ("finished shards are kept (staged, not yet published); run the same command "
                "again to resume")
        if self.signal == "SIGTERM":
            return f"terminated (SIGTERM): stopped cleanly; {kept}"
        return f"interrupted: stopped cleanly; {kept}"


@contextlib.contextmanager
def stoppable(close: Callable[[], object]) -> Iterator[Stop]:
    """Run the block with SIGTERM as :class:`Terminated`; a Ctrl-C or SIGTERM ends it
    quietly, recorded in the :class:`Stop` it yields. ``close()`` (the cluster's shutdown)
    then runs with both signals held, so that nothing is printed after the caller's last
    line and a second Ctrl-C cannot cut the shutdown short."""
    stop = Stop()
    with sigterm_as_interrupt():
        try:
            yield stop
        except KeyboardInterrupt as exc:
            stop.signal = "SIGTERM" if isinstance(exc, Terminated) else "SIGINT"
        finally:
            with held():
                close()
