"""What `latest` is, per id, in an incremental output: repeated ids (one current row per
input row), tombstones for ids gone from the input, and a backfill between two nights that
restates the next night. Real jobs through Dask on the tiny BERT (issue 28)."""

from __future__ import annotations

from datetime import date

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_incremental import (
    NIGHTS,
    TEXTS,
    _duckdb_latest,
    _hash,
    _inspect_latest,
    _partition,
    _plan,
    _write,
)
from typer.testing import CliRunner

from lepton_batch.cli.app import app
from lepton_batch.job.spec import JobSpecError
from lepton_batch.plan.incremental import content_hashes
from lepton_batch.run.lifecycle import run_job


def test_repeated_ids_keep_one_latest_row_per_input_row(tmp_path, tiny_bert):
    """Issue 28, bug 6: an id that repeats is computed as a whole, so its newest run holds
    one row per input row, and inspect --latest, DuckDB and the row plan agree."""
    rows = [(i, TEXTS[i]) for i in range(30)]
    rows[20] = (5, TEXTS[40])  # id 5 twice, in two shards (16 rows each)

    def write(rows):
        table = pa.table({"id": pa.array([r[0] for r in rows], pa.int64()),
                          "text": pa.array([r[1] for r in rows], pa.string())})
        (tmp_path / "in").mkdir(exist_ok=True)
        pq.write_table(table, tmp_path / "in" / "a.parquet", row_group_size=8)

    write(rows)
    assert run_job(_plan(tmp_path, tiny_bert, NIGHTS[0])).rows == 30
    rows[20] = (5, TEXTS[41])  # only the second row of id 5 changes
    write(rows)
    second = run_job(_plan(tmp_path, tiny_bert, NIGHTS[1]))
    assert second.rows == 2  # both rows of id 5 (main: 1, and id 5's other row left latest)
    root = tmp_path / "out"
    assert _partition(root, NIGHTS[1])["content_hash"].sort().to_list() == sorted(
        [_hash(TEXTS[5]), _hash(TEXTS[41])])
    current = sorted(content_hashes(pa.table({"text": [t for _, t in rows]}), ["text"])
                     .to_pylist())
    latest = _duckdb_latest(root)
    assert latest.height == 30 and latest["id"].n_unique() == 29
    assert sorted(latest["content_hash"].to_list()) == current
    out = _inspect_latest(root, "select count(*) as n, count(distinct id) as ids from latest")
    assert "│ 30 │ 29  │" in out
    res = CliRunner().invoke(app, ["inspect", str(root), "--latest"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "1 more row(s) than ids: an id that repeats in the input" in res.output
    # The same rows in another order are the same id group: nothing to compute.
    write(rows[::-1])
    assert _plan(tmp_path, tiny_bert, NIGHTS[2]).row_plan().to_compute == 0


def test_tombstones_mark_deleted_ids_and_drop_them_from_latest(tmp_path, tiny_bert):
    """Issue 28: output.tombstones writes a `deleted` row the night an id disappears."""
    on = ["output.tombstones=true"]
    night1 = {i: TEXTS[i] for i in range(12)}
    _write(tmp_path / "in", "a.parquet", night1)
    first = run_job(_plan(tmp_path, tiny_bert, NIGHTS[0], overrides=on))
    assert first.rows == 12 and first.rows_plan.deleted is not None
    night2 = {k: v for k, v in night1.items() if k not in (3, 4)}
    _write(tmp_path / "in", "a.parquet", night2)
    plan = _plan(tmp_path, tiny_bert, NIGHTS[1], overrides=on)
    second = run_job(plan)
    assert second.rows == 0 and second.published
    assert second.rows_plan.deleted.to_pylist() == [3, 4]
    assert second.summary(plan)["ids_marked_deleted"] == 2
    root = tmp_path / "out"
    marks = _partition(root, NIGHTS[1])
    assert marks["id"].to_list() == [3, 4] and marks["deleted"].to_list() == [True, True]
    assert marks["embedding"].null_count() == 2 and marks["content_hash"].null_count() == 2
    assert marks["job_fingerprint"].to_list() == [plan.job_fingerprint] * 2
    assert not _partition(root, NIGHTS[0])["deleted"].any()
    latest = _duckdb_latest(root, tombstones=True)
    assert sorted(latest["id"].to_list()) == sorted(night2)
    out = _inspect_latest(root, "select count(*) as n, min(cast(deleted as int)) as d "
                          "from latest")
    assert "│ 10 │ 0 │" in out
    # Night 3: id 3 comes back (computed again), 4 stays deleted (not marked twice).
    _write(tmp_path / "in", "a.parquet", {**night2, 3: TEXTS[3]})
    third = run_job(_plan(tmp_path, tiny_bert, NIGHTS[2], overrides=on))
    assert third.rows == 1 and third.rows_plan.gone == 0 and not third.rows_plan.deleted
    back = _partition(root, NIGHTS[2])
    assert back["id"].to_list() == [3] and back["deleted"].to_list() == [False]
    assert sorted(_duckdb_latest(root, tombstones=True)["id"].to_list()) == sorted(
        [*night2, 3])
    # Only in mode incremental; switching an output without them is a schema change.
    with pytest.raises(JobSpecError, match="output.tombstones .* output.mode: incremental"):
        _plan(tmp_path, tiny_bert, NIGHTS[2], mode="resume", overrides=on)
    with pytest.raises(JobSpecError, match="schema differs"):
        _plan(tmp_path, tiny_bert, NIGHTS[2])


def test_tombstones_in_a_delta_table_are_committed_with_the_night(tmp_path, tiny_bert):
    deltalake = pytest.importorskip("deltalake")
    on = ["output.format=delta", "output.tombstones=true"]
    _write(tmp_path / "in", "a.parquet", {i: TEXTS[i] for i in range(10)})
    run_job(_plan(tmp_path, tiny_bert, NIGHTS[0], overrides=on))
    _write(tmp_path / "in", "a.parquet", {i: TEXTS[i] for i in range(8)})
    second = run_job(_plan(tmp_path, tiny_bert, NIGHTS[1], overrides=on))
    assert second.rows == 0 and second.rows_plan.deleted.to_pylist() == [8, 9]
    dt = deltalake.DeltaTable(str(tmp_path / "out"))
    table = pl.from_arrow(dt.to_pyarrow_table())
    assert table.filter(pl.col("deleted"))["id"].sort().to_list() == [8, 9]
    uris = ", ".join(f"'{u}'" for u in dt.file_uris())
    latest = duckdb.connect().sql(
        f"select * from (select * from read_parquet([{uris}], hive_partitioning = true) "
        "qualify rank() over (partition by id order by run_date desc, run_id desc) = 1) "
        "where not deleted").pl()
    assert sorted(latest["id"].to_list()) == list(range(8))


@pytest.mark.parametrize("fmt", ["parquet", "delta"])
def test_backfill_between_nights_restates_the_next_night(fmt, tmp_path, tiny_bert):
    """A backfill of 12-02 between nights 12-01 and 12-03: ids it writes that 12-03 has no
    row for are restated at 12-03 as they were, so 12-03 and latest say what they said."""
    if fmt == "delta":
        pytest.importorskip("deltalake")
    on = ["output.tombstones=true", f"output.format={fmt}"]
    a = {i: TEXTS[i] for i in range(10)}
    _write(tmp_path / "in", "a.parquet", a)
    run_job(_plan(tmp_path, tiny_bert, date(2026, 12, 1), overrides=on))
    _write(tmp_path / "in", "a.parquet", {**a, 2: TEXTS[60]})
    run_job(_plan(tmp_path, tiny_bert, date(2026, 12, 3), overrides=on))
    # 12-02's input: id 5 changed, id 10 new (12-03 had neither change).
    _write(tmp_path / "in", "a.parquet", {**a, 5: TEXTS[61], 10: TEXTS[62]})
    plan = _plan(tmp_path, tiny_bert, date(2026, 12, 2), overrides=on)
    backfill = run_job(plan)
    rows = backfill.rows_plan
    assert backfill.rows == 2 and rows.restate_night == date(2026, 12, 3)
    assert rows.restate.to_pylist() == [5] and rows.restate_deleted.to_pylist() == [10]
    assert backfill.summary(plan)["ids_restated"] == 2
    root = tmp_path / "out"
    assert _partition(root, date(2026, 12, 2))["id"].to_list() == [5, 10]
    night3 = _partition(root, date(2026, 12, 3))
    assert night3["id"].to_list() == [2, 5, 10]
    assert night3["deleted"].to_list() == [False, False, True]
    night1 = _partition(root, date(2026, 12, 1)).filter(pl.col("id") == 5)
    restated = night3.filter(pl.col("id") == 5)
    assert restated.drop("run_id").equals(night1.drop("run_id"))  # a copy, embedding too
    assert restated["run_id"].item() == night1["run_id"].item()  # the run that computed it
    latest = _duckdb_latest(root, tombstones=True)
    got = {r["id"]: r["content_hash"] for r in latest.iter_rows(named=True)}
    assert got == {i: _hash({**a, 2: TEXTS[60]}[i]) for i in range(10)}
    # The same backfill again: nothing to compute, nothing left to restate.
    again = _plan(tmp_path, tiny_bert, date(2026, 12, 2), overrides=on).row_plan()
    assert again.to_compute == 0 and again.restated == 0
    if fmt == "delta":  # every part is committed; none is left outside the table
        from deltalake import DeltaTable

        assert len(DeltaTable(str(root)).file_uris()) == len(list(root.glob("run_date=*/*")))
