"""Faults a nightly job meets, each driven through the CLI in a subprocess where a process
dies: the driver SIGKILLed at named points all over a run, a worker killed mid-shard, a
corrupt input file, a full disk, a second writer. After each, rerunning the same command
must give the dataset an uninterrupted run gives: same ids, same values, 0 rows lost, 0
twice, and no temp file where readers look.

Kill points are ``lepton_batch.faults.checkpoint`` names: the process SIGKILLs itself there
when ``LEPTON_BATCH_FAULT`` names the point.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import built_once, write_corpus, write_job
from typer.testing import CliRunner

from lepton_batch.faults import FAULT_ENV, ONCE_ENV
from lepton_batch.job.spec import JobSpecError, load_job
from lepton_batch.output.dataset import init_output
from lepton_batch.output.lock import output_lock
from lepton_batch.plan.build import make_plan
from lepton_batch.run.lifecycle import run_job

pytestmark = pytest.mark.slow
ROWS = 135  # write_corpus: 3 files x 45 rows, 9 of them bad on purpose
KILLED = -signal.SIGKILL

# Spread over a run: start-up, mid-shard, mid-write, between part and record, after some
# records reached the driver, and every step of the publish.
KILL_POINTS = [
    "locked",                   # lock taken, nothing else yet (start-up)
    "prepared",                 # staging prepared, cluster not started
    "cluster-started",
    "shard-computed@2",         # second shard computed, not written
    "write-before-rename@5",    # mid-write: a temp part file on disk, not renamed
    "part-written@3",           # part renamed into staging, its record not written
    "shard-recorded@5",         # five records back at the driver
    "publish-journaled",        # journal written, nothing moved
    "publish-moved@4",          # four of nine parts moved into place
    "publish-before-success",   # parts in place, old ones deleted, no _SUCCESS
    "success-written",          # _SUCCESS written, staging and journal not yet removed
    "published",                # published, run report not written
]


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The CLI in its own process: for a run that is killed, or that must start clean."""
    full_env = {**os.environ, "COLUMNS": "250", **(env or {})}
    return subprocess.run([sys.executable, "-m", "lepton_batch", *args], capture_output=True,
                          text=True, timeout=240, env=full_env)


def _here(*args: str) -> subprocess.CompletedProcess:
    """The CLI in this process, for the step after a kill: the same command and output, without
    a second interpreter importing torch (seconds of CPU per call, ~40 calls here)."""
    from lepton_batch.cli.app import app

    res = CliRunner().invoke(app, list(args), env={"COLUMNS": "250"})
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return subprocess.CompletedProcess(args, res.exit_code, res.stdout, "")


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "fault-corpus", lambda f: write_corpus(f / "in")) / "in"


def _job(tmp_path: Path, model: Path, corpus: Path, processes: bool = False, **output) -> Path:
    return write_job(
        tmp_path / "job.yaml",
        name="fault-job",
        input={"path": str(corpus), "rows_per_shard": 20},
        model={"path": str(model), "max_length": 48, "dtype": "float32"},
        task={"kind": "embed", "normalize": True},
        engine={"max_tokens_per_batch": 256},
        output={"path": str(tmp_path / "out"), **output},
        cluster={"processes": processes, "dashboard_address": "127.0.0.1:0", "retries": 0},
    )


def _dataset(root: Path) -> pl.DataFrame:
    """What a reader sees: every published part, as one table sorted by id."""
    visible = sorted(root.glob("run_date=*/*"))
    assert all(p.suffix == ".parquet" and not p.name.startswith(".") for p in visible), visible
    return pl.read_parquet(visible).sort("id") if visible else pl.DataFrame()


def _assert_same(df: pl.DataFrame, ref: pl.DataFrame) -> None:
    assert df.height == ref.height == ROWS
    assert df["id"].n_unique() == df.height  # 0 rows twice
    assert df["id"].to_list() == ref["id"].to_list()  # 0 rows lost
    assert df["error"].to_list() == ref["error"].to_list()
    ok = df["error"].is_null()
    got = np.asarray(df.filter(ok)["embedding"].to_list(), dtype=np.float32)
    want = np.asarray(ref.filter(ok)["embedding"].to_list(), dtype=np.float32)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_bert, corpus_dir) -> pl.DataFrame:
    """The dataset of one uninterrupted run (one per test run: xdist workers share it)."""
    def run(tmp: Path) -> None:
        res = _cli("submit", str(_job(tmp, tiny_bert, corpus_dir)))
        assert res.returncode == 0, res.stdout + res.stderr

    return _dataset(built_once(tmp_path_factory, "fault-reference", run) / "out")


