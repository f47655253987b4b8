"""Batching invariants, the packed forward against Hugging Face's padded one, reduced
precision against fp32, and the quality gate — all on tiny random models loaded through
``from_pretrained(local_dir)``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import LABELS, _bert_config, _tokenizer, built_once, sample_texts

from lepton_batch.engine import (
    BatchStats,
    Encoder,
    EngineConfig,
    QualityError,
    collate,
    plan_batches,
)

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return sample_texts(150)


@pytest.fixture(scope="session")
def tiny_roberta(tmp_path_factory):
    """A random RobertaModel (positions counted from pad + 1) with the WordPiece tokenizer."""
    from transformers import AutoTokenizer, RobertaConfig, RobertaModel

    def build(path: Path) -> None:
        _tokenizer(path)
        tok = AutoTokenizer.from_pretrained(path)
        torch.manual_seed(3)
        cfg = RobertaConfig(**_bert_config(len(tok)).to_dict())
        cfg.pad_token_id, cfg.max_position_embeddings, cfg.type_vocab_size = (
            tok.pad_token_id, 132, 1)
        RobertaModel(cfg).eval().save_pretrained(path)

    return built_once(tmp_path_factory, "tiny-roberta", build)


@pytest.mark.parametrize("packed", [False, True])
def test_plans_cover_every_row_once_within_budget(packed):
    rng = np.random.default_rng(1)
    lengths = np.concatenate([rng.integers(1, 40, 400), rng.integers(200, 300, 5)])
    batches = plan_batches(lengths, max_tokens=1024, max_rows=64, packed=packed)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    for b in batches:
        real, padded = lengths[b].sum(), len(b) * lengths[b].max()
        assert len(b) <= 64
        if packed:
            assert (real <= 1024 and padded <= 2048) or len(b) == 1
        else:
            assert padded <= 1024 or len(b) == 1
    longest = [lengths[b].max() for b in batches]
    assert longest == sorted(longest, reverse=True)
    if packed:  # packing fits more rows per batch than padding does
        assert len(batches) < len(plan_batches(lengths, 1024, 64, packed=False))


def test_collate_packed_and_padded_hold_the_same_tokens(tiny_bert, texts):
    engine = Encoder(EngineConfig(model_dir=str(tiny_bert), head="base", max_length=64))
    tok = engine.tokenize(texts)
    rows = np.array([5, 0, 77, 3])
    padded = collate(tok, rows, engine.pad_id, packed=False, device="cpu")
    packed = collate(tok, rows, engine.pad_id, packed=True, device="cpu")
    for j, i in enumerate(rows):
        n = int(tok.lengths[i])
        assert padded.ids[j, :n].tolist() == tok.row(i) == packed.ids[
            packed.cu_seqlens[j] : packed.cu_seqlens[j + 1]].tolist()
        assert padded.mask[j].sum() == n and (padded.ids[j, n:] == engine.pad_id).all()
    assert packed.positions.tolist() == [p for i in rows for p in range(tok.lengths[i])]
    torch.testing.assert_close(packed.mask, padded.mask)


def _embed(model_dir, texts, pooling, **config):
    engine = Encoder(EngineConfig(model_dir=str(model_dir), head="base", max_length=64,
                                 **config))
    stats = BatchStats()
    out = engine.embed(engine.tokenize(texts), pooling, True, 1024, 32, stats)
    return engine, out, stats


@pytest.mark.parametrize("pooling", ["mean", "cls", "max", "lasttoken"])
@pytest.mark.parametrize("model", ["tiny_bert", "tiny_roberta"])
def test_packed_equals_padded_in_fp32(request, model, pooling, texts):
    model_dir = request.getfixturevalue(model)
    packed, got, stats = _embed(model_dir, texts, pooling, dtype="float32")
    padded, want, ref_stats = _embed(model_dir, texts, pooling, dtype="float32", packed=False)
    assert packed.attn_implementation == "packed/sdpa_padded"
    assert padded.attn_implementation == "sdpa"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert stats.tokens == ref_stats.tokens
    # Packed: no padding row per sequence; only zero rows up to a multiple of PACK_BUCKET.
    from lepton_batch.engine.packed import PACK_BUCKET

    assert stats.padded_tokens % PACK_BUCKET == 0
    assert stats.padded_tokens - stats.tokens < PACK_BUCKET * stats.batches
    assert ref_stats.padded_tokens > ref_stats.tokens


def test_packed_classifier_logits_equal_padded(tiny_bert_cls, texts):
    def logits(packed):
        e = Encoder(EngineConfig(model_dir=str(tiny_bert_cls), head="classifier", max_length=64,
                                dtype="float32", packed=packed))
        return e.logits(e.tokenize(texts), 1024, 32)

    torch.testing.assert_close(logits(True), logits(False), atol=1e-5, rtol=1e-4)
    assert logits(True).shape == (len(texts), len(LABELS))


@pytest.mark.parametrize("packed", [True, False])
def test_bf16_agrees_with_fp32_and_passes_the_gate(tiny_bert, texts, packed):
    _, want, _ = _embed(tiny_bert, texts, "mean", dtype="float32", packed=False)
    engine = Encoder(EngineConfig(model_dir=str(tiny_bert), head="base", max_length=64,
                                 dtype="bfloat16", packed=packed), sample=texts[:32])
    got = engine.embed(engine.tokenize(texts), "mean", True, 1024, 32)
    cos = F.cosine_similarity(got, want, dim=-1)
    assert cos.min() > 0.99
    q = engine.quality
    assert q is not None and q.passed and q.candidate == q.used == "bfloat16"
    assert q.metric == "min_cosine" and 0.99 < q.value <= 1.0 and q.sample_rows == 32
    assert engine.dtype == torch.bfloat16


def test_gate_falls_back_to_fp32_when_the_precision_is_too_lossy(tiny_bert, texts):
    # No bf16 result equals fp32 to the last bit: a threshold of 1.0 must refuse it.
    engine = Encoder(EngineConfig(model_dir=str(tiny_bert), head="base", max_length=64,
                                 dtype="bfloat16", min_cosine=1.0), sample=texts[:16])
    q = engine.quality
    assert not q.passed and q.candidate == "bfloat16" and q.used == "float32" and q.value < 1
    assert engine.dtype == torch.float32 and engine.packed is not None
    got = engine.embed(engine.tokenize(texts), "mean", True, 1024, 32)
    _, want, _ = _embed(tiny_bert, texts, "mean", dtype="float32", packed=False)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_gate_with_on_fail_error_refuses_to_run(tiny_bert, texts):
    with pytest.raises(QualityError, match=r"bfloat16 disagrees with float32.*min_cosine"):
        Encoder(EngineConfig(model_dir=str(tiny_bert), head="base", max_length=64,
                            dtype="bfloat16", min_cosine=1.0, on_fail="error"),
               sample=texts[:16])


def test_classifier_gate_measures_label_agreement(tiny_bert_cls, texts):
    engine = Encoder(EngineConfig(model_dir=str(tiny_bert_cls), head="classifier",
                                 max_length=64, dtype="bfloat16"), sample=texts[:40])
    q = engine.quality
    assert q.metric == "label_agreement" and 0 <= q.value <= 1 and q.sample_rows == 40
    assert q.passed == (q.value >= 0.98)


def test_int8_engine_agrees_with_fp32_and_records_the_gate(tiny_bert, texts):
    pytest.importorskip("lepton_batch.kernels.int8")
    from lepton_batch.kernels.int8 import Int8Linear

    _, want, _ = _embed(tiny_bert, texts, "mean", dtype="float32", packed=False)
    engine = Encoder(EngineConfig(model_dir=str(tiny_bert), head="base", max_length=64,
                                 dtype="float32", quantization="int8"), sample=texts[:48])
    swapped = [m for m in engine.model.modules() if isinstance(m, Int8Linear)]
    assert swapped and engine.quantization == "int8"
    q = engine.quality
    assert q.candidate == "float32+int8" and q.metric == "min_cosine"
    got = engine.embed(engine.tokenize(texts), "mean", True, 1024, 32)
    cos = F.cosine_similarity(got, want, dim=-1)
    if q.passed:
        assert engine.packed is not None and cos.min() > 0.95
    else:  # the gate fell back: the fp32 model itself
        assert engine.quantization == "none" and cos.min() > 0.9999
    assert "int8" in engine.describe() or not q.passed


def test_dense_layers_see_few_row_counts_on_cpu(tiny_bert, texts):
    """Every packed batch has its own token count; on CPU each new GEMM shape is a new
    oneDNN primitive kept in a cache, and the worker's memory grew with the corpus. The
    dense layers see row counts rounded up to PACK_BUCKET; outputs are unchanged (the
    fp32 packed-vs-padded test above)."""
    from lepton_batch.engine.packed import PACK_BUCKET

    engine = Encoder(EngineConfig(model_dir=str(tiny_bert), head="base", max_length=64,
                                 dtype="float32"))
    seen: list[int] = []
    qkv = engine.packed._qkv

    def spy(i: int, x: torch.Tensor) -> torch.Tensor:
        if i == 0:
            seen.append(x.shape[0])
        return qkv(i, x)

    engine.packed._qkv = spy
    stats = BatchStats()
    engine.embed(engine.tokenize(texts), "mean", True, 700, 32, stats)
    assert stats.batches > 3 and len(seen) == stats.batches
    assert all(n % PACK_BUCKET == 0 for n in seen), seen
    assert len(set(seen)) < stats.batches


@pytest.mark.parametrize("act", [None, "gelu", "gelu_new", "relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_onednn_linear_equals_the_reference(act, dtype):
    from lepton_batch.kernels.onednn import OneDnnLinear, onednn_ok, reference_linear

    ok, why = onednn_ok("cpu", dtype)
    if not ok:
        pytest.skip(why)
    torch.manual_seed(0)
    weight, bias = torch.randn(96, 40, dtype=dtype), torch.randn(96, dtype=dtype)
    for rows in (1, 7, 1024):  # a decode step, an odd count, a packed CPU bucket
        x = torch.randn(rows, 40, dtype=dtype)
        got = OneDnnLinear(weight, bias, act)(x)
        want = reference_linear(x, weight, bias, act)
        assert got.dtype == dtype and got.shape == (rows, 96)
        tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {
            "atol": 0.1, "rtol": 0.02}
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new", "silu"])
def test_onednn_layers_equal_the_plain_packed_forward(tmp_path, hidden_act, texts):
    """The CPU fast path (oneDNN linears, reused padded attention buffer) against the same
    model's plain modules; silu is not fused into the GEMM and runs after it."""
    from conftest import _save_tiny_model
    from transformers import BertModel

    from lepton_batch.engine.packed import PackedEncoder

    model_dir = _save_tiny_model(tmp_path, BertModel, 5, hidden_act=hidden_act)
    for dtype in ("float32", "bfloat16"):
        engine = Encoder(EngineConfig(model_dir=str(model_dir), head="base", max_length=64,
                                     dtype=dtype))
        if not engine.packed.onednn:
            pytest.skip(engine.packed.layer_path)
        assert "oneDNN" in engine.forward_reason
        tok = engine.tokenize(texts)
        got = engine.embed(tok, "mean", True, 1024, 32)
        engine.packed = PackedEncoder(engine.model, engine.packed.backend, fast=False)
        assert not engine.packed.onednn and not engine.packed.padded_attention
        want = engine.embed(tok, "mean", True, 1024, 32)
        if dtype == "float32":
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        else:
            assert F.cosine_similarity(got, want, dim=-1).min() > 0.999


def test_engine_compile_equals_the_eager_packed_forward(tiny_bert, texts):
    """engine.compile: the layers' dense part through torch.compile (one graph, dynamic
    token counts) gives the eager outputs."""
    _, want, _ = _embed(tiny_bert, texts[:60], "mean", dtype="float32")
    engine, got, _ = _embed(tiny_bert, texts[:60], "mean", dtype="float32", compile=True)
    assert engine.packed.compiled is not None and "engine.compile" in engine.forward_reason
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_cudnn_attention_is_taken_out_on_cuda_only():
    """cuDNN's SDPA builds a plan per new shape (bf16 eager decode on an H200: 17.8 s
    against 1.0 s in fp32 for the same steps); engines on CUDA turn it off, on CPU nothing
    changes."""
    from lepton_batch.kernels import avoid_cudnn_sdpa

    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        assert avoid_cudnn_sdpa("cpu") is None and torch.backends.cuda.cudnn_sdp_enabled()
        assert "plan per new shape" in avoid_cudnn_sdpa("cuda")
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert avoid_cudnn_sdpa("cuda") is None  # already off: said once
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
