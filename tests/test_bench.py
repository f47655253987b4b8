"""``lepton-batch bench`` on a tiny random BERT: the structure of its figures, never their
speed."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import sample_texts
from transformers import BertConfig

from lepton_batch.bench.embed import run_bench
from lepton_batch.bench.measure import encoder_flops
from lepton_batch.bench.methods import BenchConfig


def test_encoder_flops_formula():
    config = BertConfig(hidden_size=8, num_hidden_layers=2, intermediate_size=32)
    # per token and layer: 2 * (4 * 8 * 8 + 2 * 8 * 32) = 1536; attention 4 * 8 * L^2
    seq = np.array([3, 3, 5])
    want = 11 * 1536 * 2 + 4 * 8 * 2 * (9 + 9 + 25)
    assert encoder_flops(config, 11, seq) == want


def test_bad_options_fail_before_loading():
    with pytest.raises(ValueError, match="--methods"):
        BenchConfig(methods=("engine", "nope")).check()
    BenchConfig(methods=("engine", "engine-compile", "submit-fp32")).check()  # named: allowed
    assert {"engine-compile", "submit-fp32"}.isdisjoint(BenchConfig().methods)  # not default
    with pytest.raises(ValueError, match="positive"):
        BenchConfig(rows=0).check()


def _corpus(tmp_path):
    corpus = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"text": sample_texts(25)}), corpus)
    return corpus


def test_bench_on_tiny_bert(tmp_path, tiny_bert):
    methods = ("engine", "engine-fp32", "st-default", "submit", "submit-fp32")
    cfg = BenchConfig(model=str(tiny_bert), corpus=str(_corpus(tmp_path)), rows=40,
                      repeats=1, device="cpu", methods=methods, tune_rows=16)
    result = run_bench(cfg)

    assert result.rows == 40
    assert "repeated to 40" in result.notes[0]  # 25 usable rows scaled up
    assert result.settings["max_length"] == 128  # tiny_bert's tokenizer limit
    assert set(result.gemm_peak_tflops) == {"float32", "bfloat16", "int8"}
    assert all(t > 0 for t in result.gemm_peak_tflops.values())
    by_name = {m.name: m for m in result.methods}
    assert list(by_name) == ["st-default", "engine", "engine-fp32", "submit", "submit-fp32"]
    assert by_name["submit-fp32"].dtype == "float32"
    ran = [m for m in result.methods if not m.skipped]
    for m in ran:
        assert m.rows == 40 and len(m.seconds) == 1 and m.rate > 0, m
        assert 0 < m.tokens <= m.padded_tokens and 0 < m.tokens / m.padded_tokens <= 1, m
        assert m.flops > 0 and m.tflops > 0
        assert len(m.rss_mib) == 1 and m.gpu_busy is None  # CPU: no GPU busy share
        assert m.cos_min is not None and not math.isnan(m.cos_min)
    # The reference is the engine in fp32: whichever of engine / engine-fp32 ran as fp32.
    fp32 = by_name["engine-fp32"]
    if fp32.skipped:
        assert "same as engine" in fp32.skipped and by_name["engine"].dtype == "float32"
        assert result.reference == "engine"
    else:
        assert fp32.dtype == "float32" and result.reference == "engine-fp32"
    ref = by_name[result.reference]
    assert ref.cos_min == pytest.approx(1.0, abs=1e-6)
    # Same rows in the same order through sentence-transformers and the whole job.
    for name in ("st-default", "submit", "submit-fp32"):
        assert by_name[name].cos_min > 0.9999, by_name[name]

    out = tmp_path / "bench.json"
    result.write_json(out)
    data = json.loads(out.read_text())
    raw = {m["name"]: m for m in data["methods"]}
    assert raw["submit"]["seconds"] and raw["submit"]["rows_per_s"][0] > 0
    assert data["machine"]["threads"] and data["config"]["rows"] == 40


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bench_on_cuda(tmp_path, tiny_bert):
    cfg = BenchConfig(model=str(tiny_bert), corpus=str(_corpus(tmp_path)), rows=40,
                      repeats=1, device="cuda", methods=("engine", "st-default"), tune_rows=16)
    result = run_bench(cfg)
    for m in result.methods:
        assert m.rate > 0 and m.cuda_mib and m.busy and 0 <= m.gpu_busy <= 1, m


def test_a_repeated_corpus_has_no_identical_rows(tmp_path):
    """--rows beyond the corpus repeats it; submit computes identical rows once, so each
    copy is marked, or submit would skip the work the other methods do."""
    from conftest import write_corpus

    from lepton_batch.bench.corpus import load_rows

    write_corpus(tmp_path, n_files=1, rows=30, bad=False)
    texts, note = load_rows(str(tmp_path), 100)
    assert len(texts) == 100 and len(set(texts)) == 100
    assert texts[:30] == sample_texts(30) and texts[30] == f"{texts[0]} (1)"
    assert "repeated to 100" in note


def test_generate_bench_on_a_tiny_llama(tmp_path):
    """``bench --task generate`` end to end: both methods on the same prompts and planned
    lengths, greedy tokens compared, useful rates over the planned tokens."""
    from lepton_batch.bench.generate import GenConfig, planned_lengths, run_generate_bench

    cfg = GenConfig(corpus=str(_corpus(tmp_path)), rows=12, batch=4, max_new=16,
                    max_prompt=24, min_prompt=8, repeats=2, device="cpu", dtype="float32",
                    layers=2, hidden=64)
    result = run_generate_bench(cfg, say=lambda _: None)
    assert [m.name for m in result.methods] == ["hf-generate", "lepton-batch"]  # no eager on CPU
    assert result.planned_tokens == int(planned_lengths(12, 16, "exp").sum())
    for m in result.methods:
        assert len(m.seconds) == 2 and m.useful_tokens == result.planned_tokens
        assert m.computed_tokens >= m.useful_tokens and m.rate > 0
    hf, ours = result.methods
    assert ours.computed_tokens < hf.computed_tokens  # no row waits on its batch's longest
    assert result.identical_rows >= 0.9  # a float near-tie under left padding may flip one
    assert 8 * 12 <= result.prompt_tokens <= 24 * 12
    json.dumps(result.to_json(), default=str)
    with pytest.raises(ValueError, match="--min-prompt"):
        GenConfig(min_prompt=300, max_prompt=256).check()


def test_spread_prompts_cover_the_range():
    from lepton_batch.bench.generate import spread_prompts

    rows = [[1, *range(10 + i, 20 + i)] for i in range(5)]  # BOS 1, ten tokens each
    out = spread_prompts(rows * 20, 8, 40, bos=1)
    lengths = [len(p) for p in out]
    assert len(out) == 100 and min(lengths) >= 8 and max(lengths) <= 40
    assert max(lengths) - min(lengths) > 20  # spread, unlike the corpus's own 11
    assert all(p[0] == 1 and 1 not in p[1:] for p in out)  # one BOS, at the start
    assert out == spread_prompts(rows * 20, 8, 40, bos=1)  # seeded
    assert [len(p) for p in spread_prompts(rows, 3, 3, bos=None)] == [3] * 5
