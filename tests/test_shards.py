"""Input discovery, shard planning, fingerprints and column checks (footers only)."""

from __future__ import annotations

import os

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lepton_batch.job.shards import (
    check_columns,
    describe_files,
    find_files,
    plan_shards,
    read_shard,
)


def test_shards_cover_every_row_once(corpus):
    folder, rows = corpus
    files = describe_files(str(folder))[0]
    shards = plan_shards(files, rows_per_shard=20)
    assert len(files) == 3
    # 45 rows per file in row groups of 10 -> 20 + 20 + 5
    assert [s.num_rows for s in shards] == [20, 20, 5] * 3
    ids = []
    for s in shards:
        ids += read_shard(s, ["id"])["id"].to_pylist()
    assert ids == [r["id"] for r in rows]
    assert len({s.fingerprint for s in shards}) == len(shards)


def test_row_group_larger_than_shard_is_cut_into_row_ranges(corpus):
    folder, rows = corpus
    shards = plan_shards(describe_files(str(folder / "corpus-0.parquet"))[0], rows_per_shard=3)
    # groups of 10 -> ranges of 3, 3, 3, 1; the last group of 5 -> 3, 2
    assert [s.num_rows for s in shards] == [3, 3, 3, 1] * 4 + [3, 2]
    assert [s.first_row for s in shards][:6] == [0, 3, 6, 9, 10, 13]
    assert [s.group_offset for s in shards][:6] == [0, 3, 6, 9, 0, 3]
    ids = [i for s in shards for i in read_shard(s, ["id"])["id"].to_pylist()]
    assert ids == [r["id"] for r in rows[:45]]


def _one_group_file(path, n: int) -> pa.Table:
    """``n`` rows in ONE row group, as pyarrow and pandas write up to ~1 M rows."""
    table = pa.table({"id": pa.array(range(n), pa.int64()),
                      "text": [f"row {i}: {'word ' * (i % 13)}" for i in range(n)]})
    pq.write_table(table, path, row_group_size=n)
    assert pq.ParquetFile(path).metadata.num_row_groups == 1
    return table


def test_one_large_row_group_becomes_many_shards(tmp_path):
    from lepton_batch.job.shards import describe_shards, read_shards

    table = _one_group_file(tmp_path / "big.parquet", 2000)
    shards = plan_shards(describe_files(str(tmp_path))[0], rows_per_shard=200)
    assert len(shards) == 10 and {s.num_rows for s in shards} == {200}
    assert [s.first_row for s in shards] == list(range(0, 2000, 200))
    assert len({s.fingerprint for s in shards}) == 10
    # every row once, in file order, through the worker's read and the grouped read
    assert pa.concat_tables(read_shard(s, ["id", "text"]) for s in shards).equals(table)
    together = [(s, t) for s, t in read_shards(shards, ["id", "text"])]
    assert [s for s, _ in together] == shards
    assert pa.concat_tables(t for _, t in together).equals(table)
    assert describe_shards(shards, 200) == (
        "10 (≤ 200 rows each; 1 row group of 2,000 rows cut into row ranges)")
    whole = plan_shards(describe_files(str(tmp_path))[0], rows_per_shard=5000)
    assert describe_shards(whole, 5000) == "1 (≤ 5,000 rows each, whole row groups)"


def test_row_range_read_across_batches(tmp_path, monkeypatch):
    """Batches that do not line up with the ranges (ranges over 65,536 rows, or here a
    batch of 7 rows) still give each range exactly its rows."""
    import lepton_batch.job.shards as shards_module

    table = _one_group_file(tmp_path / "big.parquet", 2000)
    monkeypatch.setattr(shards_module, "BATCH_ROWS", 7)
    shards = plan_shards(describe_files(str(tmp_path))[0], rows_per_shard=300)
    assert [s.num_rows for s in shards] == [286] * 6 + [284]
    for s in shards:
        assert read_shard(s, ["id"]).equals(table.select(["id"]).slice(s.first_row, s.num_rows))


