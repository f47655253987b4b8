"""One writer per output: an exclusive ``flock`` on ``<root>/_lock`` held for the whole run.

The kernel drops the lock when its process exits, however it exits (SIGKILL included), so
a crashed run never leaves the output stuck. The file's content only names the holder
(host, pid, run id, since) for the message a second writer gets.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from lepton_batch.output import LOCK, OutputError


class OutputLocked(OutputError):
    """Another run holds the output's lock."""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process (it has not written its name yet)"
    return (f"host {info.get('host')}, pid {info.get('pid')}, run {info.get('run_id')}, "
            f"since {info.get('since')}")


@contextlib.contextmanager
def output_lock(root: Path, run_id: str) -> Iterator[None]:
    """Hold ``root``'s writer lock for the ``with`` block; raise OutputLocked if taken."""
    path = root / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputLocked(
                f"output.path: {root} is being written by another lepton-batch run "
                f"({_holder(path)}). Wait for it to finish or stop it; the lock is released "
                "as soon as that process exits, even if it crashes."
            ) from None
        info = {"host": socket.gethostname(), "pid": os.getpid(), "run_id": run_id,
                "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "command": " ".join(sys.argv[:3])}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)
