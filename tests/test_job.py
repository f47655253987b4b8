"""Whole jobs through Dask (an in-process LocalCluster) on tiny real models.

Outputs are checked against a direct transformers forward on the same rows; resume,
overwrite and changed inputs are checked for lost or duplicated rows.
"""

from __future__ import annotations

import dataclasses
import json
import os

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from conftest import LABELS, write_corpus, write_job
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from lepton_batch.job.spec import JobSpecError, load_job
from lepton_batch.output.layout import OutputError
from lepton_batch.plan.build import make_plan
from lepton_batch.run.lifecycle import run_job

MAX_LEN = 48


def _job(tmp_path, model_dir, task, overrides=(), **input_extra):
    path = write_job(
        tmp_path / "job.yaml",
        name="test-job",
        input={"path": str(tmp_path / "in"), "text_column": "text", "id_column": "id",
               "passthrough_columns": ["lang"], "rows_per_shard": 20, **input_extra},
        model={"path": str(model_dir), "max_length": MAX_LEN, "dtype": "float32"},
        task=task,
        engine={"max_tokens_per_batch": 256, "max_rows_per_batch": 16},
        output={"path": str(tmp_path / "out")},
        cluster={"processes": False, "n_workers": 1, "dashboard_address": "127.0.0.1:0"},
    )
    return make_plan(load_job(path, list(overrides)))


def _read(plan) -> pl.DataFrame:
    files = sorted(plan.output_root.glob("run_date=*/*.parquet"))
    return pl.read_parquet(files).sort("id")


def _direct(model_dir, texts, head="base"):
    tok = AutoTokenizer.from_pretrained(model_dir)
    cls = AutoModelForSequenceClassification if head == "classifier" else AutoModel
    model = cls.from_pretrained(model_dir).eval()
    out = []
    with torch.inference_mode():
        for t in texts:
            enc = tok(t, truncation=True, max_length=MAX_LEN, return_tensors="pt")
            res = model(**enc)
            out.append(res.logits[0] if head == "classifier"
                       else res.last_hidden_state[0].mean(0))
    return torch.stack(out)


@pytest.mark.parametrize("chunk", [None, 4], ids=["whole-shard", "chunks-of-4"])
def test_embed_job_matches_direct_forward(tmp_path, tiny_bert, corpus, chunk):
    """Also with each shard tokenized and run in chunks (engine.tokenize_chunk_rows, the
    GPU default): same rows, same values, same token counts and flags."""
    _, rows = corpus
    plan = _job(tmp_path, tiny_bert, {"kind": "embed"},
                [f"engine.tokenize_chunk_rows={chunk}"] if chunk else ())
    assert len(plan.shards) == 9 and len({s.path for s in plan.shards}) == 3
    result = run_job(plan)
    assert result.ok and len(result.records) == 9 and result.skipped == 0

    df = _read(plan)
    assert df["id"].to_list() == [r["id"] for r in rows]
    ok = [r for r in rows if r["text"] and r["text"].strip()]
    good = df.filter(pl.col("error").is_null())
    assert good["id"].to_list() == [r["id"] for r in ok]
    got = torch.tensor(good["embedding"].to_list())
    # tiny_bert is a plain HF model (no sentence-transformers files): mean pooling and no
    # normalisation, as SentenceTransformer(tiny_bert) would do
    want = _direct(tiny_bert, [r["text"] for r in ok])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)

    bad = df.filter(pl.col("error").is_not_null())
    assert sorted(bad["error"].to_list()) == ["empty text"] * 6 + ["null text"] * 3
    assert bad["embedding"].null_count() == 9
    assert df["lang"].unique().to_list() == ["en"]
    assert df.filter(pl.col("truncated"))["num_tokens"].unique().to_list() == [MAX_LEN]

    part = next(plan.output_root.glob("run_date=*/*.parquet"))
    schema = pq.read_schema(part)
    assert schema.names == ["id", "lang", "embedding", "num_tokens", "truncated", "error",
                            "content_hash", "job_fingerprint", "run_id"]
    emb_type = schema.field("embedding").type
    assert pa.types.is_fixed_size_list(emb_type) and emb_type.list_size == 32
    assert emb_type.value_type == pa.float32()
    meta = json.loads(schema.metadata[b"lepton_batch"])
    assert meta["job_fingerprint"] == plan.job_fingerprint and meta["dtype"] == "float32"
    assert meta["model_revision"] == plan.model.revision and "torch==" in meta["versions"]
    assert json.loads(meta["settings"])["max_length"] == MAX_LEN
    assert json.loads((plan.output_root / "_SUCCESS").read_text())["rows"] == len(rows)
    # one worker, one model load: every later shard reused the cached engine
    assert sum(r.model_load_seconds > 0 for r in result.records) == 1
    # time to first batch: each shard notes when its first batch started; the run reports
    # the earliest, from its own start
    assert all(result.started < r.first_batch_at for r in result.records)
    first = min(r.first_batch_at for r in result.records) - result.started
    assert result.first_batch_seconds == round(first, 3) and 0 < first < result.seconds
    report = json.loads(next(plan.output_root.glob("_runs/*/report.json")).read_text())
    assert report["first_batch_seconds"] == result.first_batch_seconds


