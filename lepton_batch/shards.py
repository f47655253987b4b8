"""Input discovery and sharding: a shard is one file's contiguous range of row groups.

Files are found with fsspec (local paths, directories, globs, and URLs such as
``memory://`` or ``s3://``); row-group sizes come from the Parquet footers, so planning
reads no data. A shard's fingerprint covers the file's identity (path, size, mtime or
etag) and its row range, so a changed input file gets new shards and new part files.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

TEXT_TYPES = (pa.string(), pa.large_string(), pa.binary(), pa.large_binary())


@dataclass(frozen=True)
class Shard:
    """One unit of work. ``row_groups`` index into ``path``'s Parquet row groups."""

    index: int
    path: str  # fsspec URL or local path, as given to fsspec
    row_groups: tuple[int, ...]
    first_row: int  # offset of the shard's first row inside the file
    num_rows: int
    fingerprint: str

    @property
    def part_name(self) -> str:
        return f"part-{self.fingerprint}.parquet"


@dataclass(frozen=True)
class InputFile:
    path: str
    schema: pa.Schema
    num_rows: int
    row_group_rows: tuple[int, ...]
    identity: str  # size + mtime/etag: changes when the file's content changes


_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@")


def redact(path: str) -> str:
    """``path`` with any ``user:secret@`` in a URL replaced, for messages, metadata and
    reports (credentials are never written or logged)."""
    return _USERINFO.sub(r"\1***@", path)


