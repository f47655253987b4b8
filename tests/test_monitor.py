"""Monitoring: the Dask span and stage meters, Prometheus metrics on /metrics, progress
modes, and the run report's figures (they must match the output)."""

from __future__ import annotations

import json
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import polars as pl
import pytest
from conftest import write_corpus, write_job
from typer.testing import CliRunner

from lepton_batch.cli.app import app
from lepton_batch.output.readers import latest_report
from lepton_batch.run.monitor import MetricTotals, PrometheusCollector
from lepton_batch.run.progress import PADDING_MIN_ROWS, RunProgress, describe, padding_headline

STAGES = {"read", "prepare", "warm_up", "load", "tokenize", "compute", "write"}


def _job(tmp_path: Path, model: Path, corpus: Path, **cluster) -> Path:
    return write_job(
        tmp_path / "job.yaml",
        name="watch-me",
        input={"path": str(corpus), "rows_per_shard": 20},
        model={"path": str(model), "max_length": 48, "dtype": "float32"},
        task={"kind": "embed"},
        engine={"max_tokens_per_batch": 256},
        output={"path": str(tmp_path / "out")},
        cluster={"processes": False, "dashboard_address": "127.0.0.1:0", "retries": 0,
                 **cluster},
    )


def _output(root: Path) -> pl.DataFrame:
    return pl.read_parquet(sorted(root.glob("run_date=*/*.parquet")))


def _report(root: Path) -> tuple[Path, dict]:
    (folder,) = (root / "_runs").iterdir()
    return folder, json.loads((folder / "report.json").read_text())


def _poll(fetch, ok, seconds: float = 30.0):
    """``fetch()`` until ``ok(value)`` (worker metrics reach the scheduler on heartbeats)."""
    deadline = time.monotonic() + seconds
    while True:
        value = fetch()
        if ok(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.25)


def test_existing_cluster_gets_span_meters_task_keys_and_metrics(tmp_path, tiny_bert):
    from dask.distributed import Client, LocalCluster

    corpus = tmp_path / "in"
    write_corpus(corpus)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        job = _job(tmp_path, tiny_bert, corpus, address=cluster.scheduler_address)
        res = CliRunner().invoke(app, ["submit", str(job), "--progress", "rich"])
        assert res.exit_code == 0, res.output
        assert f"cluster: {cluster.scheduler_address}" in res.output
        assert "ETA 0:00:00" in res.output and "shards 9/9" in res.output
        out = _output(tmp_path / "out")

        # Prometheus, on the scheduler's own /metrics, over loopback
        port = cluster.scheduler.http_server.port
        url = f"http://127.0.0.1:{port}/metrics"
        text = _poll(lambda: urllib.request.urlopen(url, timeout=10).read().decode(),
                     lambda t: 'lepton_batch_shards_done_total{job="watch-me"} 9.0' in t)
        assert f'lepton_batch_rows_total{{job="watch-me"}} {float(out.height)}' in text
        errors = out["error"].is_not_null().sum()
        assert f'lepton_batch_error_rows_total{{job="watch-me"}} {float(errors)}' in text
        assert 'lepton_batch_shards_done_total{job="watch-me"} 9.0' in text
        assert 'lepton_batch_shards_failed_total{job="watch-me"} 0.0' in text
        for name in ("tokens_total", "padded_tokens_total", "tokens_per_second",
                     "padding_efficiency", "shards_planned"):
            assert f"lepton_batch_{name}{{" in text, name

        # one span named after the job; our stage meters inside it; readable task keys
        def span_metrics(dask_scheduler):
            spans = dask_scheduler.extensions["spans"]
            found = [s for s in spans.spans.values() if s.name == ("watch-me",)]
            return [len(found), sorted({str(k) for s in found
                                        for k in s.cumulative_worker_metrics}),
                    sorted(dask_scheduler.task_prefixes)]

        n, keys, prefixes = _poll(lambda: client.run_on_scheduler(span_metrics),
                                  lambda v: all(f"'{s}'" in " ".join(v[1]) for s in STAGES))
        assert n == 1
        for stage in STAGES:
            assert any(f"'{stage}'" in k and "embed-watch-me-shard" in k for k in keys), \
                (stage, keys)
        assert "embed-watch-me-shard" in prefixes


