"""The Delta Lake output: a real table on local disk, real readers, real crashed processes."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

deltalake = pytest.importorskip("deltalake")

from lepton_batch.output.delta import (  # noqa: E402  (after the importorskip on purpose)
    commit_file,
    committed_files,
    ensure_table,
    remove_files,
)

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parents[1]

SCHEMA = pa.schema([("id", pa.int64()), ("text", pa.string()),
                    ("score", pa.float32()), ("embedding", pa.list_(pa.float32()))])


def _write(root: Path, run_date: str, name: str, ids: range) -> tuple[str, dict[str, str], int]:
    """Write a Hive-style data file (no run_date column) the way a worker does."""
    rel = f"run_date={run_date}/{name}"
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    t = pa.table({"id": list(ids), "text": [f"t{i}" for i in ids],
                  "score": [i / 10 for i in ids], "embedding": [[float(i), 1.0] for i in ids]},
                 schema=SCHEMA)
    pq.write_table(t, root / rel, row_group_size=4)
    return rel, {"run_date": run_date}, t.num_rows


def _ids(uri: str) -> list[int]:
    return sorted(deltalake.DeltaTable(uri).to_pyarrow_table()["id"].to_pylist())


@pytest.fixture
def table(tmp_path: Path) -> str:
    uri = str(tmp_path / "out")
    ensure_table(uri, SCHEMA, ["run_date"])
    return uri


def test_three_files_in_two_partitions_read_by_delta_polars_and_duckdb(table):
    root = Path(table)
    files = [_write(root, "2026-03-01", "part-a-r1.parquet", range(0, 10)),
             _write(root, "2026-03-01", "part-b-r1.parquet", range(10, 15)),
             _write(root, "2026-03-02", "part-c-r1.parquet", range(15, 22))]
    assert committed_files(table) == set()
    for rel, part, n in files:
        assert commit_file(table, rel, part, n, app_id="job/r1") is True
    dt = deltalake.DeltaTable(table)
    assert dt.version() == 3  # create + one transaction per file
    assert committed_files(table) == {rel for rel, _, _ in files}
    want = [(i, "2026-03-01" if i < 15 else "2026-03-02") for i in range(22)]

    got = dt.to_pyarrow_table()
    assert got.schema.names == [*SCHEMA.names, "run_date"]
    assert sorted(zip(got["id"].to_pylist(), got["run_date"].to_pylist(), strict=True)) == want
    assert got.filter(pc.equal(got["id"], 3))["embedding"].to_pylist() == [[3.0, 1.0]]

    pl = pytest.importorskip("polars")
    df = pl.read_delta(table).sort("id")
    assert list(zip(df["id"], df["run_date"], strict=True)) == want
    lazy = pl.scan_delta(table).filter(pl.col("run_date") == "2026-03-02").collect()
    assert sorted(lazy["id"]) == list(range(15, 22))

    duckdb = pytest.importorskip("duckdb")
    # delta_scan needs an extension download; read the files the log references instead.
    sql = (f"SELECT id, run_date FROM read_parquet({dt.file_uris()!r}, "
           "hive_partitioning = true, hive_types_autocast = false) ORDER BY id")
    rows = duckdb.sql(sql).fetchall()
    assert rows == want

    stats = {a["path"]: a for a in pa.table(dt.get_add_actions(flatten=True)).to_pylist()}
    a = stats["run_date=2026-03-01/part-a-r1.parquet"]
    assert (a["num_records"], a["min.id"], a["max.id"], a["null_count.text"]) == (10, 0, 9, 0)
    assert a["size_bytes"] == (root / "run_date=2026-03-01/part-a-r1.parquet").stat().st_size
    info = dt.history(1)[0]
    assert info["lepton_batch.app_id"] == "job/r1"
    assert info["lepton_batch.file"] == "run_date=2026-03-02/part-c-r1.parquet"


def test_committing_a_file_twice_is_a_no_op(table):
    rel, part, n = _write(Path(table), "2026-03-01", "part-a-r1.parquet", range(5))
    assert commit_file(table, rel, part, n)
    version = deltalake.DeltaTable(table).version()
    assert commit_file(table, rel, part, n) is False
    assert deltalake.DeltaTable(table).version() == version
    assert _ids(table) == list(range(5))


def test_uncommitted_file_is_invisible(table):
    _write(Path(table), "2026-03-01", "part-a-r1.parquet", range(5))
    assert _ids(table) == []
    assert committed_files(table) == set()


_CHILD = textwrap.dedent("""
    import os, signal, sys
    import pyarrow as pa, pyarrow.parquet as pq
    from pathlib import Path
    from lepton_batch.output.delta import commit_file
    uri, name, commit = sys.argv[1], sys.argv[2], sys.argv[3] == "commit"
    rel = f"run_date=2026-03-01/{name}"
    (Path(uri) / rel).parent.mkdir(parents=True, exist_ok=True)
    first = int(name.split("-")[1]) * 100
    pq.write_table(pa.table({"id": pa.array(range(first, first + 7), pa.int64()),
                             "text": ["x"] * 7, "score": pa.array([0.5] * 7, pa.float32()),
                             "embedding": pa.array([[1.0]] * 7, pa.list_(pa.float32()))}),
                   Path(uri) / rel)
    if commit:
        commit_file(uri, rel, {"run_date": "2026-03-01"}, 7)
    os.kill(os.getpid(), signal.SIGKILL)  # the driver dies before its own bookkeeping
