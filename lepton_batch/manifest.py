"""Shard records under ``<output>/_manifest/``: what is done, for which job fingerprint.

A record is written only after its part file has been renamed into place, so a record
always means "this part file is complete". Both are named after the shard fingerprint,
so a retried or resumed shard overwrites its own files and never duplicates rows.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

MANIFEST_DIR = "_manifest"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardRecord:
    """The small result a worker sends back to the driver (never the data itself)."""

    shard_index: int
    shard_fingerprint: str
    job_fingerprint: str
    run_id: str
    source: str
    row_groups: list[int]
    part: str  # path of the part file relative to the output root
    rows: int
    error_rows: int
    truncated_rows: int
    tokens: int
    padded_tokens: int
    batches: int
    seconds: float
    model_load_seconds: float  # 0.0 when the worker's cached engine was reused
    worker: str
    finished_at: str


def write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(fh)`` on a temporary file in ``path``'s folder, fsync, rename into place.

    Readers never see half a file, and a crash leaves only a hidden ``.tmp`` behind.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_record(root: Path, record: ShardRecord) -> None:
    blob = json.dumps(asdict(record), indent=1).encode()
    path = root / MANIFEST_DIR / f"{record.shard_fingerprint}.json"
    write_atomic(path, lambda fh: fh.write(blob))


def read_records(root: Path) -> dict[str, ShardRecord]:
    """All shard records in the output, keyed by shard fingerprint."""
    folder = root / MANIFEST_DIR
    if not folder.is_dir():
        return {}
    records = {}
    for f in sorted(folder.glob("*.json")):
        try:
            rec = ShardRecord(**json.loads(f.read_text()))
        except (ValueError, TypeError) as exc:
            # Unreadable (or from an incompatible version): its shard is simply run again.
            log.warning("ignoring unreadable shard record %s: %s", f.name, exc)
            f.unlink()
            continue
        records[rec.shard_fingerprint] = rec
    return records


def remove_record(root: Path, fingerprint: str) -> None:
    (root / MANIFEST_DIR / f"{fingerprint}.json").unlink(missing_ok=True)
