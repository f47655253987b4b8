"""Continuous batching for ``generate``: the loop that wires its three parts.

- the scheduler (``scheduler.py``): KV-cache slots, admission of waiting prompts (longest
  first, under the prefill budget), finishing on end-of-sequence, stop string or length;
- the step runner (``steps.py``): one forward per step, decode and prefill in the same
  GEMMs, eager or with static shapes (CUDA graphs on CUDA, ``graphs.py``);
- the sampler (``sampler.py``): greedy, or seeded sampling that draws the same tokens for a
  row whatever batch it runs in.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from lepton_batch.engine.batching import Tokenized
from lepton_batch.engine.decoder import Decoder
from lepton_batch.engine.kvcache import KVCache
from lepton_batch.engine.sampler import RowSampling, Sampler, Sampling, row_seed, uniforms
from lepton_batch.engine.scheduler import (
    Generated,
    GenerateStats,
    Scheduler,
    StopChecker,
    slot_count,
)
from lepton_batch.engine.steps import StepRunner, default_kv_tokens, shared_prefix

log = logging.getLogger(__name__)

# The names callers of ``generate`` use, wherever they live.
__all__ = ["GenerateStats", "Generated", "RowSampling", "Sampling", "generate", "row_seed",
           "shared_prefix", "uniforms"]


@torch.inference_mode()
def generate(dec: Decoder, tok: Tokenized, max_new: np.ndarray, seeds: np.ndarray,
             sampling: Sampling, stop: list[str], max_seqs: int, kv_tokens: int | None,
             prefill_tokens: int, stats: GenerateStats | None = None,
             graphs: bool = False, rows: RowSampling | None = None,
             stops: list[list[str]] | None = None,
             grammars: list[str | None] | None = None) -> Generated:
    """Generate for every row of ``tok`` (prompts, already cut to fit the context).

    max_new: (n,) int64 >= 1 new tokens per row; seeds: (n,) int64 per-row sampling seeds;
    stop: stop strings of every row, or ``stops``: each row's own; max_seqs: KV-cache slots;
    kv_tokens: the cache size in tokens (None: from memory); prefill_tokens: padded prompt
    tokens per prefill step; graphs: steps that only decode run with static shapes
    (``engine/graphs.py``), replayed from CUDA graphs on CUDA; rows: per-row temperature,
    top-k, top-p instead of ``sampling``'s; grammars: each row's grammar text (None:
    unconstrained; ``engine/grammar.py``). Results are in row order.
    """
    assert dec.stack is not None, dec.forward_reason
    stats = stats if stats is not None else GenerateStats()
    if len(tok) == 0:
        return Generated([], [])
    prefix = shared_prefix(tok)
    max_len = int((tok.lengths + max_new).max())
    if kv_tokens is None:
        kv_tokens = default_kv_tokens(dec)
    slots = slot_count(max_seqs, len(tok), kv_tokens, max_len)
    stats.shared_prefix, stats.slots = prefix, slots
    cache = KVCache(dec.stack, slots, max_len, dec.dtype, dec.device)
    constrained = None
    if grammars is not None and any(g is not None for g in grammars):
        from lepton_batch.engine.grammar import Grammars

        constrained = Grammars(dec.tokenizer, grammars, dec.vocab_size, dec.eos_ids())
    stops = stops if stops is not None else [stop] * len(tok)
    sampler = Sampler(sampling, tok, seeds, slots, max_len, dec.device, rows, constrained)
    runner = StepRunner(dec, tok, cache, prefix, stats, graphs)
    scheduler = Scheduler(tok.lengths, max_new, dec.eos_ids(), slots, prefill_tokens, prefix,
                          StopChecker(dec.tokenizer, stops) if any(stops) else None, stats,
                          constrained.ended if constrained is not None else None)

    def move(src: int, dst: int, length: int) -> None:
        cache.move(src, dst, length)
        sampler.move(src, dst)

    out = scheduler.run(lambda plan: sampler(runner(plan), plan), move)
    if runner.static is not None:
        log.debug("decode: %s", runner.static.describe())
    return out
