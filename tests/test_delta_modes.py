"""Delta output in every mode (output/delta_sink.py): overwrite as ONE atomic commit that
readers see whole or not at all, resume committing each finished shard, error_if_exists
refusing a table that holds data; and runs killed (SIGKILL through the CLI) at points
around those commits, then run again. Real jobs on the tiny BERT, read back with
deltalake's DeltaTable at each version."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from datetime import date
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import built_once, invoke_cli, sample_texts, table_rows, write_job

from lepton_batch.faults import FAULT_ENV
from lepton_batch.job.spec import JobSpecError, load_job
from lepton_batch.plan.build import make_plan
from lepton_batch.run.lifecycle import run_job

deltalake = pytest.importorskip("deltalake")

DAY = date(2026, 3, 1)
TEXTS = sample_texts(80)
OLD = list(range(24))  # the first run's ids: 3 shards of 8
NEW = list(range(100, 116))  # the next run's: 2 shards, another schema (a passthrough)


def _write(folder: Path, name: str, ids: list[int], lang: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    cols = {"id": pa.array(ids, pa.int64()),
            "text": pa.array([TEXTS[i % len(TEXTS)] for i in ids], pa.string())}
    if lang:
        cols["lang"] = pa.array(["en"] * len(ids), pa.string())
    pq.write_table(pa.table(cols), folder / name, row_group_size=8)


def _job(base: Path, model: Path, mode: str, lang: bool = False, fmt: str = "delta") -> Path:
    return write_job(
        base / "job.yaml",
        name="delta-modes",
        input={"path": str(base / "in"), "rows_per_shard": 8,
               "passthrough_columns": ["lang"] if lang else []},
        model={"path": str(model), "max_length": 48, "dtype": "float32"},
        task={"kind": "embed"},
        engine={"max_tokens_per_batch": 256},
        output={"path": str(base / "out"), "mode": mode, "format": fmt},
        cluster={"processes": False, "dashboard_address": "127.0.0.1:0", "retries": 0},
    )


def _run(job: Path):
    return run_job(make_plan(load_job(job), run_date=DAY))


def _ids(root: Path, version: int | None = None) -> list[int]:
    """The ids a Delta reader sees, at ``version`` (default: the latest), sorted."""
    table = deltalake.DeltaTable(str(root), version=version).to_pyarrow_table()
    return sorted(table.column("id").to_pylist())


def _version(root: Path) -> int:
    return deltalake.DeltaTable(str(root)).version()


def _files(root: Path, version: int | None = None) -> set[str]:
    dt = deltalake.DeltaTable(str(root), version=version)
    return {str(Path(uri).relative_to(root)) for uri in dt.file_uris()}


def test_overwrite_is_one_commit_and_the_version_before_keeps_the_old_rows(tmp_path,
                                                                          tiny_bert):
    root = tmp_path / "out"
    _write(tmp_path / "in", "a.parquet", OLD)
    first = _run(_job(tmp_path, tiny_bert, "overwrite"))
    assert first.ok and len(first.records) == 3
    assert _version(root) == 1  # created at 0, then the whole run as one commit
    assert _ids(root) == OLD
    # A new input with a new column: the overwrite replaces rows and schema in one commit.
    (tmp_path / "in" / "a.parquet").unlink()
    _write(tmp_path / "in", "b.parquet", NEW, lang=True)
    second = _run(_job(tmp_path, tiny_bert, "overwrite", lang=True))
    assert second.ok and _version(root) == 2
    assert _ids(root) == NEW and _ids(root, 1) == OLD  # the new version, and the one before
    latest = deltalake.DeltaTable(str(root)).to_pyarrow_table()
    assert "lang" in latest.schema.names
    assert "lang" not in deltalake.DeltaTable(str(root), version=1).to_pyarrow_table().schema.names
    assert pl.read_delta(str(root)).height == len(NEW)
    assert (root / "_SUCCESS").is_file() and not (root / "_staging").exists()
    # Every version's files stay (time travel); a third overwrite leaves both readable.
    third = _run(_job(tmp_path, tiny_bert, "overwrite", lang=True))
    assert third.ok and _version(root) == 3 and _ids(root) == NEW
    assert _ids(root, 1) == OLD and _ids(root, 2) == NEW
    assert {str(p.relative_to(root)) for p in root.glob("run_date=*/*.parquet")} == (
        _files(root, 1) | _files(root, 2) | _files(root, 3))
    # inspect reads the current version: its rows, its part files (not the older versions'
    # files still on disk), and the norms of list<float> embeddings (Delta has no fixed-size
    # lists, which Parquet output's embeddings are).
    code, out = invoke_cli("inspect", root)
    assert code == 0, out
    (partition,) = table_rows(out, "part files")
    assert partition["rows"] == f"{len(NEW)}" and partition["part files"] == str(
        len(_files(root, 3)))
    (norms,) = table_rows(out, "rows with an embedding")
    assert norms["dim"] == str(len(latest.column("embedding")[0].as_py()))
    assert norms["rows with an embedding"] == f"{len(NEW)}"


def test_resume_commits_each_shard_and_then_only_what_changed(tmp_path, tiny_bert):
    root = tmp_path / "out"
    _write(tmp_path / "in", "a.parquet", OLD[:16])
    _write(tmp_path / "in", "b.parquet", OLD[16:])
    job = _job(tmp_path, tiny_bert, "resume")
    first = _run(job)
    assert first.ok and _version(root) == 3  # one commit per shard; nothing left to drop
    assert _ids(root) == OLD
    again = _run(job)
    assert again.skipped == 3 and not again.records and _version(root) == 3
    # b.parquet changes: its one shard is computed and committed, its old file dropped.
    _write(tmp_path / "in", "b.parquet", NEW[:8])
    third = _run(job)
    assert third.ok and third.skipped == 2 and len(third.records) == 1
    assert _version(root) == 5  # the new shard's commit, then the one removing the old file
    assert _ids(root) == OLD[:16] + NEW[:8]
    assert _ids(root, 4) == OLD + NEW[:8]  # between the two commits: old b still there
    assert (root / "_SUCCESS").is_file() and not (root / "_staging").exists()


def test_error_if_exists_refuses_a_table_with_data(tmp_path, tiny_bert):
    _write(tmp_path / "in", "a.parquet", OLD)
    job = _job(tmp_path, tiny_bert, "error_if_exists")
    assert _run(job).ok
    assert _version(tmp_path / "out") == 1 and _ids(tmp_path / "out") == OLD
    with pytest.raises(JobSpecError, match="already holds a published dataset"):
        _run(job)
    # Neither format overwrites the other's dataset: the files would not go in one step.
    with pytest.raises(JobSpecError, match="holds a delta dataset; output.format is parquet"):
        _run(_job(tmp_path, tiny_bert, "overwrite", fmt="parquet"))


# --- killed runs -----------------------------------------------------------------------

KILLED = -signal.SIGKILL


def _killed(job: Path, point: str) -> None:
    """Submit ``job`` in its own process, SIGKILLed at ``point``."""
    env = {**os.environ, "COLUMNS": "250", FAULT_ENV: point}
    res = subprocess.run([sys.executable, "-m", "lepton_batch", "submit", str(job),
                          "--run-date", DAY.isoformat()], capture_output=True, text=True,
                         timeout=240, env=env)
    assert res.returncode == KILLED, res.stdout + res.stderr


@pytest.fixture(scope="module")
def old_table(tmp_path_factory, tiny_bert) -> Path:
    """A Delta table after one overwrite run over ``OLD`` (version 1), built once."""
    def build(base: Path) -> None:
        _write(base / "in", "a.parquet", OLD)
        assert _run(_job(base, tiny_bert, "overwrite")).ok

    return built_once(tmp_path_factory, "delta-old-table", build) / "out"


@pytest.mark.slow
@pytest.mark.parametrize("point", ["shard-recorded@1", "delta-replacing", "delta-committed"])
def test_killed_overwrite_leaves_the_old_version_then_commits_once(point, old_table, tmp_path,
                                                                   tiny_bert):
    root = tmp_path / "out"
    shutil.copytree(old_table, root)
    _write(tmp_path / "in", "b.parquet", NEW)
    job = _job(tmp_path, tiny_bert, "overwrite")
    _killed(job, point)
    if point == "delta-committed":  # killed after its one commit: the new version is whole
        assert _version(root) == 2 and _ids(root) == NEW
    else:  # killed before it: the old version, readable and intact
        assert _version(root) == 1 and _ids(root) == OLD
    assert _run(job).ok
    assert _version(root) == 2  # one overwrite commit in all, rerun included
    assert _ids(root) == NEW and _ids(root, 1) == OLD
    assert (root / "_SUCCESS").is_file() and not (root / "_staging").exists()
    # what the killed run wrote and never committed is gone; both versions' files stay
    assert {str(p.relative_to(root)) for p in root.glob("run_date=*/*.parquet")} == (
        _files(root, 1) | _files(root, 2))


@pytest.mark.slow
@pytest.mark.parametrize("point", ["delta-committed@2", "part-written@2"])
def test_killed_resume_run_again_has_every_row_once(point, tmp_path, tiny_bert):
    root = tmp_path / "out"
    _write(tmp_path / "in", "a.parquet", OLD)
    job = _job(tmp_path, tiny_bert, "resume")
    _killed(job, point)
    seen = _ids(root)  # readable: the shards committed before the kill
    assert len(seen) == len(set(seen)) and set(seen) <= set(OLD)
    again = _run(job)
    assert again.ok and again.skipped >= (2 if point == "delta-committed@2" else 0)
    assert _ids(root) == OLD  # every row exactly once
    assert (root / "_SUCCESS").is_file() and not (root / "_staging").exists()
    assert {str(p.relative_to(root)) for p in root.glob("run_date=*/*.parquet")} == _files(root)
