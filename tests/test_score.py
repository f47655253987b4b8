"""``score``: log-probabilities against a direct forward's log-softmax, continuations, the
context limit and rows with nothing to score."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import sample_texts, write_job
from transformers import AutoModelForCausalLM, AutoTokenizer

from lepton_batch.job.spec import load_job
from lepton_batch.plan.build import make_plan
from lepton_batch.run.lifecycle import run_job


def _direct(model_dir, ids: list[int], first: int) -> float:
    """sum over t >= first of log p(ids[t] | ids[:t]) from one plain forward."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0].float()
    lp = logits.log_softmax(-1)
    return float(sum(lp[t - 1, ids[t]] for t in range(first, len(ids))))


def _job(tmp_path, model_dir, task, table: pa.Table):
    (tmp_path / "in").mkdir(exist_ok=True)
    pq.write_table(table, tmp_path / "in" / "rows.parquet", row_group_size=8)
    path = write_job(
        tmp_path / "job.yaml", name="score-job",
        input={"path": str(tmp_path / "in"), "rows_per_shard": 8},
        model={"path": str(model_dir), "dtype": "float32"},
        task=task,
        # A small budget: several batches per shard, rows of different lengths padded.
        engine={"max_tokens_per_batch": 300, "max_rows_per_batch": 4},
        output={"path": str(tmp_path / "out")},
        cluster={"processes": False, "n_workers": 1, "dashboard_address": "127.0.0.1:0"},
    )
    plan = make_plan(load_job(path))
    assert run_job(plan).ok
    return pl.read_parquet(sorted(plan.output_root.glob("run_date=*/*.parquet"))).sort("id")


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_score_equals_a_direct_log_softmax(tmp_path, arch, request):
    model_dir = request.getfixturevalue(arch)
    texts = sample_texts(20)
    texts[4] = " ".join(sample_texts(40))  # over the 256-token context: cut from the left
    texts[9] = "a"  # one token: nothing to score without a BOS
    table = pa.table({"id": pa.array(range(20), pa.int64()), "text": texts})
    df = _job(tmp_path, model_dir, {"kind": "score"}, table)
    tok = AutoTokenizer.from_pretrained(model_dir)
    bos = tok("a")["input_ids"][0] == tok.bos_token_id
    for row in df.iter_rows(named=True):
        ids = tok(texts[row["id"]])["input_ids"]
        if len(ids) > 256:
            assert row["truncated"]
            ids = ids[-256:]
        if len(ids) < 2:
            assert not bos and row["error"].startswith("nothing to score")
            assert row["logprob"] is None
            continue
        want = _direct(model_dir, ids, 1)
        assert row["error"] is None and row["tokens"] == len(ids) - 1
        assert abs(row["logprob"] - want) < 1e-4 * max(1.0, abs(want) / 100)
        assert math.isclose(row["mean_logprob"], row["logprob"] / row["tokens"])
        assert math.isclose(row["perplexity"], math.exp(-row["mean_logprob"]))


def test_continuation_scores_only_the_continuation(tmp_path, tiny_llama):
    questions = [t[:80] for t in sample_texts(10)]
    answers = [" yes", " no", " it depends on the module", None, " maybe"] * 2
    table = pa.table({"id": pa.array(range(10), pa.int64()), "text": questions,
                      "answer": answers})
    df = _job(tmp_path, tiny_llama, {"kind": "score", "prompt": "Q: {text}\nA:",
                                     "continuation_column": "answer"}, table)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    for row in df.iter_rows(named=True):
        i = row["id"]
        if answers[i] is None:
            assert row["error"] == "answer: null text"
            continue
        prompt = tok(f"Q: {questions[i]}\nA:")["input_ids"]
        cont = tok(answers[i], add_special_tokens=False)["input_ids"]
        want = _direct(tiny_llama, prompt + cont, len(prompt))
        assert row["tokens"] == len(cont)
        assert abs(row["logprob"] - want) < 1e-4


def test_score_batches_do_not_change_the_figures(tmp_path, tiny_llama):
    import time

    from lepton_batch.engine import BatchStats, EngineConfig, Tokenized
    from lepton_batch.engine.decoder import Decoder

    dec = Decoder(EngineConfig(str(tiny_llama), "causal_lm", dtype="float32", device="cpu",
                               max_length=256))
    ids = dec.tokenizer(sample_texts(12), verbose=False)["input_ids"]
    ids = [r[:200] for r in ids]
    tok = Tokenized.from_lists(ids, np.zeros(12, dtype=bool))
    first = np.ones(12, dtype=np.int64)
    one, n1 = dec.score(tok, first, max_tokens=100_000, max_rows=64)
    stats, before = BatchStats(), time.time()
    many, n2 = dec.score(tok, first, max_tokens=64, max_rows=2, stats=stats)
    assert np.array_equal(n1, n2)
    assert np.allclose(one, many, atol=1e-4)
    assert stats.batches > 1 and before <= stats.first_batch_at <= time.time()


def test_likelihood_classify_picks_the_most_likely_label(tmp_path, tiny_llama):
    texts = [t[:120] for t in sample_texts(10)]
    labels = {"yes": "yes", "no": "no", "maybe": "maybe so"}
    table = pa.table({"id": pa.array(range(10), pa.int64()), "text": texts})
    df = _job(tmp_path, tiny_llama, {"kind": "classify", "method": "likelihood",
                                     "prompt": "{text}\nIs this about files?",
                                     "labels": labels, "top_k": 3}, table)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    for row in df.iter_rows(named=True):
        prompt = tok(f"{texts[row['id']]}\nIs this about files?")["input_ids"]
        lp = torch.tensor([_direct(tiny_llama, prompt + tok(" " + d, add_special_tokens=False)
                                   ["input_ids"], len(prompt)) for d in labels.values()])
        probs = lp.softmax(-1)
        best = int(probs.argmax())
        assert row["label"] == list(labels)[best]
        assert abs(row["score"] - float(probs[best])) < 1e-4
        assert sorted(row["scores"], reverse=True) == row["scores"]
        assert abs(sum(row["scores"]) - 1) < 1e-4


def test_causal_lm_with_labels_asks_for_a_method(tmp_path, tiny_llama):
    from lepton_batch.job.spec import JobSpecError

    table = pa.table({"id": pa.array(range(3), pa.int64()), "text": ["a b", "c d", "e f"]})
    with pytest.raises(JobSpecError, match="set method: likelihood"):
        _job(tmp_path, tiny_llama, {"kind": "classify", "labels": ["x", "y"]}, table)