def test_report_holds_the_run_figures(tmp_path, tiny_bert):
    corpus = tmp_path / "in"
    write_corpus(corpus)
    job = _job(tmp_path, tiny_bert, corpus)
    res = CliRunner().invoke(app, ["submit", str(job), "--progress", "plain"])
    assert res.exit_code == 0, res.output
    root = tmp_path / "out"
    out = _output(root)
    folder, report = _report(root)
    assert (folder / "report.html").is_file()
    assert (folder / "dask-report.html").is_file()
    assert f"run report: {folder / 'report.html'}" in res.output.replace("\n", "")
    # plain progress: a line per shard, the last one complete
    lines = [ln for ln in res.output.splitlines() if ln.startswith("progress: ")]
    assert len(lines) >= 9
    assert "shards 9/9" in lines[-1] and f"rows {out.height}/{out.height}" in lines[-1]

    assert report["rows"] == out.height == sum(s["rows"] for s in report["shards"])
    errors = out["error"].drop_nulls()
    assert report["error_rows"] == errors.len() == sum(report["errors_by_message"].values())
    assert report["errors_by_message"] == {m: n for m, n in
                                           errors.value_counts().iter_rows()}
    ran = out.filter(pl.col("error").is_null())
    assert report["tokens"] == ran["num_tokens"].sum()
    hist = report["length_histogram"]
    assert sum(hist["counts"]) == ran.height
    assert hist["bin_width"] * len(hist["counts"]) >= 48
    edges = report["batch_rows_histogram"]["edges"]
    assert sum(report["batch_rows_histogram"]["counts"]) == sum(s["batches"] for s in
                                                                report["shards"])
    assert edges[:4] == [1, 2, 4, 8]
    assert set(report["stages"]) == STAGES
    assert all(set(s["stages"]) == STAGES for s in report["shards"])
    assert report["engines"] and report["model"]["type"] == "bert"
    samples = report["throughput"]
    assert samples[-1]["rows"] == out.height and samples[-1]["tokens"] == report["tokens"]
    assert [s["t"] for s in samples] == sorted(s["t"] for s in samples)

    # status shows the report; --report-only writes it again from report.json
    res = CliRunner().invoke(app, ["status", str(root)])
    assert res.exit_code == 0, res.output
    assert "latest report" in res.output
    assert latest_report(root) == folder / "report.html"
    res = CliRunner().invoke(app, ["status", str(job)])
    assert res.exit_code == 0 and "latest report" in res.output, res.output
    (folder / "report.html").unlink()
    res = CliRunner().invoke(app, ["submit", str(job), "--report-only", "latest"])
    assert res.exit_code == 0, res.output
    assert (folder / "report.html").is_file()
    res = CliRunner().invoke(app, ["submit", str(job), "--report-only", "20990101T0000"])
    assert res.exit_code == 2 and "no report for run" in res.output


def test_metric_totals_count_retried_attempts_once_per_increase():
    totals = MetricTotals()
    base = {"kind": "shard", "job": "j", "run": "r", "shard": 0}
    totals.add({"kind": "run", "job": "j", "run": "r", "shards": 2, "rows": 30}, now=0)
    totals.add(base | {"attempt": "a", "rows": 5, "tokens": 50, "padded": 60, "errors": 0,
                       "done": False}, now=1)
    totals.add(base | {"attempt": "a", "rows": 8, "tokens": 80, "padded": 90, "errors": 0,
                       "done": False}, now=2)
    # the attempt dies; the retry starts from zero and finishes
    totals.add(base | {"attempt": "b", "rows": 10, "tokens": 100, "padded": 110, "errors": 1,
                       "done": True}, now=3)
    totals.add({"kind": "failed", "job": "j", "run": "r", "shard": "k"}, now=4)
    c = totals.counts["j"]
    assert (c["rows"], c["tokens"], c["padded"], c["errors"]) == (18, 180, 200, 1)
    assert (c["shards_done"], c["shards_failed"]) == (1, 1)
    assert totals.running["j"] == {"a"}  # the dead attempt never said done
    rows_s, tokens_s = totals.rates("j", now=4)  # 4 s since the run started
    assert rows_s == pytest.approx(18 / 4) and tokens_s == pytest.approx(180 / 4)
    names = {m.name for m in PrometheusCollector(totals).collect()}
    assert {"lepton_batch_rows", "lepton_batch_shards_failed", "lepton_batch_tokens_per_second"
            } <= names  # prometheus_client adds _total to counters when it serves them


