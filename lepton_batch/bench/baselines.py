"""The usual ways the embedding comparison measures lepton-batch against, each a loaded,
warmed-up :class:`~lepton_batch.bench.methods.Method`: sentence-transformers (at its
defaults, and at its fastest batch x dtype) and transformers' feature-extraction pipeline
(pooled here as the model directory says)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lepton_batch.bench.common import dtype_name, sync
from lepton_batch.bench.measure import batch_pad
from lepton_batch.bench.methods import Inputs, Method, Pass


def st_model(ctx: Inputs, dtype: torch.dtype) -> Any:
    """A SentenceTransformer of the model directory in ``dtype``, cut at the resolved
    max_length; raises ImportError without sentence-transformers."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(ctx.model_dir), device=ctx.device).to(dtype)
    st.max_seq_length = ctx.settings.max_length
    return st


def st_method(ctx: Inputs, st: Any, batch: int, note: str = "") -> Method:
    """``st.encode`` of the raw rows in batches of ``batch`` (st-default: 32, its own)."""
    # encode sorts rows by characters, longest first, and cuts batches of ``batch``; with
    # varlen (flattened) attention nothing is padded.
    if getattr(st[0], "can_flatten_inputs", False):
        padded, seq = int(ctx.lengths.sum()), ctx.lengths
    else:
        padded, seq = batch_pad(ctx.lengths, np.argsort([-len(t) for t in ctx.raw]), batch)

    def run(texts: list[str] = ctx.raw) -> Pass:
        emb = st.encode(texts, batch_size=batch, show_progress_bar=False,
                        convert_to_tensor=True)
        return Pass(emb.float().cpu(), int(ctx.lengths.sum()), padded, seq)

    run(ctx.raw[:64])
    return Method(run, len(ctx.raw), dtype_name(st.dtype), note)


def st_best(ctx: Inputs, st32: Any) -> Method:
    """Time batch {32, 128, 256} x {fp32, bf16} on the first ``tune_rows`` rows; keep the
    fastest."""
    sub, trials = ctx.raw[: ctx.cfg.tune_rows], {}
    models = {"float32": st32, "bfloat16": st_model(ctx, torch.bfloat16)}
    for name, st in models.items():
        st.encode(sub[:32], show_progress_bar=False)  # warm-up
        for batch in (32, 128, 256):
            start = time.perf_counter()
            st.encode(sub, batch_size=batch, show_progress_bar=False, convert_to_tensor=True)
            sync(ctx.device)
            trials[(batch, name)] = len(sub) / (time.perf_counter() - start)
    batch, dtype = max(trials, key=trials.__getitem__)
    tried = ", ".join(f"{b}/{d} {r:.1f}" for (b, d), r in trials.items())
    ctx.say(f"st-best: batch {batch}, {dtype} (rows/s on {len(sub)} rows: {tried})")
    return st_method(ctx, models[dtype], batch, f"batch {batch}, {dtype}, fastest on "
                     f"{len(sub)} rows of: {tried} rows/s")


def hf_pipeline(ctx: Inputs) -> Method:
    """transformers' feature-extraction pipeline in batches of 64, pooled and normalised
    here as the settings say, on at most ``pipeline_rows`` rows."""
    from transformers import pipeline

    pipe = pipeline("feature-extraction", model=str(ctx.model_dir), device=ctx.device)
    n, s = min(len(ctx.texts), ctx.cfg.pipeline_rows), ctx.settings
    lengths, left = ctx.lengths[:n], pipe.tokenizer.padding_side == "left"
    padded, seq = batch_pad(lengths, np.arange(n), 64)  # batches of 64 in input order
    pool = {"cls": lambda x: x[0], "max": lambda x: x.max(0).values,
            "lasttoken": lambda x: x[-1]}.get(s.pooling, lambda x: x.mean(0))

    def run(texts: list[str] = ctx.texts[:n]) -> Pass:
        outs = pipe(texts, batch_size=64, return_tensors=True,
                    tokenize_kwargs={"truncation": True, "max_length": s.max_length})
        # Each output is (1, its batch's padded length, d): pool the row's own tokens.
        emb = torch.stack([pool((o[0, -k:] if left else o[0, :k]).float())
                           for o, k in zip(outs, lengths, strict=False)]).cpu()
        return Pass(F.normalize(emb, dim=-1) if s.normalize else emb, int(lengths.sum()),
                    padded, seq)

    run(ctx.texts[:64])
    return Method(run, n, dtype_name(pipe.model.dtype),
                  f"first {n:,} rows only" if n < len(ctx.texts) else "")