""")


def _crash(uri: str, name: str, commit: bool) -> None:
    proc = subprocess.run([sys.executable, "-c", _CHILD, uri, name,
                           "commit" if commit else "write"], cwd=REPO, capture_output=True,
                          text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def test_rerun_after_killed_drivers_commits_each_file_once(table):
    _crash(table, "part-1-r1.parquet", commit=True)   # killed right after its commit
    _crash(table, "part-2-r1.parquet", commit=False)  # killed between write and commit
    assert committed_files(table) == {"run_date=2026-03-01/part-1-r1.parquet"}
    assert _ids(table) == list(range(100, 107))

    # The rerun: commit every finished file; its bookkeeping lost which ones were done.
    done = [f"run_date=2026-03-01/part-{i}-r1.parquet" for i in (1, 2)]
    added = [commit_file(table, rel, {"run_date": "2026-03-01"}, 7) for rel in done]
    assert added == [False, True]
    assert [commit_file(table, rel, {"run_date": "2026-03-01"}, 7) for rel in done] == [False] * 2
    assert committed_files(table) == set(done)
    assert _ids(table) == list(range(100, 107)) + list(range(200, 207))
    assert len(deltalake.DeltaTable(table).file_uris()) == 2


_RACER = ("import sys; from lepton_batch.output.delta import commit_file; "
          "print(commit_file(sys.argv[1], sys.argv[2], {'run_date': '2026-03-01'}, 5))")


def test_concurrent_commits_of_one_file_add_it_once(table):
    rel, _, _ = _write(Path(table), "2026-03-01", "part-a-r1.parquet", range(5))
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, table, rel], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    outs = [p.communicate() for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sorted(out.strip() for out, _ in outs) == ["False"] * 3 + ["True"]
    assert deltalake.DeltaTable(table).version() == 1
    assert _ids(table) == list(range(5))


def test_remove_then_recommit(table):
    root = Path(table)
    a = _write(root, "2026-03-01", "part-a-r1.parquet", range(5))
    b = _write(root, "2026-03-02", "part-b-r1.parquet", range(5, 8))
    for f in (a, b):
        commit_file(table, *f)
    assert remove_files(table, [a[0], "run_date=2026-03-01/never-committed.parquet"]) == 1
    assert remove_files(table, [a[0]]) == 0
    assert _ids(table) == [5, 6, 7]
    assert (root / a[0]).exists()  # data files stay until vacuum
    assert commit_file(table, *a) is True
    assert _ids(table) == list(range(8))


def test_odd_characters_in_paths_round_trip(table):
    rel, part, n = _write(Path(table), "2026-03-01", "part a+b%3A#é.parquet", range(3))
    assert commit_file(table, rel, part, n)
    assert committed_files(table) == {rel}
    assert commit_file(table, rel, part, n) is False
    assert _ids(table) == [0, 1, 2]


def test_ensure_table_accepts_same_schema_and_names_differences(table):
    ensure_table(table, SCHEMA, ["run_date"])  # reopening with the same schema is fine
    changed = pa.schema([("id", pa.int32()), ("text", pa.string()),
                         ("embedding", pa.list_(pa.float32())), ("label", pa.string())])
    with pytest.raises(ValueError) as err:
        ensure_table(table, changed, ["run_date"])
    msg = str(err.value)
    assert "'id'" in msg and "'label'" in msg and "'score'" in msg
    with pytest.raises(ValueError, match="partitioned by"):
        ensure_table(table, SCHEMA, ["day"])


def test_commit_refuses_a_file_that_does_not_fit(table):
    root = Path(table)
    rel = "run_date=2026-03-01/part-bad.parquet"
    (root / rel).parent.mkdir(parents=True)
    pq.write_table(pa.table({"id": [1], "text": ["x"]}), root / rel)
    with pytest.raises(ValueError, match="lacks column 'score'"):
        commit_file(table, rel, {"run_date": "2026-03-01"}, 1)
    good, part, n = _write(root, "2026-03-01", "part-good.parquet", range(4))
    with pytest.raises(ValueError, match="footer says 4 rows"):
        commit_file(table, good, part, n + 1)
    with pytest.raises(ValueError, match="partition"):
        commit_file(table, good, {"day": "x"}, n)
    with pytest.raises(FileNotFoundError):
        commit_file(table, "run_date=2026-03-01/missing.parquet", part, 1)
    assert committed_files(table) == set()


def test_rewriting_a_committed_file_is_caught(table):
    root = Path(table)
    rel, part, n = _write(root, "2026-03-01", "part-a-r1.parquet", range(5))
    commit_file(table, rel, part, n)
    _write(root, "2026-03-01", "part-a-r1.parquet", range(50))
    with pytest.raises(RuntimeError, match="rewritten after its commit"):
        commit_file(table, rel, part, 50)


def test_missing_deltalake_gives_the_install_hint(monkeypatch):
    from lepton_batch.output import delta

    monkeypatch.setitem(sys.modules, "deltalake", None)  # makes `import deltalake` fail
    with pytest.raises(ImportError, match=r"pip install 'lepton-batch\[delta\]'"):
        delta.require_deltalake()