def test_whole_group_fingerprints_are_those_of_earlier_versions(tmp_path):
    """Cutting large row groups leaves every other shard as it was, so outputs of earlier
    versions resume: the fingerprint key below is the one earlier versions hashed."""
    import hashlib

    table = pa.table({"id": list(range(535))})
    writer = pq.ParquetWriter(tmp_path / "mixed.parquet", table.schema)
    for lo, n in [(0, 10), (10, 10), (20, 500), (520, 10), (530, 5)]:
        writer.write_table(table.slice(lo, n), row_group_size=n)
    writer.close()
    (f,) = describe_files(str(tmp_path))[0]
    assert f.row_group_rows == (10, 10, 500, 10, 5)
    shards = plan_shards([f], rows_per_shard=20)
    assert [s.num_rows for s in shards] == [20] + [20] * 25 + [15]
    whole = [s for s in shards if not s.is_range]

    def earlier(groups, first, rows):
        key = f"{f.path}|{f.identity}|{groups[0]}-{groups[-1]}|{first}+{rows}"
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    assert [s.fingerprint for s in whole] == [earlier((0, 1), 0, 20), earlier((3, 4), 520, 15)]
    assert all(s.row_groups == (2,) for s in shards[1:26])
    ids = [i for s in shards for i in read_shard(s, ["id"])["id"].to_pylist()]
    assert ids == list(range(535))
    # the whole-group shard earlier versions planned for group 2, when it was computed
    kept = plan_shards([f], 20, keep_whole=lambda fp: fp == earlier((2,), 20, 500))
    assert [s.num_rows for s in kept] == [20, 500, 15]
    assert [s.fingerprint for s in kept] == [earlier(g, a, n) for g, a, n in
                                             [((0, 1), 0, 20), ((2,), 20, 500), ((3, 4), 520, 15)]]


def test_fingerprint_is_stable_and_follows_content(corpus):
    folder, _ = corpus
    first = [s.fingerprint for s in plan_shards(describe_files(str(folder))[0], 20)]
    assert first == [s.fingerprint for s in plan_shards(describe_files(str(folder))[0], 20)]
    target = folder / "corpus-1.parquet"
    pq.write_table(pq.read_table(target).slice(0, 30), target, row_group_size=10)
    os.utime(target, ns=(1, 1))
    second = [s.fingerprint for s in plan_shards(describe_files(str(folder))[0], 20)]
    assert first[:3] == second[:3] and first[-3:] == second[-3:]
    assert not set(first[3:6]) & set(second[3:5])


def test_glob_file_and_skipped_names(corpus):
    folder, _ = corpus
    (folder / "_SUCCESS").write_text("")
    pq.write_table(pa.table({"x": [1]}), folder / "_hidden.parquet")
    _, files = find_files(str(folder / "corpus-[01].parquet"))
    assert [f.rsplit("/", 1)[-1] for f in files] == ["corpus-0.parquet", "corpus-1.parquet"]
    _, files = find_files(str(folder))
    assert len(files) == 3
    with pytest.raises(FileNotFoundError, match="input.path"):
        find_files(str(folder / "nope"))


def test_fsspec_url_input(corpus):
    folder, rows = corpus
    fs = fsspec.filesystem("memory")
    for f in sorted(folder.glob("*.parquet")):
        fs.pipe(f"/lb-test/{f.name}", f.read_bytes())
    files = describe_files("memory://lb-test/")[0]
    shards = plan_shards(files, 100)
    assert files[0].path.startswith("memory://")
    assert sum(read_shard(s, ["id"]).num_rows for s in shards) == len(rows)


def test_column_checks_name_the_field(corpus, tmp_path):
    folder, _ = corpus
    files = describe_files(str(folder))[0]
    assert check_columns(files, "text", "id", ["lang"]) == []
    problems = check_columns(files, "body", "id", ["missing"])
    assert any(p.startswith("input.text_column: column 'body'") for p in problems)
    assert any(p.startswith("input.passthrough_columns: column 'missing'") for p in problems)
    pq.write_table(pa.table({"id": [1], "text": [3.5]}), tmp_path / "num.parquet")
    problems = check_columns(describe_files(str(tmp_path / "num.parquet"))[0], "text", "id", [])
    assert problems and "expected a string" in problems[0]


def test_credentials_in_urls_are_redacted():
    from lepton_batch.job.shards import redact

    assert redact("https://alice:s3cr3t@example.com/x.parquet") == "https://***@example.com/x.parquet"
    assert redact("s3://bucket/key.parquet") == "s3://bucket/key.parquet"
    assert redact("/data/in/x.parquet") == "/data/in/x.parquet"


def _big_group_job(tmp_path, model, rows_per_shard: int, mode: str = "resume"):
    from conftest import write_job

    from lepton_batch.job.spec import load_job
    from lepton_batch.plan.build import make_plan

    job = write_job(
        tmp_path / "job.yaml", name="big-group",
        input={"path": str(tmp_path / "in"), "rows_per_shard": rows_per_shard},
        model={"path": str(model), "max_length": 32, "dtype": "float32"},
        task={"kind": "embed"}, output={"path": str(tmp_path / "out"), "mode": mode},
        cluster={"processes": False, "dashboard_address": "127.0.0.1:0", "retries": 0})
    return make_plan(load_job(job))