def test_prometheus_rates_early_in_a_run_divide_by_the_time_it_ran():
    """Issue 28, bug 7: 8 s into a run at 150 rows/s the gauge read 1,200 / 30 s = 40."""
    totals = MetricTotals()
    t0 = time.monotonic() - 8.0  # the run started 8 s ago

    def event(second: int) -> None:
        totals.add({"kind": "shard", "job": "j", "run": "r", "shard": 0, "attempt": "a",
                    "rows": 150 * second, "tokens": 3000 * second, "padded": 3000 * second,
                    "errors": 0, "done": False}, now=t0 + second)

    totals.add({"kind": "run", "job": "j", "run": "r", "shards": 1, "rows": 9000}, now=t0)
    for second in range(1, 9):  # one cumulative event per second: 150 rows, 3,000 tokens
        event(second)
    assert totals.rates("j", now=t0 + 8) == pytest.approx((150.0, 3000.0))
    gauges = {m.name: m.samples[0].value for m in PrometheusCollector(totals).collect()
              if m.name.endswith("_per_second")}  # what /metrics serves now
    assert gauges["lepton_batch_rows_per_second"] == pytest.approx(150.0, rel=0.2)
    for second in range(9, 39):  # past the window: the last 30 s only
        event(second)
    assert totals.rates("j", now=t0 + 38) == pytest.approx((150.0, 3000.0))
    # the job's next run on the same cluster, 2 s later: measured from its own start, not
    # with the previous run's last 30 s
    totals.add({"kind": "run", "job": "j", "run": "r2", "shards": 1, "rows": 20}, now=t0 + 40)
    totals.add({"kind": "shard", "job": "j", "run": "r2", "shard": 0, "attempt": "b",
                "rows": 20, "tokens": 400, "padded": 400, "errors": 0, "done": True},
               now=t0 + 42)
    assert totals.rates("j", now=t0 + 44) == pytest.approx((20 / 4, 400 / 4))


def test_progress_eta_counts_live_rows_and_records():
    from lepton_batch.output.manifest import ShardRecord

    progress = RunProgress({0: (10, 100), 1: (10, 300)}, shards_total=3, skipped=1)
    progress.event({"kind": "shard", "shard": 1, "rows": 5, "tokens": 150, "padded": 160})
    s = progress.snapshot()
    assert s.fraction == pytest.approx(150 / 400)
    assert (s.shards_done, s.rows, s.tokens) == (1, 5, 150)
    record = ShardRecord(shard_index=1, shard_fingerprint="f", job_fingerprint="j",
                         run_id="r", source="s", row_groups=[0], part="p", rows=10,
                         error_rows=2, truncated_rows=0, tokens=290, padded_tokens=300,
                         batches=3, seconds=1.0, model_load_seconds=0.0, worker="w",
                         finished_at="t")
    progress.record(record)
    progress.event({"kind": "shard", "shard": 1, "rows": 10, "tokens": 290, "padded": 300,
                    "done": True})  # arrives after the record: ignored
    s = progress.snapshot()
    assert s.fraction == pytest.approx(300 / 400)
    assert (s.shards_done, s.rows, s.tokens, s.errors) == (2, 10, 290, 2)
    assert s.eta is not None and s.eta >= 0
    line = describe(s)
    assert "shards 2/3" in line and "rows 10/20" in line and "errors 2" in line
    assert "ETA" in line
    # issue 28: a 20-row run's padding is one batch's length spread, not headlined; from
    # PADDING_MIN_ROWS rows on it is
    assert "padding" not in line
    assert "padding eff. 96.7%" in describe(replace(s, rows_total=PADDING_MIN_ROWS))
    assert padding_headline(8, 290, 300) == ""  # the summary's, likewise
    assert padding_headline(PADDING_MIN_ROWS, 290, 300) == ", padding efficiency 96.7%"


def test_bad_progress_mode_is_refused_before_anything_runs(tmp_path, tiny_bert):
    corpus = tmp_path / "in"
    write_corpus(corpus)
    res = CliRunner().invoke(app, ["submit", str(_job(tmp_path, tiny_bert, corpus)),
                                   "--progress", "fancy"])
    assert res.exit_code == 2 and "--progress" in res.output
    assert not (tmp_path / "out").exists()


def test_dashboard_server_tracebacks_stay_out_of_the_console():
    import logging

    from lepton_batch.cli.common import setup_logging as _setup_logging

    _setup_logging(verbose=False)
    # Dask sets tornado.application to ERROR; a tab closed mid-load logs a traceback there
    for name in ("tornado.application", "tornado.access", "bokeh.server.views.ws"):
        assert logging.getLogger(name).getEffectiveLevel() > logging.ERROR, name
    assert logging.getLogger("lepton_batch.run.lifecycle").getEffectiveLevel() == logging.WARNING