@pytest.mark.parametrize("point", KILL_POINTS)
def test_driver_killed_then_same_command_finishes(point, tmp_path, tiny_bert, corpus_dir,
                                                  reference):
    job = str(_job(tmp_path, tiny_bert, corpus_dir))
    root = tmp_path / "out"
    killed = _cli("submit", job, env={FAULT_ENV: point})
    assert killed.returncode == KILLED, killed.stdout + killed.stderr
    before = _dataset(root)  # readable, no temp files
    assert before.height in (0, ROWS) or point.startswith("publish-")
    if point == "locked":  # the dead run's name stays in the lock file; it must not block
        holder = json.loads((root / "_lock").read_text())
        assert not psutil.pid_exists(holder["pid"])

    again = _here("submit", job)
    assert again.returncode == 0, again.stdout + again.stderr
    assert (root / "_SUCCESS").is_file() and not (root / "_publish.json").exists()
    assert not (root / "_staging").exists()
    _assert_same(_dataset(root), reference)


@pytest.fixture(scope="module")
def one_group_dir(tmp_path_factory, corpus_dir) -> Path:
    """The same 135 rows as ONE file of ONE row group (as pandas and pyarrow write)."""
    def build(folder: Path) -> None:
        table = pa.concat_tables(pq.read_table(f) for f in sorted(corpus_dir.glob("*.parquet")))
        (folder / "in").mkdir()
        pq.write_table(table, folder / "in" / "one-group.parquet", row_group_size=ROWS)

    return built_once(tmp_path_factory, "fault-one-group", build) / "in"


def test_driver_killed_inside_one_large_row_group_resumes_by_row_range(
        tmp_path, tiny_bert, one_group_dir, reference):
    job = str(_job(tmp_path, tiny_bert, one_group_dir))
    line = "7 (≤ 20 rows each; 1 row group of 135 rows cut into row ranges)"
    plan = _here("validate", job, "--no-estimate")
    assert line in " ".join(plan.stdout.split()), plan.stdout
    killed = _cli("submit", job, env={FAULT_ENV: "shard-recorded@3"})
    assert killed.returncode == KILLED, killed.stdout + killed.stderr
    assert line in " ".join(killed.stdout.split())
    staged = list((tmp_path / "out" / "_staging").glob("*/_manifest/*.json"))
    assert len(staged) >= 3

    again = _here("submit", job)
    out = " ".join(again.stdout.split())
    assert again.returncode == 0, out
    assert f"shards: {7 - len(staged)} run, {len(staged)} skipped, 0 failed" in out
    _assert_same(_dataset(tmp_path / "out"), reference)  # 0 rows lost, 0 twice
    firsts = sorted(json.loads(pq.read_schema(p).metadata[b"lepton_batch"])["first_row"]
                    for p in (tmp_path / "out").glob("run_date=*/*.parquet"))
    assert firsts == [0, 20, 40, 60, 80, 100, 120]


def test_killed_overwrite_leaves_the_old_dataset_readable(tmp_path, tiny_bert, corpus_dir,
                                                          reference):
    job = str(_job(tmp_path, tiny_bert, corpus_dir))
    root = tmp_path / "out"
    assert _here("submit", job).returncode == 0
    old = {p.name: p.read_bytes() for p in root.glob("run_date=*/*.parquet")}
    first_run = json.loads((root / "_SUCCESS").read_text())["run_id"]

    killed = _cli("submit", job, "--set", "output.mode=overwrite",
                  env={FAULT_ENV: "shard-recorded@4"})
    assert killed.returncode == KILLED
    # Readers still see the whole previous dataset, byte for byte, and its _SUCCESS.
    assert {p.name: p.read_bytes() for p in root.glob("run_date=*/*.parquet")} == old
    assert (root / "_SUCCESS").is_file()

    again = _here("submit", job, "--set", "output.mode=overwrite")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "4 shard(s) already done" in " ".join(again.stdout.split())  # resumed, not redone
    _assert_same(_dataset(root), reference)
    run_ids = {json.loads(pq.read_schema(p).metadata[b"lepton_batch"])["run_id"]
               for p in root.glob("run_date=*/*")}
    assert len(run_ids) == 2 and first_run not in run_ids  # all recomputed, by the two tries


