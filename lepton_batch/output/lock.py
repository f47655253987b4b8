"""One writer per output: an exclusive ``flock`` on ``<root>/_lock`` held for the whole run.

The kernel drops the lock when its process exits, however it exits (SIGKILL included), so
a crashed run never leaves the output stuck. The file's content only names the holder
(host, pid, run id, since) for the message a second writer gets. On an object store, where
there is no ``flock``, the holder keeps a renewed lease in ``_lock`` instead (``_lease``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone

from lepton_batch.output.layout import LOCK, OutputError
from lepton_batch.store import OutputPath, RemotePath


class OutputLocked(OutputError):
    """Another run holds the output's lock."""


def _holder(path: OutputPath) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process (it has not written its name yet)"
    return (f"host {info.get('host')}, pid {info.get('pid')}, run {info.get('run_id')}, "
            f"since {info.get('since')}")


def _taken(root: OutputPath, path: OutputPath) -> OutputLocked:
    return OutputLocked(
        f"output.path: {root} is being written by another lepton-batch run "
        f"({_holder(path)}). Wait for it to finish or stop it; the lock is released "
        "as soon as that process exits, even if it crashes.")


def check_free(root: OutputPath) -> None:
    """Raise OutputLocked now if another run holds ``root``'s lock, before a cluster is
    started for nothing. Only a look: ``output_lock`` still decides."""
    if isinstance(root, RemotePath):
        _lease_free(root)
        return
    try:
        fd = os.open(root / LOCK, os.O_RDONLY)
    except OSError:  # no lock file (a new output), or not readable: output_lock decides
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _taken(root, root / LOCK) from None
    finally:
        os.close(fd)  # releases the shared lock, if taken


@contextlib.contextmanager
def output_lock(root: OutputPath, run_id: str) -> Iterator[None]:
    """Hold ``root``'s writer lock for the ``with`` block; raise OutputLocked if taken."""
    if isinstance(root, RemotePath):
        with _lease(root, run_id):
            yield
        return
    path = root / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _taken(root, path) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, _info(run_id), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


LEASE_SECONDS = 120.0


def _info(run_id: str, **extra: object) -> bytes:
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "run_id": run_id,
                       "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "command": " ".join(sys.argv[:3]), **extra}).encode()


def _lease_free(root: RemotePath) -> None:
    """Raise OutputLocked if another run's lease on ``root`` has not lapsed."""
    path = root / LOCK
    try:
        held = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        held = {}
    if held.get("lease_until", 0) > time.time():
        until = datetime.fromtimestamp(held["lease_until"], timezone.utc).isoformat(
            timespec="seconds")
        raise OutputLocked(
            f"output.path: {root} is being written by another lepton-batch run "
            f"({_holder(path)}). Wait for it to finish or stop it; if it died, its lease "
            f"lapses at {until} (it is renewed every {LEASE_SECONDS / 4:.0f} s while it runs)")


@contextlib.contextmanager
def _lease(root: RemotePath, run_id: str) -> Iterator[None]:
    """Object stores have no ``flock``: the holder writes ``_lock`` with a lease and renews it
    every quarter lease; a run that dies stops renewing and its lease lapses after
    ``LEASE_SECONDS``. Best effort: two runs starting within the same second can both
    take it (one scheduler per job, as a cron line or an Airflow task gives, avoids that).
    """
    path = root / LOCK
    _lease_free(root)
    stop = threading.Event()

    def renew() -> None:
        while True:
            path.write_bytes(_info(run_id, lease_until=time.time() + LEASE_SECONDS))
            if stop.wait(LEASE_SECONDS / 4):
                return

    path.write_bytes(_info(run_id, lease_until=time.time() + LEASE_SECONDS))
    thread = threading.Thread(target=renew, name="lepton-batch-lease", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        path.unlink(missing_ok=True)


def holder(root: OutputPath) -> dict:
    """What ``root``'s ``_lock`` names as the run writing it now (host, pid, run_id, since,
    command); empty when no run holds it (a run empties or removes the file when it stops,
    even on Ctrl-C) or the file cannot be read. Only a look, as ``check_free``."""
    try:
        info = json.loads((root / LOCK).read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}
