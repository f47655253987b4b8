"""Failure injection for the crash tests: the process kills itself at a named point.

``LEPTON_BATCH_FAULT=<point>[@<n>]`` SIGKILLs the process the n-th time it passes
``checkpoint(point)``; with ``LEPTON_BATCH_FAULT_ONCE=<path>`` it fires only if that file
does not exist yet (and creates it), so a restarted Dask worker does not die again.
``LEPTON_BATCH_FAULT_DELAY=<point>:<seconds>[,...]`` sleeps there instead, each pass, so a
test can send a signal while a run is surely mid-way. With the variables unset (always,
outside the tests) a checkpoint is two environment lookups.
"""

from __future__ import annotations

import os
import signal
import threading
import time

FAULT_ENV = "LEPTON_BATCH_FAULT"
ONCE_ENV = "LEPTON_BATCH_FAULT_ONCE"
DELAY_ENV = "LEPTON_BATCH_FAULT_DELAY"
_passes: dict[str, int] = {}  # per-process pass counts; only consulted when FAULT_ENV is set
_lock = threading.Lock()


def checkpoint(point: str) -> None:
    """SIGKILL this process here if ``LEPTON_BATCH_FAULT`` names ``point`` (and pass n);
    sleep here if ``LEPTON_BATCH_FAULT_DELAY`` names it."""
    if delays := os.environ.get(DELAY_ENV):
        for item in delays.split(","):
            name, _, seconds = item.partition(":")
            if name == point:
                time.sleep(float(seconds))
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    name, _, nth = spec.partition("@")
    if name != point:
        return
    with _lock:
        _passes[point] = _passes.get(point, 0) + 1
        if _passes[point] != int(nth or 1):
            return
    once = os.environ.get(ONCE_ENV)
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    os.kill(os.getpid(), signal.SIGKILL)
