"""``status OUTPUT`` and ``inspect OUTPUT`` on real outputs: two nights of an incremental
embed job and a zero-shot classify job on the tiny BERT, read back through the CLI."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from conftest import invoke_cli as _cli
from conftest import table_rows as _rows
from conftest import write_corpus, write_job

from lepton_batch.job.spec import load_job
from lepton_batch.plan.build import make_plan
from lepton_batch.run.lifecycle import RunResult, run_job

# One worker builds the module's outputs once (make test runs xdist with --dist loadgroup).
pytestmark = [pytest.mark.timeout(300), pytest.mark.xdist_group("inspect")]

NIGHTS = [date(2026, 3, 1), date(2026, 3, 2)]
CHANGED = {0: "a new first text", 1: "another new text", 2: "a third changed one"}
LABELS = ["a", "b", "c"]


@dataclass
class Outputs:
    embed: Path
    classify: Path
    nights: list[RunResult]


def _job(base: Path, name: str, model: Path, task: dict, **output) -> Path:
    return write_job(
        base / f"{name}.yaml", name=name,
        input={"path": str(base / "in"), "rows_per_shard": 20},
        model={"path": str(model), "max_length": 48, "dtype": "float32"},
        task=task, engine={"max_tokens_per_batch": 256},
        output={"path": str(base / name), **output},
        cluster={"processes": False, "dashboard_address": "127.0.0.1:0"},
    )


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, tiny_bert) -> Outputs:
    base = tmp_path_factory.mktemp("inspect")
    write_corpus(base / "in", n_files=2, rows=30)  # 3 rows with errors per file
    embed = _job(base, "embed", tiny_bert, {"kind": "embed"}, mode="incremental")
    nights = [run_job(make_plan(load_job(embed), run_date=NIGHTS[0]))]
    first = base / "in" / "corpus-0.parquet"  # night 2: three texts change
    table = pq.read_table(first)
    texts = [CHANGED.get(i, t) for i, t in zip(table["id"].to_pylist(),
                                                table["text"].to_pylist(), strict=True)]
    pq.write_table(table.set_column(1, "text", pl.Series(texts).to_arrow()), first,
                   row_group_size=10)
    nights.append(run_job(make_plan(load_job(embed), run_date=NIGHTS[1])))
    classify = _job(base, "classify", tiny_bert, {"kind": "classify", "labels": LABELS})
    assert run_job(make_plan(load_job(classify))).published
    return Outputs(base / "embed", base / "classify", nights)


def _value(out: str, key: str) -> str:
    """The value of ``key`` in a two-column table without a header."""
    cells = next([c.strip() for c in line.strip().strip("│").split("│")]
                 for line in out.splitlines() if line.startswith(f"│ {key} "))
    return cells[1]


def _frame(root: Path) -> pl.DataFrame:
    return pl.read_parquet(str(root / "run_date=*" / "*.parquet"), hive_partitioning=True)


def test_status_of_an_output_lists_every_run(outputs):
    night1, night2 = outputs.nights
    assert night1.published and night2.published
    code, out = _cli("status", outputs.embed)
    assert code == 0, out
    runs = {r["run"]: r for r in _rows(out, "unchanged")}
    assert list(runs) == [night1.run_id, night2.run_id]
    assert runs[night1.run_id]["rows"] == "60" and runs[night1.run_id]["errors"] == "6"
    assert runs[night2.run_id]["rows"] == "3" and runs[night2.run_id]["unchanged"] == "57"
    assert runs[night2.run_id]["run date"] == str(NIGHTS[1])
    assert all(r["published"] == "yes" and r["failed"] == "0" and r["pending"] == "0"
               for r in runs.values())
    assert "57 of 60 input rows unchanged (skipped), 3 computed" in out
    assert "63 rows in" in out and "2 partition(s)" in out


def test_status_still_takes_a_job_file(outputs, tmp_path):
    code, out = _cli("status", outputs.classify.parent / "classify.yaml")
    assert code == 0, out
    assert "status of job 'classify'" in out and "60 / 60" in out


def test_inspect_shows_schema_partitions_norms_errors_and_samples(outputs):
    df = _frame(outputs.embed)
    code, out = _cli("inspect", outputs.embed, "--rows", "3")
    assert code == 0, out
    schema = [r["column"] for r in _rows(out, "polars type")]
    assert schema == df.columns and "embedding" in schema and "run_id" in schema
    per_day = {r["run_date"]: r for r in _rows(out, "part files")}
    expected = df.group_by("run_date").agg(pl.len(), pl.col("error").is_not_null().sum())
    assert {d: (r["rows"], r["errors"]) for d, r in per_day.items()} == {
        str(d): (str(n), str(e)) for d, n, e in expected.iter_rows()}
    norms = _rows(out, "rows with an embedding")[0]
    assert norms["rows with an embedding"] == str(df["embedding"].is_not_null().sum())
    assert 0 < float(norms["min"]) <= float(norms["mean"]) <= float(norms["max"])
    errors = {r["error"]: r["rows"] for r in _rows(out, "e.g. id")}
    counts = df.drop_nulls("error").group_by("error").len().iter_rows()
    assert errors == {message: str(n) for message, n in counts} and len(errors) >= 2
    assert len(_rows(out, "num_tokens")) == 3  # sample rows


def test_inspect_latest_keeps_one_row_per_id(outputs):
    ids = _frame(outputs.embed)["id"].n_unique()
    code, out = _cli("inspect", outputs.embed, "--latest")
    assert code == 0, out
    assert "newest row per id" in " ".join(out.split())  # the title wraps a long path
    assert _value(out, "rows") == str(ids) and _value(out, "distinct ids (id)") == str(ids)
    per_day = {r["run_date"]: r["rows"] for r in _rows(out, "errors")}
    assert per_day == {str(NIGHTS[0]): str(ids - len(CHANGED)), str(NIGHTS[1]): str(len(CHANGED))}


def test_inspect_label_distribution(outputs):
    df = _frame(outputs.classify)
    code, out = _cli("inspect", outputs.classify)
    assert code == 0, out
    labels = {r["label"]: r["rows"] for r in _rows(out, "mean score")}
    expected = {("(error)" if label is None else label): str(n)
                for label, n in df.group_by("label").len().iter_rows()}
    assert labels == expected and set(labels) - {"(error)"} <= set(LABELS)
    assert labels["(error)"] == "6"


@pytest.mark.parametrize(("args", "n"), [
    (["--sql", "select count(*) as n from output"], 63),
    (["--sql", "select count(*) as n from latest"], 60),
    (["--latest", "--sql", "select count(*) as n from output"], 60),
    (["--sql", "select count(*) as n from output where run_date = '2026-03-02'"], 3),
])
def test_inspect_sql(outputs, args, n):
    code, out = _cli("inspect", outputs.embed, *args)
    assert code == 0, out
    assert _rows(out, "┃ n") == [{"n": str(n)}]


def test_bad_sql_and_non_outputs_exit_2(outputs, tmp_path):
    code, out = _cli("inspect", outputs.embed, "--sql", "select nope from output")
    assert code == 2 and "--sql: unable to find column" in out and "nope" in out
    code, out = _cli("inspect", outputs.embed, "--sql", "selec everything")
    assert code == 2 and "--sql: sql parser error" in out
    (tmp_path / "notes.txt").write_text("hello")
    for command in ("inspect", "status"):
        code, out = _cli(command, tmp_path)
        assert code == 2 and "holds no lepton-batch output" in out
        assert "expected an output directory" in out
    code, out = _cli("inspect", tmp_path / "missing")
    assert code == 2 and "does not exist" in out


def test_an_output_with_nothing_published_yet(outputs, tmp_path):
    root = tmp_path / "fresh"
    root.mkdir()
    for name in ("_lepton_batch.json", "_schema.json"):
        shutil.copy(outputs.embed / name, root / name)
    code, out = _cli("status", root)
    assert code == 0 and "nothing yet" in out and "runs (0" in out
    code, out = _cli("inspect", root)
    assert code == 0 and "nothing yet" in out and "embedding" in out
    code, out = _cli("inspect", root, "--sql", "select count(*) as n from output")
    assert code == 0 and _rows(out, "┃ n") == [{"n": "0"}]


def test_status_of_a_killed_run(outputs, tmp_path):
    """A run killed mid-way: no report, a lock naming a process that is gone, staged shards."""
    root = tmp_path / "embed"
    shutil.copytree(outputs.embed, root)
    run_id = "20991231T000000-dead00"
    (root / "_runs" / run_id).mkdir()
    (root / "_staging" / "fp" / "_manifest").mkdir(parents=True)
    (root / "_staging" / "fp" / "_manifest" / "shard.json").write_text("{}")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (root / "_lock").write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid,
                                            "run_id": run_id, "since": "2099-12-31"}))
    code, out = _cli("status", root)
    assert code == 0, out
    assert _rows(out, "unchanged")[-1]["run"] == run_id
    assert _rows(out, "unchanged")[-1]["published"] == "interrupted"
    assert _value(out, "last run").startswith(f"{run_id}: interrupted (stopped or killed")
    assert _value(out, "staged, not published").startswith("1 shard(s)")
    assert "its process is gone (killed); the lock is free" in " ".join(out.split())


def test_inspect_loads_no_model_stack(outputs):
    """inspect reads Parquet only: torch, transformers and Dask stay unimported."""
    code = ("import sys; from typer.testing import CliRunner; "
            "from lepton_batch.cli.app import app; "
            f"r = CliRunner().invoke(app, ['inspect', {str(outputs.embed)!r}]); "
            "assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in ('torch', 'transformers', 'dask', 'distributed') "
            "if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
