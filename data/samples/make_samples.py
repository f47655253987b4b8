"""Rebuild the sample corpus from the CPython standard library's own documentation.

The rows are real English prose written by the CPython developers: the docstrings of
public modules, classes and functions of a fixed list of standard-library modules, and the
reference-manual sections in ``pydoc_data.topics``. Lengths run from a few words to
thousands of tokens. A handful of bad rows (null, empty, whitespace-only) are mixed in on
purpose so that every run exercises the error path.

Run with Python 3.11 (the corpus depends on the interpreter's docstrings):

    python data/samples/make_samples.py
"""

from __future__ import annotations

import importlib
import inspect
import random
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

MODULES = [
    "abc", "argparse", "array", "asyncio", "base64", "bisect", "bz2", "calendar", "cmath",
    "collections", "concurrent.futures", "configparser", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum", "fileinput",
    "fnmatch", "fractions", "ftplib", "functools", "glob", "gzip", "hashlib", "heapq", "hmac",
    "html", "http.client", "http.cookies", "http.server", "imaplib", "inspect", "io",
    "ipaddress", "itertools", "json", "logging", "lzma", "mailbox", "math", "mimetypes",
    "multiprocessing", "os", "os.path", "pathlib", "pickle", "platform", "plistlib",
    "poplib", "queue", "random", "re", "sched", "secrets", "selectors", "shelve", "shlex",
    "shutil", "signal", "smtplib", "socket", "socketserver", "sqlite3", "ssl", "statistics",
    "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "time",
    "timeit", "tomllib", "typing", "unicodedata", "urllib.parse", "urllib.request", "uuid",
    "wave", "weakref", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zlib",
]
N_FILES = 3
ROWS_PER_GROUP = 250
OUT = Path(__file__).resolve().parent


def _docs() -> list[tuple[str, str]]:
    seen: set[str] = set()
    rows: list[tuple[str, str]] = []

    def add(source: str, doc: str | None) -> None:
        text = " ".join((doc or "").split())
        if len(text) < 12 or text in seen:
            return
        seen.add(text)
        rows.append((source, text))

    for name in MODULES:
        module = importlib.import_module(name)
        add(name, inspect.getdoc(module))
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isclass(obj) or inspect.isroutine(obj):
                add(f"{name}.{attr}", inspect.getdoc(obj))
            if inspect.isclass(obj):
                for meth, fn in sorted(vars(obj).items()):
                    if not meth.startswith("_") and inspect.isroutine(fn):
                        add(f"{name}.{attr}.{meth}", inspect.getdoc(fn))
    from pydoc_data.topics import topics

    for key, text in sorted(topics.items()):
        add(f"reference:{key}", text)
    return rows


def main() -> None:
    assert sys.version_info[:2] == (3, 11), "build the corpus with Python 3.11"
    rows = _docs()
    rng = random.Random(20261124)
    rng.shuffle(rows)
    sources = [s for s, _ in rows]
    texts: list[str | None] = [t for _, t in rows]
    # Bad rows on purpose: null, empty and whitespace-only text.
    bad_values = [None, None, None, "", "", "   ", "\n\t"]
    for i, bad in zip(rng.sample(range(len(texts)), len(bad_values)), bad_values, strict=True):
        texts[i] = bad
    ids = list(range(1, len(texts) + 1))
    per_file = -(-len(texts) // N_FILES)
    for f in range(N_FILES):
        sl = slice(f * per_file, (f + 1) * per_file)
        table = pa.table(
            {
                "id": pa.array(ids[sl], pa.int64()),
                "text": pa.array(texts[sl], pa.string()),
                "source": pa.array(sources[sl], pa.string()),
            }
        )
        pq.write_table(table, OUT / f"python-docs-{f:02d}.parquet", row_group_size=ROWS_PER_GROUP)
    print(f"{len(texts)} rows in {N_FILES} files under {OUT}")


if __name__ == "__main__":
    main()
