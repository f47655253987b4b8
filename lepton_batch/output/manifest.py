"""Shard records under ``<output>/_manifest/``: what is done, for which job fingerprint.

A record is written only after its part file has been renamed into place, so a record
always means "this part file is complete". Both are named after the shard fingerprint,
so a retried or resumed shard overwrites its own files and never duplicates rows.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import BinaryIO

from lepton_batch.faults import checkpoint
from lepton_batch.store import OutputPath, RemotePath

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
    oom_splits: int = 0  # batches halved after out of memory (default: older records)
    # how the engine ran: dtype, quantization, forward, and the quality gate's figure
    engine: str = ""
    deduplicated_rows: int = 0  # rows that took the result of an identical row
    # For the run report (empty in records of older versions): wall seconds per stage
    # (read, prepare, warm_up, load, tokenize, compute, write), token lengths of the rows
    # that ran in bins of ``length_bin_width`` tokens, batches by rows in power-of-two
    # bins, and rows per error message (numbers blanked)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    length_bin_width: int = 0
    length_histogram: list[int] = field(default_factory=list)
    batch_rows_histogram: list[int] = field(default_factory=list)
    errors_by_message: dict[str, int] = field(default_factory=dict)
    # wall-clock time (epoch seconds, the worker's clock) its first batch was launched
    first_batch_at: float | None = None
    # the shard's first row in ``source``; row ranges of one row group share ``row_groups``
    first_row: int = 0


def write_atomic(path: OutputPath, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(fh)`` on a temporary file in ``path``'s folder, fsync, rename into place.

    Readers never see half a file. A failed write (disk full, say) removes its temporary
    file and re-raises; only a killed process can leave a hidden ``.tmp-*`` behind, and the
    next run removes it. On an object store the object is written in place: it becomes
    visible only when its upload completes.
    """
    if isinstance(path, RemotePath):
        fh = path.open("wb")
        try:
            write(fh)
            checkpoint("write-before-rename")
        except BaseException:
            fh.discard()  # abort the upload: closing would publish half a file
            fh.closed = True  # and do not let the file's finaliser close it either
            raise
        fh.close()
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            checkpoint("write-before-rename")
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: OutputPath, value: object) -> None:
    """``value`` as indented JSON at ``path``, atomically (see :func:`write_atomic`)."""
    blob = json.dumps(value, indent=1).encode()
    write_atomic(path, lambda fh: fh.write(blob))


def write_record(manifest_dir: OutputPath, record: ShardRecord) -> None:
    """Write ``record`` as ``<manifest_dir>/<shard fingerprint>.json`` (atomically)."""
    write_json(manifest_dir / f"{record.shard_fingerprint}.json", asdict(record))


def read_record(path: OutputPath) -> ShardRecord | None:
    """One record, or None (with a warning) when it is unreadable or from another version."""
    try:
        return ShardRecord(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as exc:
        log.warning("ignoring unreadable shard record %s: %s", path, exc)
        return None


def read_records(manifest_dir: OutputPath) -> dict[str, ShardRecord]:
    """Every readable record in ``manifest_dir``, keyed by shard fingerprint (reads only)."""
    if not manifest_dir.is_dir():
        return {}
    records = {}
    for f in sorted(manifest_dir.glob("*.json")):
        rec = read_record(f)
        if rec is not None and f.stem == rec.shard_fingerprint:
            records[rec.shard_fingerprint] = rec
    return records