def test_token_estimate_counts_as_the_model_tokenizer(tmp_path, tiny_bert, corpus):
    """The ETA's sample is tokenized from tokenizer.json without transformers; its counts
    (special tokens included, truncated at max_length) are AutoTokenizer's."""
    from lepton_batch.plan.estimate import _sample_tokenizer

    plan = _job(tmp_path, tiny_bert, {"kind": "embed"})
    texts = [r["text"] for r in corpus[1] if r["text"] and r["text"].strip()]
    texts += ["word " * 300, "x"]
    ids = AutoTokenizer.from_pretrained(tiny_bert)(texts, truncation=True,
                                                   max_length=MAX_LEN)["input_ids"]
    counts = _sample_tokenizer(plan)(texts)
    assert counts == [len(x) for x in ids] and counts[-2] == MAX_LEN


def test_shard_work_builds_one_pipeline_per_worker(tmp_path, tiny_bert, corpus):
    """A run's shards share one ShardWork, planned on the driver with its engine config
    (head, threads) resolved; a worker builds its pipeline once for it, one more only for
    a shard running beside another (a pipeline holds one shard's state), and anew for
    another run's work."""
    import pickle
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    from lepton_batch.plan.work import shard_work
    from lepton_batch.run.worker import PipelineCache

    plan = _job(tmp_path, tiny_bert, {"kind": "embed"})
    work = shard_work(plan, "run-1", "_staging/run-1")
    assert pickle.loads(pickle.dumps(work)) == work
    assert work.engine.head == "base" and work.engine.threads == work.batching.threads >= 1
    assert work.columns == ("id", "lang", "text") and work.task_columns == ("text",)
    cache = PipelineCache()
    with cache.checkout(work) as first:
        pass
    with cache.checkout(work) as again:
        assert again is first
    meet = Barrier(2)

    def side_by_side(_):
        with cache.checkout(work) as pipeline:
            meet.wait(timeout=10)
            return pipeline

    with ThreadPoolExecutor(2) as pool:
        both = list(pool.map(side_by_side, range(2)))
    assert both[0] is not both[1] and cache.builds == 2
    with cache.checkout(shard_work(plan, "run-2", "_staging/run-2")) as other:
        assert other is not first and cache.builds == 3


