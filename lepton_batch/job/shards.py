"""Input discovery and sharding: a shard is one file's contiguous range of row groups, or
a row range inside one row group larger than ``rows_per_shard``.

Files are found with fsspec (local paths, directories, globs, and URLs such as
``memory://`` or ``s3://``); row-group sizes come from the Parquet footers, so planning
reads no data. A shard's fingerprint covers the file's identity (path, size, mtime or
etag) and its row range, so a changed input file gets new shards and new part files.

pyarrow and pandas write up to ~1 M rows per row group by default, so a file is often one
row group: such a group is cut into row ranges (read with ``iter_batches``, stopping after
the range), which keeps shards small for parallelism and resume.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from itertools import groupby
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from lepton_batch.store import redact  # re-exported: messages name input files redacted

TEXT_TYPES = (pa.string(), pa.large_string(), pa.binary(), pa.large_binary())
BATCH_ROWS = 65_536  # the most rows _read_range decodes at a time


@dataclass(frozen=True)
class Shard:
    """One unit of work. ``row_groups`` index into ``path``'s Parquet row groups.

    ``group_offset`` None: the shard is those whole row groups. Else it is the row range
    ``[group_offset, group_offset + num_rows)`` inside its one row group.
    """

    index: int
    path: str  # fsspec URL or local path, as given to fsspec
    row_groups: tuple[int, ...]
    first_row: int  # offset of the shard's first row inside the file
    num_rows: int
    fingerprint: str
    group_offset: int | None = None

    @property
    def is_range(self) -> bool:
        """Part of one row group (a group larger than ``rows_per_shard`` was cut)."""
        return self.group_offset is not None

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


def plan_shards(files: list[InputFile], rows_per_shard: int,
                keep_whole: Callable[[str], bool] | None = None) -> list[Shard]:
    """Cut each file's row groups into contiguous ranges of about ``rows_per_shard`` rows.

    Whole row groups are grouped up to ``rows_per_shard`` rows. A row group larger than
    that is cut into row ranges of equal size (the last one smaller), each at most
    ``rows_per_shard`` rows; the shards around it are the ones earlier versions cut, so
    their fingerprints (and part files) stay the same. ``keep_whole(fingerprint)``: True
    when such a group's whole-group shard (what earlier versions planned for it) was
    computed already; it is then kept as one shard instead of being computed again.
    """
    shards: list[Shard] = []
    for f in files:
        start, groups, rows, first = 0, [], 0, 0
        for i, n in enumerate(f.row_group_rows):
            if groups and rows + n > rows_per_shard:
                shards.append(_shard(len(shards), f, groups, first, rows))
                groups, rows, first = [], 0, start
            if n > rows_per_shard:
                whole = _shard(len(shards), f, [i], start, n)
                if keep_whole is not None and keep_whole(whole.fingerprint):
                    shards.append(whole)
                else:
                    shards += _ranges(len(shards), f, i, start, n, rows_per_shard)
                start += n
                first = start
                continue
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


def _ranges(index: int, f: InputFile, group: int, start: int, n: int, rows_per_shard: int
            ) -> list[Shard]:
    """Row group ``group`` (``n`` rows from file row ``start``) as row-range shards."""
    pieces = -(-n // rows_per_shard)
    size = -(-n // pieces)  # equal sizes; a multiple of it is where each range starts
    out = []
    for offset in range(0, n, size):
        rows = min(size, n - offset)
        key = (f"{f.path}|{f.identity}|{group}-{group}|{start + offset}+{rows}"
               f"|range {offset}+{rows}")
        out.append(Shard(index=index + len(out), path=f.path, row_groups=(group,),
                         first_row=start + offset, num_rows=rows,
                         fingerprint=hashlib.sha256(key.encode()).hexdigest()[:16],
                         group_offset=offset))
    return out


def describe_shards(shards: list[Shard], rows_per_shard: int) -> str:
    """The plan's shards line: ``10 (≤ 200 rows each; 1 row group of 2,000 rows cut into
    row ranges)``; row groups kept whole because they were computed whole already are
    named too."""
    cut: dict[tuple[str, int], int] = {}
    for s in shards:
        if s.is_range:
            cut[(s.path, s.row_groups[0])] = cut.get((s.path, s.row_groups[0]), 0) + s.num_rows
    kept = [s.num_rows for s in shards if not s.is_range and s.num_rows > rows_per_shard]
    notes = [_groups(list(cut.values()), "cut into row ranges")] if cut else []
    if kept:
        notes.append(_groups(kept, "kept whole: computed as one shard already"))
    how = "; " + "; ".join(notes) if notes else ", whole row groups"
    return f"{len(shards):,} (≤ {rows_per_shard:,} rows each{how})"


def _groups(sizes: list[int], what: str) -> str:
    rows = f"{sizes[0]:,} rows" if len(set(sizes)) == 1 else f"up to {max(sizes):,} rows"
    return f"{len(sizes):,} row group{'s' if len(sizes) > 1 else ''} of {rows} {what}"


def read_shard(shard: Shard, columns: list[str]) -> pa.Table:
    """Read only ``columns`` of the shard's rows; errors name the file and row group."""
    try:
        with fsspec.open(shard.path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            if shard.is_range:
                return _read_range(pf, shard, columns)
            return pf.read_row_groups(list(shard.row_groups), columns=columns)
    except (OSError, pa.ArrowException) as exc:
        raise InputReadError(f"input file {redact(shard.path)}, {_bad_group(shard, columns)}: "
                             f"{str(exc).strip()}") from exc


def _read_range(pf: pq.ParquetFile, shard: Shard, columns: list[str]) -> pa.Table:
    """A row-range shard: its group's batches from the start (Parquet has no cheaper way to
    reach a row inside a column chunk), cut to the range; reading stops after its end.
    Measured on a 1 M-row group: faster than ``read_row_group`` and a slice."""
    assert shard.group_offset is not None, "a whole-group shard has no row range"
    lo, hi = shard.group_offset, shard.group_offset + shard.num_rows
    # ranges start at multiples of their size, so batches of that size line up with them;
    # capped at pyarrow's default, for memory and the 2 GiB limit of a string batch
    size = min(shard.num_rows, BATCH_ROWS)
    batches, pos = [], 0
    for batch in pf.iter_batches(batch_size=size, row_groups=list(shard.row_groups),
                                 columns=columns, use_threads=True):
        end = pos + batch.num_rows
        if end > lo:
            batches.append(batch.slice(max(lo - pos, 0), min(hi, end) - max(lo, pos)))
        pos = end
        if pos >= hi:
            break
    schema = pf.schema_arrow
    projected = pa.schema([schema.field(c) for c in columns]) if not batches else None
    return pa.Table.from_batches(batches, schema=projected)


def read_shards(shards: list[Shard], columns: list[str]
                ) -> Iterator[tuple[Shard, pa.Table | InputReadError]]:
    """Each shard with its table (:func:`read_shard`'s), or the error reading it, in order.
    Row-range shards of one row group, when next to each other, share one read of it (from
    the first range to the end of the last)."""
    def group_key(s: Shard) -> tuple:
        return (s.path, s.row_groups) if s.is_range else (s.path, s.index)

    for _, run in groupby(shards, key=group_key):
        run = list(run)
        if len(run) == 1 or not run[0].is_range:
            for shard in run:
                try:
                    yield shard, read_shard(shard, columns)
                except InputReadError as exc:
                    yield shard, exc
            continue
        lo = min(s.group_offset for s in run)
        hi = max(s.group_offset + s.num_rows for s in run)
        span = replace(run[0], group_offset=lo, num_rows=hi - lo)  # read once, to the last
        try:
            table = read_shard(span, columns)
        except InputReadError as exc:
            yield from ((shard, exc) for shard in run)
            continue
        for shard in run:
            yield shard, table.slice(shard.group_offset - lo, shard.num_rows)


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
