"""The quality gate's floor (issue 28): a job with fewer rows than quality.sample_rows is
checked on its rows plus lepton-batch's calibration sample, and says so."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
from conftest import sample_texts, write_job

from lepton_batch.engine.calibration import calibration_texts, gate_sample
from lepton_batch.job.spec import load_job
from lepton_batch.plan.build import make_plan
from lepton_batch.run.lifecycle import run_job


def test_gate_sample_tops_up_from_the_calibration_sample():
    pool = calibration_texts()
    assert len(pool) == 64 and all(isinstance(t, str) and t.strip() for t in pool)
    job = sample_texts(8)
    sample = gate_sample(job, 64, lambda texts: ["query: " + t for t in texts])
    assert sample.job_rows == 8 and sample.calibration_rows == 56
    assert sample.texts[:8] == job
    assert all(t.startswith("query: ") for t in sample.texts[8:])  # the job's prompt
    # spread over the sample's lengths, the longest included
    assert sample.texts[-1] == "query: " + pool[-1]
    big = sample_texts(200)
    assert gate_sample(big, 64).calibration_rows == 0
    assert len(gate_sample(big, 64).texts) == 64
    assert gate_sample(job, 0).texts == []  # sample_rows 0: no gate


def test_small_job_is_gated_on_its_rows_plus_the_calibration_sample(tmp_path, tiny_bert):
    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(pa.table({"id": pa.array(range(8), pa.int64()),
                             "text": pa.array(sample_texts(8))}), folder / "night.parquet")
    path = write_job(
        tmp_path / "job.yaml", name="small-night",
        input={"path": str(folder)}, model={"path": str(tiny_bert), "dtype": "bfloat16"},
        task={"kind": "embed"}, output={"path": str(tmp_path / "out")},
        cluster={"processes": False, "n_workers": 1, "dashboard_address": "127.0.0.1:0"})
    plan = make_plan(load_job(path))
    result = run_job(plan)
    assert result.ok
    (engine,) = {r.engine for r in result.records}
    assert ("vs float32 on 8 rows of the job + 56 of lepton-batch's calibration sample"
            in engine), engine
    meta = json.loads(pq.read_schema(next(plan.output_root.glob("run_date=*/*.parquet")))
                      .metadata[b"lepton_batch"])
    quality = json.loads(meta["quality"])
    assert (quality["sample_rows"], quality["calibration_rows"]) == (64, 56)