def test_worker_killed_mid_shard_job_completes(tmp_path, tiny_bert, corpus_dir, reference):
    job = str(_job(tmp_path, tiny_bert, corpus_dir, processes=True))
    fired = tmp_path / "fault-fired"
    res = _cli("submit", job, env={FAULT_ENV: "shard-computed@2", ONCE_ENV: str(fired)})
    assert res.returncode == 0, res.stdout + res.stderr
    assert fired.exists()  # the worker really died mid-shard
    _assert_same(_dataset(tmp_path / "out"), reference)


def test_corrupt_file_among_good_ones(tmp_path, tiny_bert, corpus_dir, reference):
    corpus = tmp_path / "in"
    shutil.copytree(corpus_dir, corpus)
    victim = corpus / "corpus-1.parquet"
    good = victim.read_bytes()
    victim.write_bytes(b"this is not parquet")
    job = str(_job(tmp_path, tiny_bert, corpus))
    root = tmp_path / "out"

    res = _here("submit", job)
    out = " ".join(res.stdout.split())
    assert res.returncode == 1, out + res.stderr
    assert f"{victim}: not a readable Parquet file" in out and "not published" in out
    assert not (root / "_SUCCESS").exists() and _dataset(root).height == 0
    status = " ".join(_here("status", job).stdout.split())
    assert "6 shard(s)" in status  # the good files' shards are staged

    victim.write_bytes(good)
    res = _here("submit", job)
    out = " ".join(res.stdout.split())
    assert res.returncode == 0, out + res.stderr
    assert "shards: 3 run, 6 skipped, 0 failed" in out  # that file's shards only
    _assert_same(_dataset(root), reference)


def test_corrupt_row_group_names_file_and_group(tmp_path, tiny_bert, corpus_dir):
    corpus = tmp_path / "in"
    shutil.copytree(corpus_dir, corpus)
    victim = corpus / "corpus-2.parquet"
    chunk = pq.ParquetFile(victim).metadata.row_group(2).column(1)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    data = bytearray(victim.read_bytes())
    data[start : start + chunk.total_compressed_size] = b"\xab" * chunk.total_compressed_size
    victim.write_bytes(bytes(data))  # footer intact: planned, fails when read
    plan = make_plan(load_job(_job(tmp_path, tiny_bert, corpus)))
    result = run_job(plan)
    assert not result.ok and len(result.failures) == 1 and len(result.records) == 8
    (cause,) = result.failures.values()
    assert f"input file {victim}, row group 2" in cause
    assert not (plan.output_root / "_SUCCESS").exists()