def test_classify_with_head_matches_softmax(tmp_path, tiny_bert_cls, corpus):
    _, rows = corpus
    plan = _job(tmp_path, tiny_bert_cls, {"kind": "classify", "top_k": 2})
    assert run_job(plan).ok
    good = _read(plan).filter(pl.col("error").is_null())
    texts = [r["text"] for r in rows if r["text"] and r["text"].strip()]
    probs = torch.softmax(_direct(tiny_bert_cls, texts, "classifier"), -1)
    top = torch.topk(probs, 2, dim=-1)
    assert good["label"].to_list() == [LABELS[i] for i in top.indices[:, 0].tolist()]
    assert good["labels"].to_list() == [[LABELS[i] for i in r] for r in top.indices.tolist()]
    torch.testing.assert_close(torch.tensor(good["scores"].to_list()), top.values,
                               atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("chunk", [None, 3], ids=["rest-whole", "rest-in-chunks-of-3"])
def test_first_shard_tokenized_while_the_worker_warms_up(tmp_path, tiny_bert, corpus,
                                                          monkeypatch, chunk):
    """A worker tokenizes its first shard's leading rows while its warm-up still imports
    the model stack (here: 2 slices of 4 rows, then the warm-up ends); the engine takes
    those ids and tokenizes only the rest. Same values, token counts, flags and errors as
    a run that tokenized every row itself."""
    from lepton_batch.engine import tokens
    from lepton_batch.engine.encoder import Encoder
    from lepton_batch.run import cluster

    monkeypatch.setattr(tokens, "PRETOKENIZE_ROWS", 4)
    adopted: list = []
    adopt = Encoder.adopt
    monkeypatch.setattr(Encoder, "adopt",
                        lambda self, pre: adopted.append(adopt(self, pre)) or adopted[-1])
    chunks = [f"engine.tokenize_chunk_rows={chunk}"] if chunk else []
    frames = {}
    for name, warm_checks in (("itself", 0), ("early", 3)):
        checks = iter(range(warm_checks))
        monkeypatch.setattr(cluster, "_warming", lambda it=checks: next(it, None) is not None)
        plan = _job(tmp_path, tiny_bert, {"kind": "embed"},
                    [*chunks, f"output.path={tmp_path / name}"])
        assert run_job(plan).ok
        frames[name] = _read(plan)
    assert [len(t) for t in adopted if t is not None] == [8]  # the first shard only
    itself, early = frames["itself"], frames["early"]
    cols = ["id", "num_tokens", "truncated", "error"]
    assert itself.select(cols).equals(early.select(cols))
    torch.testing.assert_close(torch.tensor(early["embedding"].drop_nulls().to_list()),
                               torch.tensor(itself["embedding"].drop_nulls().to_list()),
                               atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("chunk", [None, 3], ids=["whole-shard", "chunks-of-3"])
def test_zero_shot_classify_uses_label_embeddings(tmp_path, tiny_bert, corpus, chunk):
    _, rows = corpus
    labels = {"files": "files and directories", "net": "network sockets", "math": "numbers"}
    plan = _job(tmp_path, tiny_bert, {"kind": "classify", "labels": labels, "top_k": 3},
                [f"engine.tokenize_chunk_rows={chunk}"] if chunk else ())
    assert run_job(plan).ok
    good = _read(plan).filter(pl.col("error").is_null())
    texts = [r["text"] for r in rows if r["text"] and r["text"].strip()]
    row_emb = F.normalize(_direct(tiny_bert, texts), dim=-1)
    label_emb = F.normalize(_direct(tiny_bert, list(labels.values())), dim=-1)
    sims = row_emb @ label_emb.T
    names = list(labels)
    assert good["label"].to_list() == [names[i] for i in sims.argmax(-1).tolist()]
    torch.testing.assert_close(torch.tensor(good["score"].to_list()), sims.max(-1).values,
                               atol=1e-5, rtol=1e-4)
    assert all(len(x) == 3 for x in good["labels"].to_list())


def test_resume_recomputes_only_the_missing_shard(tmp_path, tiny_bert, corpus):
    plan = _job(tmp_path, tiny_bert, {"kind": "embed"})
    assert run_job(plan).ok
    first = _read(plan)
    victim = plan.shards[4]
    part = next(plan.output_root.glob(f"run_date=*/{victim.part_name}"))
    part.unlink()
    (plan.output_root / "_manifest" / f"{victim.fingerprint}.json").unlink()

    again = run_job(plan)
    assert again.ok and again.skipped == 8
    assert [r.shard_fingerprint for r in again.records] == [victim.fingerprint]
    second = _read(plan)
    # The same rows and values; run_id says which run computed each row.
    assert second.drop("run_id").equals(first.drop("run_id"))
    assert second.filter(pl.col("run_id") == again.run_id).height == victim.num_rows

    nothing = run_job(plan)
    assert nothing.skipped == 9 and nothing.records == []


def test_crash_between_part_and_record_leaves_no_duplicate(tmp_path, tiny_bert, corpus):
    plan = _job(tmp_path, tiny_bert, {"kind": "embed"})
    assert run_job(plan).ok
    victim = plan.shards[0]
    part = next(plan.output_root.glob(f"run_date=*/{victim.part_name}"))
    # A crash after the rename but before the record: the part exists, the record does not;
    # a half-written temp file is also left behind, in an older partition.
    (plan.output_root / "_manifest" / f"{victim.fingerprint}.json").unlink()
    old = plan.output_root / "run_date=2000-01-01"
    old.mkdir()
    part.rename(old / part.name)
    (old / f".{part.name}.tmp-123").write_bytes(b"partial")
    again = run_job(plan)
    assert [r.shard_fingerprint for r in again.records] == [victim.fingerprint]
    assert not old.exists()  # its only files were the orphan part and the temp file
    df = _read(plan)
    assert df["id"].n_unique() == df.height == 135


def test_changed_input_replaces_its_shards(tmp_path, tiny_bert, corpus):
    plan = _job(tmp_path, tiny_bert, {"kind": "embed"})
    assert run_job(plan).ok
    write_corpus(tmp_path / "in", n_files=1, rows=30, bad=False)  # rewrites corpus-0
    os.utime(tmp_path / "in" / "corpus-0.parquet", ns=(1, 1))
    plan2 = make_plan(plan.job)
    result = run_job(plan2)
    assert result.ok and len(result.records) == 2 and result.skipped == 6
    df = _read(plan2)
    assert df.height == 30 + 90 and df["id"].n_unique() == df.height


def test_overwrite_and_foreign_output(tmp_path, tiny_bert, corpus):
    plan = _job(tmp_path, tiny_bert, {"kind": "embed"})
    assert run_job(plan).ok
    plan_ow = _job(tmp_path, tiny_bert, {"kind": "embed"}, ["output.mode=overwrite"])
    again = run_job(plan_ow)
    assert len(again.records) == 9 and again.skipped == 0
    assert _read(plan_ow).height == 135

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.csv").write_text("keep me")
    with pytest.raises(JobSpecError, match="holds no lepton-batch output"):
        _job(tmp_path, tiny_bert, {"kind": "embed"}, [f"output.path={foreign}"])
    with pytest.raises(OutputError, match="holds no lepton-batch output"):
        run_job(dataclasses.replace(plan, output_root=foreign))
    assert (foreign / "precious.csv").read_text() == "keep me"


def test_changed_task_is_recomputed_not_mixed(tmp_path, tiny_bert, corpus):
    plan = _job(tmp_path, tiny_bert, {"kind": "embed"})
    assert run_job(plan).ok
    plan_cls = _job(tmp_path, tiny_bert, {"kind": "embed", "pooling": "cls"})
    assert plan_cls.job_fingerprint != plan.job_fingerprint
    result = run_job(plan_cls)
    assert len(result.records) == 9 and result.skipped == 0
    assert len(list(plan.output_root.glob("_manifest/*.json"))) == 9


def test_failed_shard_keeps_the_others_and_resumes(tmp_path, tiny_bert, corpus):
    plan = _job(tmp_path, tiny_bert, {"kind": "embed"}, ["cluster.retries=0"])
    target = tmp_path / "in" / "corpus-2.parquet"
    good_bytes = target.read_bytes()
    target.write_bytes(b"not parquet at all")  # breaks after planning, as a flaky disk would
    result = run_job(plan)
    assert not result.ok and len(result.failures) == 3 and len(result.records) == 6
    assert not (plan.output_root / "_SUCCESS").exists()

    target.write_bytes(good_bytes)
    again = run_job(make_plan(plan.job))
    assert again.ok and again.skipped == 6 and len(again.records) == 3
    assert _read(plan).height == 135 and (plan.output_root / "_SUCCESS").exists()


def test_binary_text_with_invalid_utf8_is_a_row_error(tmp_path, tiny_bert):
    folder = tmp_path / "in"
    folder.mkdir()
    texts = [b"plain ascii", b"caf\xc3\xa9 au lait", b"\xff\xfe broken", None, b""]
    pq.write_table(pa.table({"id": pa.array(range(5), pa.int64()),
                             "text": pa.array(texts, pa.binary()),
                             "lang": ["en"] * 5}), folder / "bin.parquet")
    plan = _job(tmp_path, tiny_bert, {"kind": "embed", "normalize": True})
    assert run_job(plan).ok
    df = _read(plan)
    assert df["error"].to_list() == [None, None, "invalid UTF-8 at byte 0", "null text",
                                     "empty text"]
    assert df["embedding"].is_null().to_list() == [False, False, True, True, True]
    want = F.normalize(_direct(tiny_bert, ["plain ascii", "café au lait"]), dim=-1)
    torch.testing.assert_close(torch.tensor(df["embedding"].to_list()[:2]), want,
                               atol=2e-5, rtol=1e-4)


def test_record_pointing_outside_the_output_is_not_trusted(tmp_path, tiny_bert, corpus):
    plan = _job(tmp_path, tiny_bert, {"kind": "embed"})
    assert run_job(plan).ok
    outside = tmp_path / "outside.parquet"
    outside.write_bytes(b"not ours")
    victim = plan.shards[2]
    record_file = plan.output_root / "_manifest" / f"{victim.fingerprint}.json"
    record = json.loads(record_file.read_text())
    record["part"] = "../outside.parquet"
    record_file.write_text(json.dumps(record))
    again = run_job(plan)
    assert [r.shard_fingerprint for r in again.records] == [victim.fingerprint]
    assert outside.read_bytes() == b"not ours"
    assert _read(plan).height == 135
