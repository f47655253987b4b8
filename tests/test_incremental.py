"""Nightly runs: row-level incremental mode, identical rows computed once, the schema
contract, run-date placeholders. Real jobs through Dask on the tiny BERT."""

from __future__ import annotations

import json
from datetime import date

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, sample_texts, write_job
from typer.testing import CliRunner

from lepton_batch.cli.app import app
from lepton_batch.job.spec import JobSpecError, fill_path, load_job
from lepton_batch.output.contract import SCHEMA_FILE
from lepton_batch.output.layout import OutputError
from lepton_batch.plan.build import make_plan
from lepton_batch.plan.incremental import content_hashes, first_occurrences
from lepton_batch.run.lifecycle import run_job

NIGHTS = [date(2026, 3, 1), date(2026, 3, 2), date(2026, 3, 3)]
TEXTS = sample_texts(120)


def _write(folder, name, rows: dict[int, str | None]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table({"id": pa.array(list(rows), pa.int64()),
                      "text": pa.array(list(rows.values()), pa.string())})
    pq.write_table(table, folder / name, row_group_size=8)


def _plan(tmp_path, model_dir, run_date, mode="incremental", overrides=(), **input_extra):
    path = write_job(
        tmp_path / "job.yaml",
        name="nightly",
        input={"path": str(tmp_path / "in"), "rows_per_shard": 16, **input_extra},
        model={"path": str(model_dir), "max_length": 48, "dtype": "float32"},
        task={"kind": "embed"},
        engine={"max_tokens_per_batch": 256},
        output={"path": str(tmp_path / "out"), "mode": mode},
        cluster={"processes": False, "dashboard_address": "127.0.0.1:0"},
    )
    return make_plan(load_job(path, list(overrides)), run_date=run_date)


def _partition(root, day: date) -> pl.DataFrame:
    files = sorted((root / f"run_date={day}").glob("*.parquet"))
    return pl.read_parquet(files).sort("id") if files else pl.DataFrame()


def test_three_nights_compute_exactly_the_new_and_changed_rows(tmp_path, tiny_bert):
    src = tmp_path / "in"
    a = {i: TEXTS[i] for i in range(30)}
    a[6] = a[5]  # identical texts: one model call
    a[9] = None  # a bad row is output (with its error) and not retried while unchanged
    b = {100 + i: TEXTS[40 + i] for i in range(20)}
    _write(src, "a.parquet", a)
    _write(src, "b.parquet", b)
    computed, results = [], []
    expected = [set(a) | set(b)]

    plan = _plan(tmp_path, tiny_bert, NIGHTS[0])
    results.append(run_job(plan))
    computed.append(set(_partition(plan.output_root, NIGHTS[0])["id"].to_list()))

    # Night 2: two texts change, two rows are deleted, two appended (a is rewritten, so
    # all its shards are new), b stays as it was, a new file c arrives.
    a2 = dict(a)
    a2[3], a2[4] = TEXTS[90], TEXTS[91]
    del a2[10], a2[11]
    a2 |= {30: TEXTS[92], 31: TEXTS[93]}
    _write(src, "a.parquet", a2)
    c = {200 + i: TEXTS[100 + i] for i in range(5)}
    _write(src, "c.parquet", c)
    expected.append({3, 4, 30, 31, *c})
    plan = _plan(tmp_path, tiny_bert, NIGHTS[1])
    results.append(run_job(plan))
    computed.append(set(_partition(plan.output_root, NIGHTS[1])["id"].to_list()))

    # Night 3: id 3 changes back to its night-1 text (its newest row is night 2's, so it is
    # computed again), one row of b changes, one of c is deleted.
    a3 = dict(a2)
    a3[3] = a[3]
    b3 = dict(b)
    b3[101] = TEXTS[110]
    c3 = dict(c)
    del c3[204]
    for name, rows in (("a.parquet", a3), ("b.parquet", b3), ("c.parquet", c3)):
        _write(src, name, rows)
    expected.append({3, 101})
    plan = _plan(tmp_path, tiny_bert, NIGHTS[2])
    results.append(run_job(plan))
    computed.append(set(_partition(plan.output_root, NIGHTS[2])["id"].to_list()))

    assert computed == expected
    assert [r.rows for r in results] == [len(e) for e in expected]
    assert all(r.published for r in results)
    assert results[0].deduplicated_rows == 1
    night1 = _partition(plan.output_root, NIGHTS[0])
    emb = {r["id"]: r["embedding"] for r in night1.iter_rows(named=True)}
    assert emb[5] == emb[6] and emb[5] is not None
    assert night1.filter(pl.col("id") == 9)["error"].item() == "null text"
    summaries = [r.summary(plan) for r in results]
    assert [s["rows_input"] for s in summaries] == [50, 55, 54]
    assert [s["rows_unchanged"] for s in summaries] == [0, 55 - 9, 54 - 2]
    assert [s["ids_gone_from_input"] for s in summaries] == [0, 2, 3]

    # The warehouse view: DuckDB and polars read the three runs as one table.
    root = plan.output_root
    glob = str(root / "**" / "*.parquet")
    con = duckdb.connect()
    per_run = con.sql(f"select run_date, count(*) from read_parquet('{glob}', "
                      "hive_partitioning = true) group by all order by 1").fetchall()
    assert [(d, n) for d, n in per_run] == [(d, len(e)) for d, e in zip(NIGHTS, expected,
                                                                       strict=True)]
    dupes = con.sql(f"select id, content_hash, job_fingerprint, count(*) c from read_parquet("
                    f"'{glob}', hive_partitioning = true) group by all having c > 1").fetchall()
    # Only the id whose text went back to an earlier version has one (id, content_hash,
    # fingerprint) twice, on nights 1 and 3: its newest row must say what its text is now.
    reverted = content_hashes(pa.table({"text": [a[3]]}), ["text"]).to_pylist()[0]
    assert dupes == [(3, reverted, plan.job_fingerprint, 2)]
    assert con.sql(f"select count(*) from (select run_date, id, content_hash from read_parquet("
                   f"'{glob}', hive_partitioning = true) group by all having count(*) > 1)"
                   ).fetchall() == [(0,)]
    latest = con.sql(
        f"select id, content_hash from read_parquet('{glob}', hive_partitioning = true) "
        "qualify row_number() over (partition by id order by run_date desc, run_id desc) = 1"
    ).pl().sort("id")
    current = {**a3, **b3, **c3}
    hashes = content_hashes(pa.table({"text": list(current.values())}), ["text"]).to_pylist()
    still_there = latest.filter(pl.col("id").is_in(list(current)))
    assert dict(still_there.iter_rows()) == dict(zip(current, hashes, strict=True))
    # Deleted ids keep their last row (history); the run report counts them.
    assert set(latest["id"]) - set(current) == {10, 11, 204}
    lazy = pl.scan_parquet(str(root / "run_date=*" / "*.parquet"), hive_partitioning=True)
    assert lazy.select(pl.len()).collect().item() == sum(len(e) for e in expected)
    schemas = {pq.read_schema(p).remove_metadata() for p in root.glob("run_date=*/*.parquet")}
    assert len(schemas) == 1
    contract = json.loads((root / SCHEMA_FILE).read_text())
    assert [f["name"] for f in contract["fields"]] == schemas.pop().names
    assert contract["layout"] == "incremental"


def test_nothing_changed_computes_nothing_and_new_fingerprint_recomputes(tmp_path,
                                                                        tiny_bert):
    _write(tmp_path / "in", "a.parquet", {i: TEXTS[i] for i in range(20)})
    first = run_job(_plan(tmp_path, tiny_bert, NIGHTS[0]))
    again = run_job(_plan(tmp_path, tiny_bert, NIGHTS[1]))
    assert first.rows == 20 and again.rows == 0 and again.ok
    assert again.rows_plan.unchanged == 20 and not again.records
    assert not (tmp_path / "out" / f"run_date={NIGHTS[1]}").exists()
    # validate says what a submit now would compute, without taking the lock
    res = CliRunner().invoke(app, ["validate", str(tmp_path / "job.yaml"), "--no-estimate"],
                             env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    assert "20 input rows, 20 unchanged, 0 to compute in 0 shard(s)" in res.output
    # A task setting that changes values is a new fingerprint: every row again, said so.
    changed = run_job(_plan(tmp_path, tiny_bert, NIGHTS[1], overrides=["task.normalize=true"]))
    assert changed.rows == 20
    old = pl.read_parquet(sorted((tmp_path / "out").glob(f"run_date={NIGHTS[0]}/*.parquet")))
    assert changed.rows_plan.previous_fingerprints == old["job_fingerprint"].unique().to_list()


def test_schema_change_and_mode_switch_are_refused_before_any_model_loads(tmp_path,
                                                                         tiny_bert):
    _write(tmp_path / "in", "a.parquet", {i: TEXTS[i] for i in range(10)})
    run_job(_plan(tmp_path, tiny_bert, NIGHTS[0]))
    with pytest.raises(JobSpecError, match=r"schema differs .*new column text"):
        _plan(tmp_path, tiny_bert, NIGHTS[1], passthrough_columns=["text"])
    with pytest.raises(JobSpecError, match=r"an incremental \(history\) dataset; mode resume"):
        _plan(tmp_path, tiny_bert, NIGHTS[1], mode="resume")
    with pytest.raises(JobSpecError, match="error_if_exists"):
        _plan(tmp_path, tiny_bert, NIGHTS[1], mode="error_if_exists")
    # overwrite replaces the history with a snapshot, and the contract with it.
    _plan(tmp_path, tiny_bert, NIGHTS[1], mode="overwrite", passthrough_columns=["text"])


def test_snapshot_output_refuses_incremental_and_error_if_exists_runs_once(tmp_path,
                                                                          tiny_bert):
    _write(tmp_path / "in", "a.parquet", {i: TEXTS[i] for i in range(10)})
    plan = _plan(tmp_path, tiny_bert, NIGHTS[0], mode="error_if_exists")
    late = _plan(tmp_path, tiny_bert, NIGHTS[0], mode="error_if_exists")
    assert run_job(plan).published
    with pytest.raises(JobSpecError, match="error_if_exists"):
        _plan(tmp_path, tiny_bert, NIGHTS[0], mode="error_if_exists")
    # Checked again under the lock: a job planned before another run published is refused.
    with pytest.raises(OutputError, match="error_if_exists"):
        run_job(late)
    with pytest.raises(JobSpecError, match="holds a snapshot dataset"):
        _plan(tmp_path, tiny_bert, NIGHTS[1], mode="incremental")


def test_run_date_placeholders_pick_the_nights_input(tmp_path, tiny_bert):
    for day, n in ((NIGHTS[0], 6), (NIGHTS[1], 9)):
        _write(tmp_path / "in" / f"dt={day:%Y%m%d}", "x.parquet",
               {i: TEXTS[i] for i in range(n)})
    path = str(tmp_path / "in" / "dt={yesterday:%Y%m%d}")
    plan = _plan(tmp_path, tiny_bert, NIGHTS[2], path=path)
    assert plan.rows == 9 and plan.job.input.path.endswith("dt=20260302")
    assert fill_path("x/{run_date}/{{literal}}", NIGHTS[0]) == "x/2026-03-01/{literal}"
    with pytest.raises(JobSpecError, match=r"input.path: .*\{today\} is not a placeholder"):
        _plan(tmp_path, tiny_bert, NIGHTS[0], path=str(tmp_path / "{today}"))
    # A night with no export names the night it looked for and where that date came from.
    missing = str(tmp_path / "in" / "dt={run_date:%Y%m%d}")
    with pytest.raises(JobSpecError, match=r"dt=20260303 does not exist.*"
                       r"dt=\{run_date:%Y%m%d\} was filled in for 2026-03-03, from --run-date"):
        _plan(tmp_path, tiny_bert, NIGHTS[2], path=missing)


def test_identical_rows_share_one_result_in_every_mode(tmp_path, tiny_bert):
    texts = [TEXTS[0], TEXTS[1], TEXTS[0], None, TEXTS[1], TEXTS[0], ""]
    _write(tmp_path / "in", "a.parquet", dict(enumerate(texts)))
    result = run_job(_plan(tmp_path, tiny_bert, NIGHTS[0], mode="resume"))
    out = pl.read_parquet(sorted((tmp_path / "out").glob("run_date=*/*.parquet"))).sort("id")
    assert result.deduplicated_rows == 3  # two more TEXTS[0], one more TEXTS[1]
    emb = out["embedding"].to_list()
    assert emb[0] == emb[2] == emb[5] and emb[1] == emb[4] and emb[0] != emb[1]
    errors = out["error"].to_list()
    assert errors[3] == "null text" and errors[6] and errors.count(None) == 5
    assert out["content_hash"].n_unique() == 4


def test_content_hash_and_first_occurrences():
    t = pa.table({"a": ["x", "y", "x", None], "b": [1, 1, 1, 1]})
    h = content_hashes(t, ["a"]).to_pylist()
    assert h[0] == h[2] and len(set(h)) == 3 and all(len(x) == 16 for x in h)
    # string and binary UTF-8 hash alike; the column set matters
    assert content_hashes(pa.table({"a": pa.array([b"x"])}), ["a"]).to_pylist()[0] == h[0]
    assert content_hashes(t, ["a", "b"]).to_pylist()[0] != h[0]
    first, inverse = first_occurrences(pa.array(h))
    assert first.tolist() == [0, 1, 3] and inverse.tolist() == [0, 1, 0, 2]
    assert np.array_equal(first[inverse], [0, 1, 0, 3])


def test_delta_output_over_three_nights_reads_as_one_table(tmp_path, tiny_bert):
    deltalake = pytest.importorskip("deltalake")
    src = tmp_path / "in"
    nights = [{i: TEXTS[i] for i in range(20)}]
    nights.append({**nights[0], 2: TEXTS[60], 20: TEXTS[61]})
    nights.append({**{k: v for k, v in nights[1].items() if k != 5}, 7: TEXTS[62]})
    expected = [set(nights[0]), {2, 20}, {7}]
    results = []
    for day, rows in zip(NIGHTS, nights, strict=True):
        _write(src, "a.parquet", rows)
        plan = _plan(tmp_path, tiny_bert, day, overrides=["output.format=delta"])
        results.append(run_job(plan))
    root = plan.output_root
    dt = deltalake.DeltaTable(str(root))
    table = pl.from_arrow(dt.to_pyarrow_table())
    assert dt.version() == sum(len(r.records) for r in results)  # one commit per shard
    per_night = [set(table.filter(pl.col("run_date") == str(d))["id"].to_list())
                 for d in NIGHTS]
    assert per_night == expected
    assert pl.read_delta(str(root)).height == table.height == 23
    uris = ", ".join(f"'{u}'" for u in dt.file_uris())
    con = duckdb.connect()
    assert con.sql(f"select count(*), count(distinct id) from read_parquet([{uris}], "
                   "hive_partitioning = true)").fetchall() == [(23, 21)]
    # The contract holds for Delta too; a parquet job on the same path is refused.
    with pytest.raises(JobSpecError, match="holds a delta dataset"):
        _plan(tmp_path, tiny_bert, NIGHTS[2])
    # Delta takes mode resume too, but not on a history: the layout contract refuses it.
    with pytest.raises(JobSpecError, match=r"holds an incremental \(history\) dataset; "
                                           "mode resume writes a snapshot one"):
        _plan(tmp_path, tiny_bert, NIGHTS[2], mode="resume", overrides=["output.format=delta"])


RANK = "qualify rank() over (partition by id order by run_date desc, run_id desc) = 1"
LATEST_SQL = ("select * from (select * from read_parquet('{glob}', hive_partitioning = true) "
              f"{RANK}){{where}}")  # docs/nightly-runs.md's DuckDB query


def _duckdb_latest(root, tombstones: bool = False) -> pl.DataFrame:
    readme = (REPO / "docs" / "nightly-runs.md").read_text()
    assert RANK in readme and "where not deleted" in readme
    glob = str(root / "run_date=*" / "*.parquet")
    return duckdb.connect().sql(LATEST_SQL.format(
        glob=glob, where=" where not deleted" if tombstones else "")).pl()


def _inspect_latest(root, sql: str) -> str:
    res = CliRunner().invoke(app, ["inspect", str(root), "--latest", "--sql", sql],
                             env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    return res.output


def _hash(text: str) -> str:
    return content_hashes(pa.table({"text": [text]}), ["text"]).to_pylist()[0]


def test_backfill_fills_in_its_night_and_leaves_later_nights_as_they_are(tmp_path, tiny_bert):
    """Issue 28, bug 2: a run date before the newest published night (a backfill)."""
    night1 = {i: TEXTS[i] for i in range(20)}
    night2 = {**night1, 7: TEXTS[50]}
    _write(tmp_path / "in", "a.parquet", night1)
    run_job(_plan(tmp_path, tiny_bert, date(2026, 12, 1)))
    _write(tmp_path / "in", "a.parquet", night2)
    assert run_job(_plan(tmp_path, tiny_bert, date(2026, 12, 2))).rows == 1
    root = tmp_path / "out"
    # Rerunning a past night with the input it had computes nothing (on main: id 7 again,
    # compared with 12-02's row, and a second row for id 7 in partition 12-01).
    _write(tmp_path / "in", "a.parquet", night1)
    assert _plan(tmp_path, tiny_bert, date(2026, 12, 1)).row_plan().to_compute == 0

    # A text changes; then a backfill of 11-30, before every published night.
    _write(tmp_path / "in", "a.parquet", {**night2, 3: TEXTS[51]})
    res = CliRunner().invoke(app, ["validate", str(tmp_path / "job.yaml"), "--no-estimate",
                                   "--run-date", "2026-11-30"], env={"COLUMNS": "400"})
    assert res.exit_code == 0, res.output
    assert ("warning: run date 2026-11-30 is older than the newest published night 2026-12-02: "
            "a backfill. It computes the rows that differ from the output as of 2026-11-30"
            ) in " ".join(res.output.split())
    assert "20 input rows, 0 unchanged, 20 to compute" in res.output
    backfill = run_job(_plan(tmp_path, tiny_bert, date(2026, 11, 30)))
    # The output as of 11-30 was empty: the backfill's night holds every row (main: 1).
    assert backfill.rows == 20
    assert _partition(root, date(2026, 11, 30))["id"].to_list() == list(range(20))
    assert _partition(root, date(2026, 11, 30)).filter(pl.col("id") == 3)[
        "content_hash"].item() == _hash(TEXTS[51])
    # Later nights say what they said: latest is each id's row from its greatest run date.
    latest = _duckdb_latest(root)
    got = {r["id"]: (str(r["run_date"]), r["content_hash"]) for r in latest.iter_rows(
        named=True)}
    assert len(got) == latest.height == 20
    assert got[3] == ("2026-12-01", _hash(TEXTS[3]))  # main: the same (the stale value)
    assert got[7] == ("2026-12-02", _hash(TEXTS[50]))
    out = _inspect_latest(root, "select id, content_hash, cast(run_date as varchar) as d "
                          "from latest where id in (3, 7) order by id")
    assert f"3  │ {_hash(TEXTS[3])} │ 2026-12-01" in out
    assert f"7  │ {_hash(TEXTS[50])} │ 2026-12-02" in out
    # The next night computes what differs from 12-02 (id 3), nothing the backfill added.
    plan = _plan(tmp_path, tiny_bert, date(2026, 12, 3))
    assert plan.backfill_note() is None
    rows = plan.row_plan().rows
    assert {fp: r.tolist() for fp, r in rows.items()} == {plan.shards[0].fingerprint: [3]}
