"""lepton_batch.map_partitions (lepton_batch/run/frame.py): a task over a Dask DataFrame
the caller holds. The same values as a job, a ``meta`` that is the computed schema, rows
in order, bad rows recorded, problems named before any model loads."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import lepton_batch

dd = pytest.importorskip("dask.dataframe")

MODEL = {"max_length": 48, "dtype": "float32"}
ENGINE = {"max_tokens_per_batch": 256, "max_rows_per_batch": 16}
APPENDED = ["embedding", "num_tokens", "truncated", "error"]


def _job(tmp_path, model_dir) -> dict:
    return {
        "name": "frame-job",
        "input": {"path": str(tmp_path / "in"), "rows_per_shard": 20},
        "model": {"path": str(model_dir), **MODEL},
        "task": {"kind": "embed"},
        "engine": ENGINE,
        "output": {"path": str(tmp_path / "out")},
        "cluster": {"processes": False, "n_workers": 1, "dashboard_address": "127.0.0.1:0"},
    }


def _values(series: pd.Series) -> list:
    return [None if pd.isna(v) else v for v in series.tolist()]


def _arrow_types(frame: pd.DataFrame, names: list[str]) -> dict[str, pa.DataType]:
    return {name: frame.dtypes[name].pyarrow_dtype for name in names}


@pytest.mark.slow
def test_map_partitions_on_a_client_equals_the_jobs_rows(tmp_path, tiny_bert, corpus):
    from dask.distributed import Client, LocalCluster

    job = _job(tmp_path, tiny_bert)
    lepton_batch.submit(job)
    plan = lepton_batch.validate(job, set=["output.mode=overwrite"])
    expected = lepton_batch.read(tmp_path / "out").collect().sort("id")

    ddf = dd.read_parquet(str(tmp_path / "in"))
    out = lepton_batch.map_partitions(ddf, model={"path": str(tiny_bert), **MODEL},
                                      task="embed", text_column="text", engine=ENGINE)
    # meta: the columns and exact types, known before anything runs
    assert list(out.columns) == [*ddf.columns, *APPENDED]
    assert _arrow_types(out._meta, APPENDED) == {n: plan.schema.field(n).type
                                                 for n in APPENDED}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster):
        frame = out.compute()
    assert frame.dtypes.equals(out._meta.dtypes)  # the computed schema is the meta's
    assert frame["id"].tolist() == ddf["id"].compute().tolist()  # row order kept

    frame = frame.sort_values("id")
    assert frame["id"].tolist() == expected["id"].to_list() and len(frame) == 135
    assert _values(frame["error"]) == expected["error"].to_list()
    assert _values(frame["num_tokens"]) == expected["num_tokens"].to_list()
    ok = frame["error"].isna().to_numpy()
    assert ok.sum() == 126  # 9 bad rows: null, empty, whitespace in each of 3 files
    ours = np.stack(frame["embedding"][ok].to_numpy())
    theirs = np.stack([np.asarray(e) for e, good in zip(expected["embedding"].to_list(), ok,
                                                        strict=True) if good])
    assert np.abs(ours - theirs).max() < 1e-5
    assert frame["embedding"][~ok].isna().all()


def test_bad_values_in_a_pandas_column_are_row_errors(tiny_bert):
    import dask

    texts = ["a good row", None, 5, b"\xff\xfe", "   ", float("nan"), "another good row"]
    with dask.config.set({"dataframe.convert-string": False}):  # keep the object column
        ddf = dd.from_pandas(pd.DataFrame({"text": pd.Series(texts, range(10, 17), object)}),
                             npartitions=2)
    assert ddf.dtypes["text"] == np.dtype(object)
    out = lepton_batch.map_partitions(ddf, model={"path": str(tiny_bert), **MODEL},
                                      task="embed")
    frame = out.compute(scheduler="sync")  # no Client: Dask's local scheduler
    assert frame.index.tolist() == list(range(10, 17))  # the caller's index kept
    assert _values(frame["error"]) == [
        None, "null text", "text is int, not a string", "invalid UTF-8 at byte 0",
        "empty text", "null text", None]
    assert frame["embedding"].notna().tolist() == [True, *[False] * 5, True]
    assert len(frame["embedding"].iloc[0]) == 32


def test_classify_appends_the_label_columns(tiny_bert_cls):
    ddf = dd.from_pandas(pd.DataFrame({"body": ["good news", "bad news", "", "more"]}),
                         npartitions=2)
    out = lepton_batch.map_partitions(ddf, model={"path": str(tiny_bert_cls), **MODEL},
                                      task={"kind": "classify", "top_k": 2},
                                      text_column="body")
    frame = out.compute(scheduler="sync")
    assert frame.dtypes.equals(out._meta.dtypes)
    assert "label" in frame.columns and "score" in frame.columns
    assert frame["label"].notna().tolist() == [True, True, False, True]
    assert _values(frame["error"]) == [None, None, "empty text", None]


def test_problems_are_named_before_any_model_loads(tiny_bert, tiny_llama):
    ddf = dd.from_pandas(pd.DataFrame({"text": ["x"], "embedding": [1]}), npartitions=1)
    with pytest.raises(lepton_batch.JobError) as err:
        lepton_batch.map_partitions(ddf, model=str(tiny_bert), task="embed",
                                    text_column="body", id_column="doc_id")
    text = str(err.value)
    assert "text_column: the DataFrame has no column body" in text
    assert "id_column: the DataFrame has no column doc_id" in text
    assert "already has column(s) embedding" in text

    with pytest.raises(lepton_batch.JobError, match="task.pooling"):
        lepton_batch.map_partitions(ddf, model=str(tiny_bert),
                                    task={"kind": "embed", "pooling": "bogus"})
    with pytest.raises(lepton_batch.JobError, match="model.path"):
        lepton_batch.map_partitions(ddf, model=str(tiny_bert) + "-missing", task="embed")
    with pytest.raises(lepton_batch.JobError, match="id_column: sampled generation"):
        lepton_batch.map_partitions(
            ddf.drop(columns="embedding"), model=str(tiny_llama),
            task={"kind": "generate", "temperature": 0.7, "max_new_tokens": 4})