def _protocol_path(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return fs.unstrip_protocol(path) if fs.protocol not in ("file", ("file", "local")) else path


def _resolved(path: str) -> str:
    """For a relative local path, what it resolves to: the current directory is the base
    (not the job file's folder), which a message must say."""
    if "://" in path or Path(path).expanduser().is_absolute():
        return ""
    return (f" (a relative path resolves against the current directory {Path.cwd()}: "
            f"{Path.cwd() / path})")


def find_files(path: str) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """All ``*.parquet`` files under a file, directory, glob or URL, sorted by name."""
    fs, root = fsspec.core.url_to_fs(path)
    if any(ch in root for ch in "*?["):
        candidates = fs.glob(root)
    elif fs.isdir(root):
        candidates = fs.find(root)
    elif fs.exists(root):
        candidates = [root]
    else:
        raise FileNotFoundError(f"input.path: {path} does not exist{_resolved(path)}")
    files = sorted(
        p
        for p in candidates
        if p.endswith(".parquet") and not p.rsplit("/", 1)[-1].startswith(("_", "."))
    )
    if not files:
        raise FileNotFoundError(f"input.path: no *.parquet files found under {path}"
                                f"{_resolved(path)}")
    return fs, files


@dataclass(frozen=True)
class BadFile:
    """An input file that cannot be read as Parquet; its rows are not planned."""

    path: str
    reason: str


class InputReadError(OSError):
    """An input file or row group could not be read; the message names which."""


def describe_files(path: str) -> tuple[list[InputFile], list[BadFile]]:
    """Footer-only look at every input file: schema, row groups, identity.

    A file whose footer cannot be read is returned as a :class:`BadFile` (with the file
    and the cause) instead of stopping the whole job.
    """
    fs, files = find_files(path)
    out, bad = [], []
    for f in files:
        try:
            info = fs.info(f)
            with fs.open(f, "rb") as fh:
                meta = pq.ParquetFile(fh).metadata
                schema = meta.schema.to_arrow_schema()
        except (OSError, pa.ArrowException) as exc:
            bad.append(BadFile(redact(_protocol_path(fs, f)),
                               f"not a readable Parquet file: {exc}"))
            continue
        stamp = info.get("mtime") or info.get("LastModified") or info.get("etag") or ""
        if not stamp and info.get("created") is not None:
            stamp = info["created"]
        out.append(
            InputFile(
                path=_protocol_path(fs, f),
                schema=schema,
                num_rows=meta.num_rows,
                row_group_rows=tuple(
                    meta.row_group(i).num_rows for i in range(meta.num_row_groups)
                ),
                identity=f"{info.get('size')}:{stamp}",
            )
        )
    return out, bad


def check_columns(files: list[InputFile], text_column: str | None, id_column: str,
                  passthrough: list[str], task_columns: list[str] = ()) -> list[str]:
    """Problems with the named columns across all files (empty list when all is well).

    ``text_column`` None: the task reads ``task_columns`` (a prompt template's fields)
    instead, any type."""
    problems = []
    for f in files:
        names = f.schema.names
        roles = [("text_column", text_column)] if text_column else []
        roles += [("id_column", id_column)] + [("passthrough_columns", c) for c in passthrough]
        for col in task_columns:
            if col not in names:
                problems.append(f"task: column {col!r} (named in task.prompt or a task "
                                f"*_column field) not in {f.path} (has {names})")
        for role, col in roles:
            if col not in names:
                problems.append(f"input.{role}: column {col!r} not in {f.path} (has {names})")
        if text_column and text_column in names and (
                f.schema.field(text_column).type not in TEXT_TYPES):
            kind = f.schema.field(text_column).type
            problems.append(
                f"input.text_column: {text_column!r} in {f.path} is {kind}, expected a string "
                "(or binary UTF-8) column"
            )
        if id_column in names and pa.types.is_nested(f.schema.field(id_column).type):
            problems.append(f"input.id_column: {id_column!r} in {f.path} is a nested type")
    return problems


def plan_shards(files: list[InputFile], rows_per_shard: int) -> list[Shard]:
    """Cut each file's row groups into contiguous ranges of about ``rows_per_shard`` rows.

    A row group is never split: one larger than ``rows_per_shard`` is a shard of its own.
    """
    shards: list[Shard] = []
    for f in files:
        start, groups, rows, first = 0, [], 0, 0
        for i, n in enumerate(f.row_group_rows):
            if groups and rows + n > rows_per_shard:
                shards.append(_shard(len(shards), f, groups, first, rows))
                groups, rows, first = [], 0, start
            groups.append(i)
            rows += n
            start += n
        if groups:
            shards.append(_shard(len(shards), f, groups, first, rows))
    return shards


def _shard(index: int, f: InputFile, groups: list[int], first: int, rows: int) -> Shard:
    key = f"{f.path}|{f.identity}|{groups[0]}-{groups[-1]}|{first}+{rows}"
    return Shard(
        index=index,
        path=f.path,
        row_groups=tuple(groups),
        first_row=first,
        num_rows=rows,
        fingerprint=hashlib.sha256(key.encode()).hexdigest()[:16],
    )


def read_shard(shard: Shard, columns: list[str]) -> pa.Table:
    """Read only ``columns`` of the shard's row groups; errors name the file and group."""
    try:
        with fsspec.open(shard.path, "rb") as fh:
            return pq.ParquetFile(fh).read_row_groups(list(shard.row_groups), columns=columns)
    except (OSError, pa.ArrowException) as exc:
        raise InputReadError(f"input file {redact(shard.path)}, {_bad_group(shard, columns)}: "
                             f"{str(exc).strip()}") from exc


def _bad_group(shard: Shard, columns: list[str]) -> str:
    """Which of a shard's row groups cannot be read (reading them one at a time)."""
    for group in shard.row_groups:
        try:
            with fsspec.open(shard.path, "rb") as fh:
                pq.ParquetFile(fh).read_row_group(group, columns=columns)
        except (OSError, pa.ArrowException):
            return f"row group {group}"
    return f"row groups {shard.row_groups[0]}-{shard.row_groups[-1]}"


def count_duplicate_ids(files: list[InputFile], id_column: str, examples: int = 5
                        ) -> tuple[int, list]:
    """How many distinct id values occur more than once across ``files`` (nulls ignored),
    with up to ``examples`` of them, smallest first. Reads only the id column."""
    import pyarrow.compute as pc

    chunks = []
    for f in files:
        with fsspec.open(f.path, "rb") as fh:
            chunks.append(pq.ParquetFile(fh).read(columns=[id_column]).column(0))
    if not chunks:
        return 0, []
    ids = pa.chunked_array([c for chunk in chunks for c in chunk.chunks],
                           type=chunks[0].type).drop_null()
    counts = pc.value_counts(ids)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")
    return len(repeated), sorted(repeated.to_pylist())[:examples]
