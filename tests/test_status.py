"""``status`` and submit's closing summary on an incremental output: two nights of a
zero-shot classify job on the tiny BERT, run through the CLI; an interrupted run, a changed
job, and input paths holding ``{run_date}``."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import invoke_cli as _cli
from conftest import sample_texts, write_job
from conftest import table_rows as _rows

from lepton_batch.job.spec import load_job
from lepton_batch.plan.build import make_plan
from lepton_batch.run.lifecycle import run_job

pytestmark = [pytest.mark.timeout(300), pytest.mark.xdist_group("status")]

NIGHTS = [date(2026, 3, 1), date(2026, 3, 2), date(2026, 3, 3)]
TEXTS = sample_texts(100)
LABELS = ["sports", "politics", "weather"]


@dataclass
class Nights:
    base: Path
    job: Path
    output: Path
    submit_night2: str  # what submit printed on night 2


def _write(path: Path, rows: dict[int, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": pa.array(list(rows), pa.int64()),
                             "text": pa.array(list(rows.values()), pa.string())}),
                   path, row_group_size=10)


def _job(base: Path, input_path: str | None = None) -> Path:
    return write_job(
        base / "job.yaml", name="headlines",
        input={"path": input_path or str(base / "in"), "rows_per_shard": 20},
        model={"path": str(_job.model), "max_length": 48, "dtype": "float32"},
        task={"kind": "classify", "labels": LABELS},
        engine={"max_tokens_per_batch": 256},
        output={"path": str(base / "out"), "mode": "incremental"},
        cluster={"processes": False, "dashboard_address": "127.0.0.1:0"},
    )


def _value(out: str, key: str) -> str:
    """The value of ``key`` in a two-column table without a header."""
    return next([c.strip() for c in line.strip().strip("│").split("│")]
                for line in out.splitlines() if line.startswith(f"│ {key} "))[1]


@pytest.fixture(scope="module")
def nights(tmp_path_factory, tiny_bert) -> Nights:
    """Night 1: 60 rows in two files (4 shards). Night 2: id 0's text changes (file a is
    rewritten, so its shards get new fingerprints) and 1 row is computed."""
    base = tmp_path_factory.mktemp("status")
    _job.model = tiny_bert
    a = {i: TEXTS[i] for i in range(30)}
    _write(base / "in" / "a.parquet", a)
    _write(base / "in" / "b.parquet", {100 + i: TEXTS[40 + i] for i in range(30)})
    job = _job(base)
    code, out = _cli("submit", job, "--run-date", NIGHTS[0])
    assert code == 0, out
    _write(base / "in" / "a.parquet", a | {0: "a headline that changed overnight"})
    code, out = _cli("submit", job, "--run-date", NIGHTS[1])
    assert code == 0, out
    assert "1 to compute in 1 shard(s)" in " ".join(out.split())
    return Nights(base, job, base / "out", out)


def _copy(nights: Nights, tmp_path: Path) -> Path:
    """The input and output copied, with a job file pointing at the copies."""
    for name in ("in", "out"):
        shutil.copytree(nights.base / name, tmp_path / name)
    return _job(tmp_path)


def test_submit_summary_after_an_incremental_night_describes_current_rows(nights):
    out = nights.submit_night2
    # 61 rows in the output (60 from night 1, 1 from night 2); 60 are current.
    counts = _rows(out, "mean score")
    assert sum(int(r["rows"].replace(",", "")) for r in counts) == 60, out
    assert "current rows" in out
    preview = _rows(out, "┃ id")
    assert preview[0]["id"] == "0" and preview[0]["run_date"] == str(NIGHTS[1]), out
    assert [int(r["id"]) for r in preview] == [0, 1, 2, 3, 4]


def test_status_of_a_job_counts_the_rows_current_for_its_plan(nights):
    code, out = _cli("status", nights.job)
    assert code == 0, out
    # main said "shards published 3 / 4", "rows published 31 / 60" (shard records)
    assert "shards published" not in out
    assert _value(out, "rows current") == "60 / 60: the next submit computes none"
    assert _value(out, "shards current") == "4 / 4"
    assert _value(out, "rows with errors") == "0"
    assert _value(out, "last published run").endswith(f"(run_date {NIGHTS[1]})")


def test_status_says_the_job_fingerprint_changed(nights, tmp_path):
    job = _copy(nights, tmp_path)
    changed = ["--set", "task.labels=[sports, politics, science]"]
    code, out = _cli("status", job, *changed)
    assert code == 0, out
    flat = " ".join(out.split())
    assert "job fingerprint" in flat and "changed" in flat
    assert _value(out, "rows current").startswith("0 / 60")
    old_fp = make_plan(load_job(job)).job_fingerprint
    assert old_fp in flat  # the fingerprint the output was made with
    # Run the changed job: status OUTPUT says at which run the fingerprint changed.
    plan = make_plan(load_job(job, [changed[1]]), run_date=NIGHTS[2])
    assert run_job(plan).rows == 60
    code, out = _cli("status", tmp_path / "out")
    assert code == 0, out
    flat = " ".join(out.split())
    assert f"changed at run {plan_run_id(tmp_path / 'out')}" in flat
    assert f"was {old_fp}" in flat


def plan_run_id(root: Path) -> str:
    return sorted(p.name for p in (root / "_runs").iterdir())[-1]


def test_status_of_an_interrupted_run(nights, tmp_path):
    """Ctrl-C after the first shard: no report, the lock released; status says interrupted,
    not a blank row with "no report"."""
    job = _copy(nights, tmp_path)
    b = {100 + i: f"a changed headline number {i}" for i in range(30)}
    _write(tmp_path / "in" / "b.parquet", b)  # two shards to compute

    def interrupt(record) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_job(make_plan(load_job(job), run_date=NIGHTS[2]), on_shard=interrupt)
    run_id = plan_run_id(tmp_path / "out")
    code, out = _cli("status", tmp_path / "out")
    assert code == 0, out
    assert _rows(out, "unchanged")[-1]["run"] == run_id
    assert _rows(out, "unchanged")[-1]["published"] == "interrupted"
    assert _value(out, "last run").startswith(f"{run_id}: interrupted")
    code, out = _cli("status", job, "--run-date", NIGHTS[2])
    assert code == 0, out
    # the first shard finished, the second maybe too (the worker stages it)
    assert re.match(r"[12] shard\(s\)", _value(out, "staged, not published"))
    assert _value(out, "rows current").startswith("30 / 60")
    # A run whose process holds the lock and is alive is running, not interrupted.
    (tmp_path / "out" / "_lock").write_text(json.dumps(
        {"host": socket.gethostname(), "pid": os.getpid(), "run_id": run_id,
         "since": "2026-03-03"}))
    code, out = _cli("status", tmp_path / "out")
    assert _rows(out, "unchanged")[-1]["published"] == "running"
    assert _value(out, "last run").startswith(f"{run_id}: running")


def test_status_of_a_job_whose_input_path_holds_the_run_date(nights, tmp_path):
    shutil.copytree(nights.base / "out", tmp_path / "out")
    for day in NIGHTS:
        _write(tmp_path / "in" / f"dt={day}" / "a.parquet", {i: TEXTS[i] for i in range(30)})
    job = _job(tmp_path, str(tmp_path / "in" / "dt={run_date}"))
    code, out = _cli("status", job, "--run-date", NIGHTS[2])
    assert code == 0, out
    # a.parquet of night 3 holds night 1's texts: id 0 changed back, so 29 of 30 are current
    assert _value(out, "rows current") == ("29 / 30: the next submit computes 1 in 1 "
                                           "shard(s)")
    assert _value(out, "input") == f"{tmp_path / 'in' / f'dt={NIGHTS[2]}'} (1 file(s), 30 rows)"
    code, out = _cli("status", job, "--run-date", "2026-02-30")
    assert code == 2 and "--run-date: '2026-02-30' is not a date" in out
