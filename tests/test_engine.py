"""The engine against a direct, unbatched transformers forward on the same tiny model."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import sample_texts
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from lepton_batch.engine import BatchStats, Encoder, EngineCache, EngineConfig, plan_batches


def test_plan_batches_respects_budget_and_covers_all():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, size=500)
    batches = plan_batches(lengths, max_tokens=1024, max_rows=64)
    seen = np.concatenate(batches)
    assert sorted(seen.tolist()) == list(range(500))
    for b in batches:
        assert len(b) <= 64
        assert len(b) * lengths[b].max() <= 1024 or len(b) == 1
    longest_first = [lengths[b].max() for b in batches]
    assert longest_first == sorted(longest_first, reverse=True)


def test_plan_batches_single_row_over_budget():
    batches = plan_batches(np.array([5000, 3, 3]), max_tokens=100, max_rows=8)
    assert [b.tolist() for b in batches] == [[0], [1, 2]]


def _reference_embed(model_dir, texts, max_length, pooling="mean"):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    out = []
    with torch.inference_mode():
        for t in texts:  # one row at a time: no padding at all
            enc = tok(t, truncation=True, max_length=max_length, return_tensors="pt")
            hidden = model(**enc).last_hidden_state[0]
            out.append(hidden.mean(0) if pooling == "mean" else hidden[0])
    return F.normalize(torch.stack(out), dim=-1)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_embed_matches_unbatched_forward(tiny_bert, pooling):
    texts = sample_texts(120)
    engine = Encoder(EngineConfig(model_dir=str(tiny_bert), head="base", max_length=64,
                                 dtype="float32"))
    tok = engine.tokenize(texts)
    stats = BatchStats()
    got = engine.embed(tok, pooling, True, max_tokens=512, max_rows=16, stats=stats)
    want = _reference_embed(tiny_bert, texts, 64, pooling)
    assert got.shape == (120, 32) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert stats.batches > 1 and stats.tokens == int(tok.lengths.sum())
    assert stats.padded_tokens >= stats.tokens


def test_truncation_is_flagged(tiny_bert):
    engine = Encoder(EngineConfig(model_dir=str(tiny_bert), head="base", max_length=16,
                                 dtype="float32"))
    long_text = " ".join(sample_texts(50))
    tok = engine.tokenize(["short text", long_text])
    assert tok.truncated.tolist() == [False, True]
    assert tok.lengths[1] == 16
    sep = engine.tokenizer.sep_token_id
    assert tok.row(1)[-1] == sep and tok.row(0)[-1] == sep


@pytest.mark.parametrize("side", ["right", "left"])
def test_tokenize_gives_the_hugging_face_ids(tiny_bert, tmp_path, side):
    """One truncating pass through the Rust backend: the ids, lengths and flags of the
    Hugging Face call with truncation=True (on the tokenizer's truncation_side), for rows
    under, at and over max_length."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_bert, model)
    hf = AutoTokenizer.from_pretrained(model, truncation_side=side)
    hf.save_pretrained(model)
    engine = Encoder(EngineConfig(model_dir=str(model), head="base", max_length=16,
                                 dtype="float32"))
    words = " ".join(sample_texts(30)).split()
    texts = [" ".join(words[:k]) for k in range(0, 40)] + sample_texts(60)
    full = [len(x) for x in hf(texts)["input_ids"]]
    assert 16 in full and min(full) < 16 < max(full)  # under, at and over the limit
    tok = engine.tokenize(texts)
    want = hf(texts, truncation=True, max_length=16)["input_ids"]
    assert [tok.row(i) for i in range(len(texts))] == want
    assert tok.truncated.tolist() == [n > 16 for n in full]
    assert tok.lengths.tolist() == [len(x) for x in want]


def test_logits_match_direct_forward(tiny_bert_cls):
    texts = sample_texts(40)
    engine = Encoder(EngineConfig(model_dir=str(tiny_bert_cls), head="classifier", max_length=64,
                                 dtype="float32"))
    got = engine.logits(engine.tokenize(texts), max_tokens=256, max_rows=8)
    tok = AutoTokenizer.from_pretrained(tiny_bert_cls)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_cls).eval()
    with torch.inference_mode():
        want = torch.cat([model(**tok(t, truncation=True, max_length=64,
                                      return_tensors="pt")).logits for t in texts])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_pretokenized_ids_are_the_engines_own(tiny_bert):
    """What a warming worker tokenizes with the model's tokenizer.json alone is what the
    engine's tokenizer gives (ids, truncation flags); ids from another tokenizer setup are
    refused, and nothing is tokenized early without a warm-up or once the engine loaded."""
    import dataclasses

    cfg = EngineConfig(model_dir=str(tiny_bert), head="base", max_length=32, dtype="float32")
    texts = sample_texts(40) + [" ".join(sample_texts(30))]  # the last row is cut
    pre = EngineCache(warming=lambda: True).pretokenize(cfg, texts)
    engine = Encoder(cfg)
    got, want = engine.adopt(pre), engine.tokenize(texts)
    assert got is not None and want.truncated[-1] and not want.truncated[0]
    for name in ("flat", "offsets", "lengths", "truncated"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
    shorter = dataclasses.replace(cfg, max_length=16)
    assert engine.adopt(EngineCache(warming=lambda: True).pretokenize(shorter, texts)) is None
    assert engine.adopt(None) is None
    assert EngineCache().pretokenize(cfg, texts) is None  # no warm-up to overlap
    cache = EngineCache(warming=lambda: True)
    cache.get(cfg)
    assert cache.pretokenize(cfg, texts) is None  # the engine is loaded: it tokenizes


def test_pretokenize_stops_when_the_warm_up_ends(tiny_bert, monkeypatch):
    from lepton_batch.engine import tokens

    monkeypatch.setattr(tokens, "PRETOKENIZE_ROWS", 4)
    answers = iter([True, True, True, False])  # the check before, then one per 4 rows
    cfg = EngineConfig(model_dir=str(tiny_bert), head="base", max_length=32, dtype="float32")
    pre = EngineCache(warming=lambda: next(answers)).pretokenize(cfg, sample_texts(20))
    assert len(pre) == 8


def test_cache_loads_once_and_cpu_defaults(tiny_bert):
    cache = EngineCache()
    cfg = EngineConfig(model_dir=str(tiny_bert), head="base", max_length=32)
    assert cache.get(cfg) is cache.get(cfg)
    assert cache.loads == 1
    engine = cache.get(cfg)
    from lepton_batch.engine.load import cpu_bf16_speedup

    # dtype auto follows the GEMM measurement (cached per process, so this is the figure
    # the engine saw): comparing with the CPU flags alone failed when a loaded machine
    # measured bf16 no faster
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert engine.device == "cpu"
    assert engine.dtype == (torch.bfloat16 if cpu_bf16_speedup() > 1.2 else torch.float32)
    assert native or engine.dtype == torch.float32
    assert engine.attn_implementation == "packed/sdpa_padded"
    assert engine.token_budget(None) == 4096 and engine.token_budget(100) == 100


def test_chunk_bounds_cover_every_row_once_in_order():
    from lepton_batch.run.worker import FIRST_CHUNK_ROWS, chunk_bounds

    assert chunk_bounds(0, None) == [(0, 0)] and chunk_bounds(0, 8) == [(0, 0)]
    assert chunk_bounds(5000, None) == [(0, 5000)] and chunk_bounds(10, 10) == [(0, 10)]
    assert chunk_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    bounds = chunk_bounds(20_000, 8192)
    assert bounds[0] == (0, FIRST_CHUNK_ROWS) and bounds[-1][1] == 20_000
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    assert {b - a for a, b in bounds[1:-1]} == {8192}
