"""Input discovery, shard planning, fingerprints and column checks (footers only)."""

from __future__ import annotations

import os

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lepton_batch.shards import check_columns, describe_files, find_files, plan_shards, read_shard


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


def test_row_group_larger_than_shard_is_its_own_shard(corpus):
    folder, _ = corpus
    shards = plan_shards(describe_files(str(folder / "corpus-0.parquet"))[0], rows_per_shard=3)
    assert [s.num_rows for s in shards] == [10, 10, 10, 10, 5]
    assert [s.first_row for s in shards] == [0, 10, 20, 30, 40]


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
    from lepton_batch.shards import redact

    assert redact("https://alice:s3cr3t@example.com/x.parquet") == "https://***@example.com/x.parquet"
    assert redact("s3://bucket/key.parquet") == "s3://bucket/key.parquet"
    assert redact("/data/in/x.parquet") == "/data/in/x.parquet"