def test_disk_full_leaves_nothing_half_written(tmp_path, tiny_bert, corpus_dir, monkeypatch,
                                               reference):
    plan = make_plan(load_job(_job(tmp_path, tiny_bert, corpus_dir)))
    root = plan.output_root
    assert run_job(plan).ok
    published = {p.name: p.read_bytes() for p in root.glob("run_date=*/*.parquet")}
    calls = {"n": 0}
    real_write = pq.write_table

    def full_disk(table, where, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            where.write(b"PAR1 half a file")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(table, where, **kwargs)

    monkeypatch.setattr(pq, "write_table", full_disk)
    overwrite = make_plan(load_job(_job(tmp_path, tiny_bert, corpus_dir, mode="overwrite")))
    result = run_job(overwrite)
    assert not result.ok and not result.published
    (cause,) = result.failures.values()
    assert "No space left on device" in cause
    assert not list(root.rglob("*.tmp-*"))  # the half-written temp file was removed
    # the published dataset is the previous one, untouched
    assert {p.name: p.read_bytes() for p in root.glob("run_date=*/*.parquet")} == published

    monkeypatch.setattr(pq, "write_table", real_write)
    again = run_job(overwrite)
    assert again.ok and again.skipped == 8 and len(again.records) == 1
    _assert_same(_dataset(root), reference)


def test_unwritable_output_is_a_clear_error(tmp_path, tiny_bert, corpus_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    job = _job(tmp_path, tiny_bert, corpus_dir)
    res = _here("validate", str(job), "--set", f"output.path={blocker / 'out'}")
    assert res.returncode == 2
    assert f"output.path: cannot create {blocker / 'out'}: {blocker} is a file" in " ".join(
        res.stdout.split())


def test_second_writer_is_refused_naming_the_holder(tmp_path, tiny_bert, corpus_dir):
    job = str(_job(tmp_path, tiny_bert, corpus_dir))
    root = tmp_path / "out"
    init_output(root)
    with output_lock(root, "20261126T000000-abcdef"):
        res = _cli("submit", job)
    out = " ".join(res.stdout.split())
    assert res.returncode == 2, out
    assert "is being written by another lepton-batch run" in out
    assert f"pid {os.getpid()}, run 20261126T000000-abcdef" in out
    assert not list(root.glob("run_date=*"))
    assert _here("submit", job).returncode == 0  # released with its holder


def test_leftovers_of_a_run_killed_at_start_up_are_accepted(tmp_path, tiny_bert, corpus_dir):
    root = tmp_path / "out"
    (root / "_runs" / "20261126T000000-abcdef").mkdir(parents=True)  # all an old kill left
    plan = make_plan(load_job(_job(tmp_path, tiny_bert, corpus_dir)))
    assert run_job(plan).ok


def test_output_inside_the_input_is_refused(tmp_path, tiny_bert, corpus_dir):
    corpus = tmp_path / "in"
    shutil.copytree(corpus_dir, corpus)
    job = _job(tmp_path, tiny_bert, corpus)
    for inp, out in [(corpus, corpus / "out"), (f"{corpus}/*.parquet", corpus / "nightly")]:
        with pytest.raises(JobSpecError, match="is inside the input directory"):
            make_plan(load_job(job, [f"input.path={inp}", f"output.path={out}"]))


OPTIONAL_STEPS = ["preview", "polars-missing", "report-json", "report-html",
                  "dask-report-start", "dask-report-save", "label-counts", "metrics-plugin",
                  "token-estimate", "progress-display"]


@pytest.mark.parametrize("step", OPTIONAL_STEPS)
def test_failing_optional_step_never_fails_a_finished_run(step, tmp_path, tiny_bert,
                                                          corpus_dir, monkeypatch):
    import lepton_batch.cli.submit as cli
    import lepton_batch.run.cluster as cluster
    import lepton_batch.run.lifecycle as run
    from lepton_batch.cli.app import app

    def boom(*args, **kwargs):
        raise RuntimeError(f"injected failure in {step}")

    class SaveFails:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            raise ImportError("bokeh is not installed")

    overrides = []
    if step == "preview":
        monkeypatch.setattr(cli, "_preview", boom)
    elif step == "polars-missing":
        monkeypatch.setitem(sys.modules, "polars", None)  # import polars -> ImportError
    elif step == "report-json":
        monkeypatch.setattr(run, "write_report", boom)
    elif step == "report-html":
        import lepton_batch.run.report as report

        monkeypatch.setattr(report, "render_html", boom)
    elif step == "metrics-plugin":
        import lepton_batch.run.monitor as monitor

        monkeypatch.setattr(monitor.MetricsPlugin, "start", boom)
    elif step == "token-estimate":
        import lepton_batch.plan.estimate as plan

        monkeypatch.setattr(plan, "estimate_tokens", boom)
    elif step == "progress-display":
        import lepton_batch.run.progress as progress

        monkeypatch.setattr(progress, "describe", boom)
        overrides = ["--progress", "plain"]
    elif step == "dask-report-start":
        monkeypatch.setattr(cluster, "performance_report", boom)
    elif step == "dask-report-save":
        monkeypatch.setattr(cluster, "performance_report", lambda **kw: SaveFails())
    elif step == "label-counts":
        monkeypatch.setattr(cli, "_label_counts", boom)
        overrides = ["--set", "task={kind: classify, labels: [files, network, numbers]}"]
    job = _job(tmp_path, tiny_bert, corpus_dir)
    res = CliRunner().invoke(app, ["submit", str(job), *overrides])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "_SUCCESS").is_file()
    assert len(list((tmp_path / "out").glob("run_date=*/*.parquet"))) == 9


INCREMENTAL_KILL_POINTS = [("parquet", p) for p in ("prepared", "shard-recorded@1",
                                                    "publish-moved@1", "success-written")]
# Delta: a worker's file written but not committed, the first commit made but not yet
# recorded by the driver, and every commit made but no _SUCCESS.
INCREMENTAL_KILL_POINTS += [("delta", p) for p in ("part-written@2", "delta-committed@1",
                                                  "published")]


@pytest.fixture(scope="module")
def first_night(request, tmp_path_factory, tiny_bert, corpus_dir) -> tuple[str, Path]:
    """An incremental output (Parquet or Delta) after one uninterrupted night, built once
    per test run (``built_once``: a module fixture would be built again each time an xdist
    worker comes back to this module from another one)."""
    fmt = request.param
    if fmt == "delta":
        pytest.importorskip("deltalake")

    def night(base: Path) -> None:
        shutil.copytree(corpus_dir, base / "in")
        job = _job(base, tiny_bert, base / "in", mode="incremental", format=fmt)
        res = _cli("submit", str(job), "--run-date", "2026-03-01")
        assert res.returncode == 0, res.stdout + res.stderr

    return fmt, built_once(tmp_path_factory, f"first-night-{fmt}", night)


def _visible(root: Path, fmt: str) -> pl.DataFrame:
    """What a reader of this format sees."""
    if fmt == "delta":
        return pl.read_delta(str(root))
    return _dataset(root).with_columns(
        pl.lit(None, pl.String).alias("run_date"))  # parts only; the date is in the path


@pytest.mark.parametrize(("first_night", "point"), [
    pytest.param(fmt, point, id=f"{fmt}-{point}") for fmt, point in INCREMENTAL_KILL_POINTS],
    indirect=["first_night"])
def test_killed_incremental_night_resumes_without_loss_or_duplicates(first_night, point,
                                                                     tmp_path, tiny_bert):
    fmt = first_night[0]
    shutil.copytree(first_night[1] / "in", tmp_path / "in")
    shutil.copytree(first_night[1] / "out", tmp_path / "out")
    changed = tmp_path / "in" / "corpus-1.parquet"
    table = pq.read_table(changed).to_pylist()
    for row in table[20:25]:
        row["text"] = f"changed overnight: {row['text']}"
    table += [{"id": 5000 + i, "text": f"a new row {i}", "lang": "en"} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(table), changed, row_group_size=10)
    expected = {row["id"] for row in table[20:25]} | {5000, 5001, 5002}

    job = str(_job(tmp_path, tiny_bert, tmp_path / "in", mode="incremental", format=fmt))
    killed = _cli("submit", job, "--run-date", "2026-03-02", env={FAULT_ENV: point})
    assert killed.returncode == KILLED, killed.stdout + killed.stderr
    _visible(tmp_path / "out", fmt)  # readable after the kill
    again = _here("submit", job, "--run-date", "2026-03-02")
    assert again.returncode == 0, again.stdout + again.stderr
    root = tmp_path / "out"
    assert not (root / "_staging").exists() and not (root / "_publish.json").exists()
    if fmt == "delta":
        night2 = pl.read_delta(str(root)).filter(pl.col("run_date") == "2026-03-02")
        # no file the table does not reference is left where a Parquet glob would see it
        assert len(list(root.glob("run_date=*/*.parquet"))) == len(
            __import__("deltalake").DeltaTable(str(root)).file_uris())
    else:
        night2 = pl.read_parquet(sorted(root.glob("run_date=2026-03-02/*.parquet")))
    assert sorted(night2["id"].to_list()) == sorted(expected)  # 0 lost, 0 twice
    assert _visible(root, fmt).height == ROWS + len(expected)
    # A third run over the same input computes nothing.
    third = _here("submit", job, "--run-date", "2026-03-03")
    assert third.returncode == 0 and "nothing to compute" in third.stdout, third.stdout