def _published(root):
    import polars as pl

    return pl.read_parquet(sorted(root.glob("run_date=*/*.parquet"))).sort("id")


def test_resume_keeps_a_large_group_computed_whole_earlier(tmp_path, tiny_bert):
    """An output whose large row group was computed as one shard (what earlier versions
    planned, same fingerprint) resumes without computing it again; overwrite cuts it."""
    import numpy as np

    from lepton_batch.job.shards import describe_shards
    from lepton_batch.run.lifecycle import run_job

    (tmp_path / "in").mkdir()
    _one_group_file(tmp_path / "in" / "big.parquet", 200)
    earlier = _big_group_job(tmp_path, tiny_bert, rows_per_shard=1000)
    assert len(earlier.shards) == 1 and run_job(earlier).ok
    whole = _published(earlier.output_root)

    plan = _big_group_job(tmp_path, tiny_bert, rows_per_shard=50)
    assert plan.job_fingerprint == earlier.job_fingerprint
    assert [s.fingerprint for s in plan.shards] == [earlier.shards[0].fingerprint]
    assert describe_shards(plan.shards, 50) == (
        "1 (≤ 50 rows each; 1 row group of 200 rows kept whole: computed as one shard already)")
    result = run_job(plan)
    assert result.ok and result.skipped == 1 and not result.records

    cut = _big_group_job(tmp_path, tiny_bert, rows_per_shard=50, mode="overwrite")
    assert describe_shards(cut.shards, 50).endswith("1 row group of 200 rows cut into row ranges)")
    result = run_job(cut)
    assert result.ok and len(result.records) == 4 and result.rows == 200
    assert sorted(r.first_row for r in result.records) == [0, 50, 100, 150]
    again = _published(cut.output_root)
    assert again["id"].to_list() == whole["id"].to_list() == list(range(200))
    np.testing.assert_allclose(np.asarray(again["embedding"].to_list()),
                               np.asarray(whole["embedding"].to_list()), rtol=0, atol=1e-5)
    meta = pq.read_schema(sorted(cut.output_root.glob("run_date=*/*.parquet"))[0]).metadata
    assert '"first_row": ' in meta[b"lepton_batch"].decode()


def test_incremental_night_over_row_ranges_computes_only_the_changed_row(tmp_path, tiny_bert):
    from lepton_batch.run.lifecycle import run_job

    (tmp_path / "in").mkdir()
    table = _one_group_file(tmp_path / "in" / "big.parquet", 200)
    first = _big_group_job(tmp_path, tiny_bert, rows_per_shard=50, mode="incremental")
    assert len(first.shards) == 4 and run_job(first).ok
    texts = table["text"].to_pylist()
    texts[120] = "changed overnight"
    pq.write_table(table.set_column(1, "text", pa.array(texts)), tmp_path / "in" / "big.parquet",
                   row_group_size=200)
    second = _big_group_job(tmp_path, tiny_bert, rows_per_shard=50, mode="incremental")
    rows = second.row_plan()
    assert rows.unchanged == 199 and list(rows.rows.values()) == [[20]]  # shard 2, row 20
    assert [s.index for s in second.shards if s.fingerprint in rows.rows] == [2]
    result = run_job(second)
    assert result.ok and result.rows == 1
    (record,) = result.records
    (part,) = second.output_root.glob(f"run_date=*/part-{record.shard_fingerprint}-*.parquet")
    new = pq.read_table(part)
    assert new["id"].to_pylist() == [120] and record.first_row == 100


def test_a_large_group_staged_whole_by_a_failed_run_is_kept(tmp_path, tiny_bert):
    """An unfinished run of an earlier version staged the group as one shard: the rerun
    (rows_per_shard unchanged, so the same job) publishes it instead of cutting it."""
    from lepton_batch.job.shards import describe_shards
    from lepton_batch.run.lifecycle import run_job

    (tmp_path / "in").mkdir()
    _one_group_file(tmp_path / "in" / "a.parquet", 120)
    (tmp_path / "in" / "b.parquet").write_bytes(b"not parquet")
    failed = run_job(_big_group_job(tmp_path, tiny_bert, rows_per_shard=1000))
    assert not failed.ok and len(failed.records) == 1  # a.parquet's group, staged whole
    (tmp_path / "in" / "b.parquet").unlink()
    plan = _big_group_job(tmp_path, tiny_bert, rows_per_shard=50)
    assert describe_shards(plan.shards, 50) == (
        "1 (≤ 50 rows each; 1 row group of 120 rows kept whole: computed as one shard already)")
    result = run_job(plan)
    assert result.ok and result.skipped == 1 and result.published
    assert _published(plan.output_root)["id"].to_list() == list(range(120))
