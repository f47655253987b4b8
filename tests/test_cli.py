"""The command line as a user runs it: a real subprocess, real process workers."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from conftest import REPO, write_job

CLI = [sys.executable, "-m", "lepton_batch"]


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd, timeout=240)


def _job(tmp_path, model_dir, **task) -> Path:
    return write_job(
        tmp_path / "job.yaml",
        name="cli-job",
        input={"path": str(tmp_path / "in"), "rows_per_shard": 20},
        model={"path": str(model_dir), "max_length": 48, "dtype": "float32"},
        task=task or {"kind": "embed"},
        output={"path": str(tmp_path / "out")},
        cluster={"dashboard_address": "127.0.0.1:0"},
    )


@pytest.mark.parametrize("command", [[], ["submit"], ["validate"], ["status"]])
def test_help_on_every_command(command):
    res = _run(*command, "--help")
    assert res.returncode == 0, res.stderr
    assert "Usage" in res.stdout
    if command:
        assert "--set" in res.stdout


def test_validate_prints_plan_without_loading_model(tmp_path, tiny_bert, corpus):
    res = _run("validate", str(_job(tmp_path, tiny_bert)))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "9 (≤ 20 rows each" in res.stdout and "135 rows" in res.stdout
    assert "tokens (estimate)" in res.stdout and "job is valid" in res.stdout


@pytest.mark.parametrize("task", [{"kind": "embed"}, {"kind": "classify", "labels": ["a", "b"]}])
def test_planning_imports_no_model_stack(tmp_path, tiny_bert, corpus, task):
    """What submit's driver does before the workers run (plan, estimate the work) and
    validate: no torch, no transformers. Their import took seconds that the embedded
    workers, importing the same at the same time, needed on a small machine.

    Nor what an encoder task does on a worker before its warm-up ends: build the
    pipeline, read and prepare the shard, tokenize it (``EngineCache.pretokenize``)."""
    job = _job(tmp_path, tiny_bert, **task)
    code = ("import sys; from pathlib import Path; from lepton_batch.job.spec import load_job; "
            "from lepton_batch.plan.build import make_plan; "
            "from lepton_batch.plan.estimate import estimate_work; "
            "import lepton_batch.run.lifecycle; "
            f"plan = make_plan(load_job(Path({str(job)!r}))); "
            "assert sum(n for n, _ in estimate_work(plan).values()) == plan.rows; "
            "from typer.testing import CliRunner; from lepton_batch.cli.app import app; "
            f"r = CliRunner().invoke(app, ['validate', {str(job)!r}]); "
            "assert r.exit_code == 0, r.output; "
            "import lepton_batch.run.cluster; from lepton_batch.job.shards import read_shard; "
            "from lepton_batch.engine import EngineCache, EngineConfig; "
            "from lepton_batch.pipelines import encoder_task, make_pipeline; "
            "job = plan.job; assert encoder_task(job.task); "
            "pipe = make_pipeline(job.task, plan.model, plan.settings, job.input); "
            "texts, _ = pipe.prepare(read_shard(plan.shards[0], pipe.columns)); "
            "config = EngineConfig(model_dir=str(plan.model.path), head=pipe.head, "
            "max_length=plan.settings.max_length); "
            "pre = EngineCache(warming=lambda: True).pretokenize(config, texts); "
            "assert texts and len(pre) == len(texts), (len(texts), pre); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_validate_reports_every_problem(tmp_path, tiny_bert, corpus):
    job = _job(tmp_path, tiny_bert)
    res = _run("validate", str(job), "--set", "input.text_column=body",
               "--set", "model.max_length=4096", "--set", "task.kind=classify")
    assert res.returncode == 2
    out = " ".join(res.stdout.split())
    assert "input.text_column: column 'body' not in" in out
    assert "model.max_length: 4096 exceeds the model's max_position_embeddings (128)" in out
    assert "has no sequence-classification head" in out
    res = _run("validate", str(job), "--set", "model.path=/nonexistent/model")
    assert res.returncode == 2 and "model.path: /nonexistent/model is not a directory" in res.stdout


def test_submit_that_fails_to_plan_closes_its_early_cluster(tmp_path, tiny_bert, corpus):
    """submit starts the embedded cluster as soon as the job file is valid, before the plan
    reads inputs; a plan error still exits 2 cleanly (no traceback, no hang on the
    cluster's threads and processes)."""
    res = _run("submit", str(_job(tmp_path, tiny_bert)), "--set", "input.text_column=body")
    assert res.returncode == 2, res.stdout + res.stderr
    assert "input.text_column: column 'body' not in" in " ".join(res.stdout.split())
    assert "Traceback" not in res.stdout + res.stderr


def test_submit_then_resume_then_status(tmp_path, tiny_bert, corpus):
    job = _job(tmp_path, tiny_bert)
    res = _run("submit", str(job))
    assert res.returncode == 0, res.stdout + res.stderr
    out = " ".join(res.stdout.split())
    assert "dashboard: http://127.0.0.1:" in out
    assert "shards: 9 run, 0 skipped, 0 failed" in out
    assert "rows: 135 (9 with errors)" in out and "rows/s" in out and "tokens/s" in out
    assert re.search(r"first batch: [\d.]+ s after the run started \([\d.]+ s after the "
                     r"command started\)", out)
    assert "first 5 rows" in out
    df = pl.read_parquet(tmp_path / "out" / "run_date=*" / "*.parquet")
    assert df.height == 135

    res = _run("submit", str(job))
    assert res.returncode == 0 and "shards: 0 run, 9 skipped" in " ".join(res.stdout.split())

    res = _run("status", str(job))
    out = " ".join(res.stdout.split())
    assert res.returncode == 0 and "9 / 9" in out and "135 / 135" in out


@pytest.mark.parametrize("job_file", sorted((REPO / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_jobs_validate(job_file, monkeypatch, request):
    """Every example validates as written; the causal-LM ones name a model directory the
    user downloads (models/…), pointed here at the tiny random Llama."""
    from lepton_batch.job.spec import load_job
    from lepton_batch.plan.build import make_plan

    monkeypatch.chdir(REPO)
    job = load_job(job_file)
    if job.model.path.startswith("models/"):
        job = load_job(job_file, [f"model.path={request.getfixturevalue('tiny_llama')}"])
    plan = make_plan(job)
    assert plan.rows == 2230 and len(plan.files) == 3
