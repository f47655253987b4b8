"""Output roots on object stores: a ``pathlib.Path``-shaped view of an fsspec filesystem.

The output code (``output.py``, ``manifest.py``, ``lock.py``) is written against the part
of ``pathlib.Path`` it needs; :class:`RemotePath` gives the same methods over any fsspec
filesystem (``s3://``, ``gs://``, ``abfs://``, ``memory://``), so a local directory and a
bucket prefix go through one code path. The few operations that differ — an atomic
rename, fsync, deleting a tree — are the functions at the bottom, which pick the local or
the object-store way.

On an object store a file becomes visible only when its upload completes, so a reader
never sees half a part file: writing in place is what "write to a temp name, then rename"
achieves on a local disk. A rename is a server-side copy then a delete; publish's journal
makes it idempotent (see ``output.py``).
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec

_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@")


def redact(path: str) -> str:
    """``path`` with any ``user:secret@`` in a URL replaced, for messages, metadata and
    reports (credentials are never written or logged)."""
    return _USERINFO.sub(r"\1***@", path)


class RemotePath:
    """A path on an fsspec filesystem with the ``pathlib.Path`` methods the output uses.

    ``fs``: the filesystem (listing cache off: workers in other processes write here);
    ``path``: the path as ``fs`` spells it (``bucket/prefix/...``, no protocol).
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        self.fs = fs
        self.path = path.rstrip("/")

    # -- naming -------------------------------------------------------------------------
    def __truediv__(self, other: str | os.PathLike) -> RemotePath:
        return RemotePath(self.fs, posixpath.join(self.path, str(other)))

    def __str__(self) -> str:
        return redact(self.fs.unstrip_protocol(self.path))

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and (self.fs.protocol, self.path) == (
            other.fs.protocol, other.path)

    def __lt__(self, other: RemotePath) -> bool:
        return self.path < other.path

    def __hash__(self) -> int:
        return hash((str(self.fs.protocol), self.path))

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def stem(self) -> str:
        return PurePosixPath(self.name).stem

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    @property
    def parent(self) -> RemotePath:
        return RemotePath(self.fs, posixpath.dirname(self.path))

    @property
    def parents(self) -> list[RemotePath]:
        out, p = [], self.parent
        while p.path and p.path != posixpath.dirname(p.path):
            out.append(p)
            p = p.parent
        return out

    def resolve(self) -> RemotePath:
        return RemotePath(self.fs, posixpath.normpath(self.path))

    def is_relative_to(self, other: RemotePath) -> bool:
        return self.path == other.path or self.path.startswith(other.path + "/")

    def relative_to(self, other: RemotePath) -> PurePosixPath:
        if not self.is_relative_to(other):
            raise ValueError(f"{self} is not inside {other}")
        return PurePosixPath(posixpath.relpath(self.path, other.path))

    @property
    def uri(self) -> str:
        """The full URL, for readers that take one (polars, pyarrow)."""
        return self.fs.unstrip_protocol(self.path)

    # -- reading --------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.fs.exists(self.path)

    def is_file(self) -> bool:
        return self.fs.isfile(self.path)

    def is_dir(self) -> bool:
        return self.fs.isdir(self.path)

    def iterdir(self) -> list[RemotePath]:
        if not self.is_dir():
            return []
        return [RemotePath(self.fs, p) for p in self.fs.ls(self.path, detail=False)
                if p.rstrip("/") != self.path]

    def glob(self, pattern: str) -> list[RemotePath]:
        return [RemotePath(self.fs, p) for p in sorted(self.fs.glob(f"{self.path}/{pattern}"))]

    def rglob(self, pattern: str) -> list[RemotePath]:
        return [RemotePath(self.fs, p)
                for p in sorted(self.fs.glob(f"{self.path}/**/{pattern}"))]

    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.path)

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def stat(self) -> Any:
        return os.stat_result((0, 0, 0, 0, 0, 0, self.fs.size(self.path), 0, 0, 0))

    def open(self, mode: str = "rb") -> Any:
        return self.fs.open(self.path, mode)

    # -- writing --------------------------------------------------------------------------
    def write_bytes(self, data: bytes) -> None:
        self.fs.pipe_file(self.path, data)

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        self.fs.makedirs(self.path, exist_ok=True)  # a no-op on object stores

    def rmdir(self) -> None:
        """Object stores have no empty folders to remove."""


OutputPath = Path | RemotePath


def remote_root(url: str, storage_options: dict[str, Any] | None = None) -> RemotePath:
    """The output root at ``url`` (``s3://bucket/prefix``) with the filesystem's options
    (credentials, ``client_kwargs.endpoint_url``, ...); the listing cache is off, since
    other processes write here."""
    options = {"use_listings_cache": False, "skip_instance_cache": True,
               **(storage_options or {})}
    fs, path = fsspec.core.url_to_fs(url, **options)
    return RemotePath(fs, path)


def move(src: OutputPath, dst: OutputPath) -> None:
    """Rename ``src`` to ``dst``: atomic on a local disk; on an object store a server-side
    copy then a delete (each object whole; the caller's journal makes it idempotent)."""
    if isinstance(src, RemotePath):
        src.fs.mv(src.path, dst.path)
    else:
        os.replace(src, dst)


def remove_tree(path: OutputPath) -> None:
    """Delete a folder and everything under it; nothing when it is not there."""
    if isinstance(path, RemotePath):
        if path.exists():
            path.fs.rm(path.path, recursive=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def fsync_dir(path: OutputPath) -> None:
    """Make a local folder's renames durable; object stores commit each write already."""
    if isinstance(path, RemotePath):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
