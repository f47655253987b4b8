"""Outputs on an object store: a real S3-protocol server (moto's server mode) on
127.0.0.1, reached through s3fs like any bucket. Same publish, resume, incremental and
one-writer guarantees as a local directory; credentials never written or printed."""

from __future__ import annotations

import json
import time

import polars as pl
import pytest
from conftest import write_corpus, write_job
from typer.testing import CliRunner

from lepton_batch.cli.app import app
from lepton_batch.output.manifest import write_atomic
from lepton_batch.store import remote_root

moto_server = pytest.importorskip("moto.server")
pytest.importorskip("s3fs")
SECRET = "s3cr3t-never-written-anywhere"
ROWS = 90  # write_corpus(n_files=2): 2 x 45 rows, 6 of them bad on purpose


@pytest.fixture(scope="module")
def s3():
    """An S3 endpoint on 127.0.0.1 with an empty bucket ``lake``; yields storage options."""
    import boto3

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="lepton",
                 aws_secret_access_key=SECRET, region_name="us-east-1").create_bucket(
        Bucket="lake")
    yield {"key": "lepton", "secret": SECRET,
           "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    server.stop()


def _job(tmp_path, model, options, prefix, **output):
    return str(write_job(
        tmp_path / "job.yaml",
        name="s3-job",
        input={"path": str(tmp_path / "in"), "rows_per_shard": 20},
        model={"path": str(model), "max_length": 48, "dtype": "float32"},
        task={"kind": "embed"},
        engine={"max_tokens_per_batch": 256},
        output={"path": f"s3://lake/{prefix}", "storage_options": options, **output},
        cluster={"processes": False, "dashboard_address": "127.0.0.1:0"},
    ))


def _submit(*args):
    res = CliRunner().invoke(app, ["submit", *args], env={"COLUMNS": "200"})
    return res


def _objects(options, prefix) -> dict[str, bytes]:
    root = remote_root(f"s3://lake/{prefix}", options)
    return {p.removeprefix(f"lake/{prefix}/"): root.fs.cat_file(p)
            for p in root.fs.find(root.path)}


def test_submit_to_s3_publishes_resumes_and_never_writes_the_secret(tmp_path, tiny_bert, s3):
    write_corpus(tmp_path / "in", n_files=2)
    job = _job(tmp_path, tiny_bert, s3, "embed")
    first = _submit(job)
    assert first.exit_code == 0, first.output
    objects = _objects(s3, "embed")
    parts = sorted(k for k in objects if k.startswith("run_date=") and k.endswith(".parquet"))
    assert len(parts) == 6 and "_SUCCESS" in objects and "_schema.json" in objects
    assert not any(k.startswith(("_staging", "_publish")) for k in objects)
    assert all(SECRET.encode() not in blob for blob in objects.values())
    assert SECRET not in first.output

    # A warehouse reader (polars' own object-store client) sees one table.
    endpoint = s3["client_kwargs"]["endpoint_url"]
    df = pl.read_parquet("s3://lake/embed/run_date=*/*.parquet", hive_partitioning=True,
                         storage_options={"aws_access_key_id": "lepton",
                                          "aws_secret_access_key": SECRET,
                                          "aws_endpoint_url": endpoint,
                                          "aws_region": "us-east-1", "aws_allow_http": "true"})
    assert df.height == ROWS and df["id"].n_unique() == ROWS
    assert df["error"].null_count() == ROWS - 6

    again = _submit(job)
    assert again.exit_code == 0 and "nothing to run" in again.output, again.output
    data = {k for k in _objects(s3, "embed") if not k.startswith("_runs/")}
    assert data == {k for k in objects if not k.startswith("_runs/")}


def test_incremental_on_s3_computes_only_changed_rows(tmp_path, tiny_bert, s3):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_corpus(tmp_path / "in", n_files=2)
    job = _job(tmp_path, tiny_bert, s3, "nightly", mode="incremental")
    assert _submit(job, "--run-date", "2026-03-01").exit_code == 0
    path = tmp_path / "in" / "corpus-0.parquet"
    rows = pq.read_table(path).to_pylist()
    rows[0]["text"] = "a changed text"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=10)
    res = _submit(job, "--run-date", "2026-03-02")
    assert res.exit_code == 0, res.output
    assert f"{ROWS - 1:,} unchanged, 1 to compute" in res.output
    night2 = [k for k in _objects(s3, "nightly") if k.startswith("run_date=2026-03-02/")]
    assert len(night2) == 1
    # The summary and status read the current rows (newest per id) from the bucket too.
    assert "first 5 current rows" in res.output and "warning" not in res.output, res.output
    status = CliRunner().invoke(app, ["status", job], env={"COLUMNS": "200"})
    assert status.exit_code == 0, status.output
    assert f"{ROWS:,} / {ROWS:,}: the next submit computes none" in status.output


def test_second_writer_is_refused_while_the_lease_is_live(tmp_path, tiny_bert, s3):
    write_corpus(tmp_path / "in", n_files=1)
    job = _job(tmp_path, tiny_bert, s3, "leased")
    root = remote_root("s3://lake/leased", s3)
    root.mkdir()
    (root / "_lepton_batch.json").write_text("{}")
    holder = {"host": "elsewhere", "pid": 1, "run_id": "r1", "since": "now",
              "lease_until": time.time() + 60}
    (root / "_lock").write_text(json.dumps(holder))
    res = _submit(job)
    assert res.exit_code == 2 and "being written by another lepton-batch run" in res.output
    holder["lease_until"] = time.time() - 1  # a holder that died: its lease lapsed
    (root / "_lock").write_text(json.dumps(holder))
    assert _submit(job).exit_code == 0
    assert not (root / "_lock").exists()


def test_a_failed_upload_leaves_no_object(s3):
    path = remote_root("s3://lake/atomic", s3) / "part.parquet"

    def half(fh):
        fh.write(b"x" * (6 << 20))  # over s3fs's 5 MiB block: a multipart upload has begun
        raise OSError("connection reset mid-upload")

    with pytest.raises(OSError, match="mid-upload"):
        write_atomic(path, half)
    assert not path.exists()
    write_atomic(path, lambda fh: fh.write(b"whole"))
    assert path.read_bytes() == b"whole"
