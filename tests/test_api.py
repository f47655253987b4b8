"""The Python face (lepton_batch.submit / validate / read, lepton_batch/api/): the same
rows as the CLI, each typed exception, and an import of the package that stays light."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading

import polars as pl
import pytest
from conftest import REPO, invoke_cli, write_corpus, write_job

import lepton_batch
from lepton_batch.faults import DELAY_ENV
from lepton_batch.output.dataset import init_output
from lepton_batch.output.lock import output_lock


def _sections(tmp_path, model_dir, **output) -> dict:
    return {
        "name": "api-job",
        "input": {"path": str(tmp_path / "in"), "passthrough_columns": ["lang"],
                  "rows_per_shard": 20},
        "model": {"path": str(model_dir), "max_length": 48, "dtype": "float32"},
        "task": {"kind": "embed"},
        "engine": {"max_tokens_per_batch": 256, "max_rows_per_batch": 16},
        "output": {"path": str(tmp_path / "out"), **output},
        "cluster": {"processes": False, "n_workers": 1, "dashboard_address": "127.0.0.1:0"},
    }


def _rows(root) -> pl.DataFrame:
    return lepton_batch.read(root).drop("run_id", "run_date").collect().sort("id")


def test_submit_from_python_equals_the_cli_row_for_row(tmp_path, tiny_bert, corpus):
    job = write_job(tmp_path / "job.yaml", **_sections(tmp_path, tiny_bert))
    result = lepton_batch.submit(job)
    assert isinstance(result, lepton_batch.RunResult)
    assert result.ok and result.published and result.output == str(tmp_path / "out")
    assert (result.shards_run, result.skipped, result.shards_failed) == (9, 0, 0)
    assert result.rows == 135 and result.error_rows == 9 and result.tokens > 0
    assert result.rows_per_second > 0 and result.report_path.endswith("report.html")

    code, out = invoke_cli("submit", job, "--set", f"output.path={tmp_path / 'cli'}")
    assert code == 0, out
    ours, theirs = _rows(tmp_path / "out"), _rows(tmp_path / "cli")
    assert ours.height == theirs.height == 135
    assert ours.equals(theirs)  # embeddings compared exactly, every column, every row

    # a dict job with --set overrides, and a resume: nothing left to run
    again = lepton_batch.submit(_sections(tmp_path, tiny_bert), set=["task.kind=embed"])
    assert (again.shards_run, again.skipped, again.rows) == (0, 9, 0)
    with pytest.raises(lepton_batch.JobError, match="error_if_exists"):  # a bad output
        lepton_batch.submit(job, set=["output.mode=error_if_exists"])

    # a Delta table of the same job reads back as the same rows
    pytest.importorskip("deltalake")
    delta = lepton_batch.submit(job, set=["output.format=delta",
                                          f"output.path={tmp_path / 'delta'}"])
    assert delta.published and _rows(tmp_path / "delta").height == 135
    for column in ("id", "embedding", "error"):
        assert _rows(tmp_path / "delta")[column].to_list() == ours[column].to_list()


def test_validate_plans_without_running(tmp_path, tiny_bert, corpus):
    plan = lepton_batch.validate(_sections(tmp_path, tiny_bert), run_date="2026-03-01")
    assert len(plan.shards) == 9 and plan.rows == 135 and "embedding" in plan.schema.names
    assert plan.run_date.isoformat() == "2026-03-01"
    assert not (tmp_path / "out").exists()
    spec = plan.job  # a JobSpec, with overrides validated again as a file's would be
    assert len(lepton_batch.validate(spec, set=["input.rows_per_shard=45"]).shards) == 3
    with pytest.raises(lepton_batch.JobError, match="input.rows_per_shard"):
        lepton_batch.validate(spec, set=["input.rows_per_shard=-1"])


def test_a_bad_field_is_a_job_error_naming_it(tmp_path, tiny_bert, corpus):
    with pytest.raises(lepton_batch.JobError) as caught:
        lepton_batch.submit(_sections(tmp_path, tiny_bert),
                            set=["engine.max_rows_per_batch=0", "task.kind=embedd"])
    assert sorted(caught.value.fields) == ["engine.max_rows_per_batch", "task.kind"]
    assert isinstance(caught.value, ValueError)  # a JobSpecError, as load_job raises
    with pytest.raises(lepton_batch.JobError, match="run_date: 'March' is not a date"):
        lepton_batch.validate(_sections(tmp_path, tiny_bert), run_date="March")
    job = write_job(tmp_path / "job.yaml", **{**_sections(tmp_path, tiny_bert), "nmae": "x"})
    with pytest.raises(lepton_batch.JobError, match="did you mean 'name'"):
        lepton_batch.validate(job)


def test_progress_plain_prints_a_line_per_shard(tmp_path, tiny_bert, corpus, capsys):
    quiet = lepton_batch.submit(_sections(tmp_path, tiny_bert))  # default: prints nothing
    assert quiet.shards_run == 9 and "progress:" not in capsys.readouterr().out
    result = lepton_batch.submit(_sections(tmp_path, tiny_bert), progress="plain",
                                 set=["output.mode=overwrite"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("progress:")]
    assert result.shards_run == 9 and len(lines) >= 9, lines
    assert lines[-1].startswith("progress: shards 9/9 | rows 135/135"), lines[-1]
    with pytest.raises(lepton_batch.JobError, match="progress: 'loud' is not one of"):
        lepton_batch.submit(_sections(tmp_path, tiny_bert), progress="loud")


def test_an_output_in_use_names_its_holder(tmp_path, tiny_bert, corpus):
    root = tmp_path / "out"
    init_output(root)
    with (output_lock(root, "20261126T000000-abcdef"),
          pytest.raises(lepton_batch.OutputInUse) as caught):
        lepton_batch.submit(_sections(tmp_path, tiny_bert))
    assert caught.value.holder["run_id"] == "20261126T000000-abcdef"
    assert caught.value.holder["pid"] == os.getpid()
    assert "is being written by another lepton-batch run" in str(caught.value)
    assert not list(root.glob("run_date=*"))


def test_a_failed_input_is_run_failed_with_finished_shards_kept(tmp_path, tiny_bert, corpus):
    victim = tmp_path / "in" / "corpus-1.parquet"
    good = victim.read_bytes()
    victim.write_bytes(b"this is not parquet")
    with pytest.raises(lepton_batch.RunFailed) as caught:
        lepton_batch.submit(_sections(tmp_path, tiny_bert))
    failed = caught.value
    assert list(failed.failures) == [f"input {victim}"]
    assert "not a readable Parquet file" in failed.failures[f"input {victim}"]
    assert failed.result.shards_run == 6 and not failed.result.published
    assert not (tmp_path / "out" / "_SUCCESS").exists()

    victim.write_bytes(good)
    result = lepton_batch.submit(_sections(tmp_path, tiny_bert))
    assert (result.shards_run, result.skipped, result.published) == (3, 6, True)


def test_ctrl_c_is_interrupted_and_resumable(tmp_path, tiny_bert, corpus, monkeypatch):
    monkeypatch.setenv(DELAY_ENV, "locked:5")  # the run sits holding the lock
    timer = threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(lepton_batch.Interrupted) as caught:
            lepton_batch.submit(_sections(tmp_path, tiny_bert))
    finally:
        timer.cancel()
    assert (caught.value.signal, caught.value.exit_code) == ("SIGINT", 130)
    assert isinstance(caught.value, KeyboardInterrupt)
    monkeypatch.delenv(DELAY_ENV)
    assert lepton_batch.submit(_sections(tmp_path, tiny_bert)).published  # lock released


def test_read_latest_on_an_incremental_output(tmp_path, tiny_bert, corpus):
    job = _sections(tmp_path, tiny_bert, mode="incremental")
    lepton_batch.submit(job, run_date="2026-03-01")
    corpus_dir = tmp_path / "in"
    shutil.rmtree(corpus_dir)
    rows = write_corpus(corpus_dir, n_files=3, rows=45, bad=False)  # the bad rows get text
    second = lepton_batch.submit(job, run_date="2026-03-02")
    assert second.published
    every = lepton_batch.read(tmp_path / "out").collect()
    latest = lepton_batch.read(tmp_path / "out", latest=True).collect()
    assert latest.height == len(rows) == latest["id"].n_unique()
    assert every.height > latest.height
    changed = latest.filter(pl.col("run_date") == pl.date(2026, 3, 2))["id"].to_list()
    assert {3, 7, 12} <= set(changed)  # the rows that were bad the first night
    assert latest.filter(pl.col("error").is_not_null()).height == 0


def test_reading_what_is_not_an_output_says_so(tmp_path):
    with pytest.raises(ValueError, match="holds no lepton-batch output"):
        lepton_batch.read(tmp_path)


def test_import_lepton_batch_stays_light():
    code = ("import sys, lepton_batch\n"
            "heavy = {'torch', 'dask', 'distributed', 'polars', 'transformers'}\n"
            "assert not heavy & set(sys.modules), heavy & set(sys.modules)\n"
            "assert callable(lepton_batch.submit) and 'submit' in dir(lepton_batch)\n"
            "assert 'dask' not in sys.modules  # the API itself waits for a run\n"
            "print(sorted(lepton_batch.__all__))")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "RunFailed" in res.stdout
