"""The step runner of ``generate``: one forward over the model's weights per step.

A step computes the decode tokens of every active slot and, in the same GEMMs, the prefill
of the prompts just admitted (right-padded to the longest of them); attention runs apart
for the two parts (``kvcache.py``). A step that only decodes can run with static shapes
(``graphs.py``), replayed from CUDA graphs on CUDA. A token span every prompt starts with
(a system message, an instruction) is computed once and copied into each admitted slot.
"""

from __future__ import annotations

import numpy as np
import torch

from lepton_batch.engine.batching import Tokenized
from lepton_batch.engine.decoder import Decoder
from lepton_batch.engine.graphs import DecodeGraphs
from lepton_batch.engine.kvcache import KVCache
from lepton_batch.engine.scheduler import GenerateStats, StepPlan

MIN_SHARED_PREFIX = 4  # tokens; a shorter common prefix is not worth a separate prefill


def shared_prefix(tok: Tokenized) -> int:
    """Length of the token prefix every row starts with, leaving each row one token."""
    if len(tok) < 2:
        return 0
    limit = int(tok.lengths.min()) - 1
    if limit < MIN_SHARED_PREFIX:
        return 0
    first = tok.flat[tok.offsets[0]: tok.offsets[0] + limit]
    common = limit
    for i in range(1, len(tok)):
        row = tok.flat[tok.offsets[i]: tok.offsets[i] + common]
        diff = np.flatnonzero(row != first[:common])
        if len(diff):
            common = int(diff[0])
            if common < MIN_SHARED_PREFIX:
                return 0
    return common


def default_kv_tokens(dec: Decoder) -> int:
    """KV-cache tokens that fit: half the free GPU memory, or 1 GiB on CPU."""
    per_token = KVCache.bytes_per_token(dec.stack, dec.dtype)
    if dec.device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        budget = free // 2
    else:
        budget = 1 << 30
    return max(1, budget // per_token)


class StepRunner:
    """Runs :class:`~lepton_batch.engine.scheduler.StepPlan` steps of ``dec``'s stack over
    ``cache`` for the prompts ``tok``; ``prefix``: tokens every prompt shares (computed
    here, once); ``graphs``: decode-only steps with static shapes, CUDA graphs on CUDA.
    Counts prefills, prompt tokens and graph steps into ``stats``."""

    def __init__(self, dec: Decoder, tok: Tokenized, cache: KVCache, prefix: int,
                 stats: GenerateStats, graphs: bool = False) -> None:
        assert dec.stack is not None, dec.forward_reason
        self.stack, self.device, self.pad_id = dec.stack, dec.device, dec.pad_id
        self.tok, self.cache, self.prefix, self.stats = tok, cache, prefix, stats
        self.static = DecodeGraphs(self.stack, cache, dec.pad_id,
                                   capture=self.device == "cuda") if graphs else None
        self.prefix_kv = None
        if prefix:
            device = self.device
            ids = torch.as_tensor(tok.flat[tok.offsets[0]: tok.offsets[0] + prefix],
                                  device=device)
            attend = cache.prefill_attend(0, torch.tensor([prefix], device=device), prefix, 0)
            self.stack.hidden(ids, torch.arange(prefix, device=device), attend)
            self.prefix_kv = (cache.k[:, 0, :, :prefix].clone(),
                              cache.v[:, 0, :, :prefix].clone())
            stats.prompt_tokens += prefix

    def __call__(self, plan: StepPlan) -> torch.Tensor:
        """Logits (d+b, vocab) float32 of one step: slots ``0 .. d-1`` decode ``plan.last``
        at ``plan.pos``; the ``plan.admitted`` rows prefill into slots ``d .. d+b-1`` (the
        row of each at its last prompt token)."""
        cache, device, prefix, tok = self.cache, self.device, self.prefix, self.tok
        d, b = len(plan.last), len(plan.admitted)
        if self.static is not None and not b:
            self.stats.graph_steps += 1
            return self.static(plan.last, plan.pos)
        ids_parts = [torch.as_tensor(plan.last, device=device)]
        pos_parts = [torch.as_tensor(plan.pos, device=device)]
        if b:
            rows = plan.admitted
            lengths = tok.lengths[rows] - prefix
            width = int(lengths.max())
            ids = np.full((b, width), self.pad_id, dtype=np.int64)
            for j, r in enumerate(rows):
                ids[j, :lengths[j]] = tok.flat[tok.offsets[r] + prefix: tok.offsets[r + 1]]
            if self.prefix_kv is not None:
                cache.k[:, d:d + b, :, :prefix] = self.prefix_kv[0][:, None]
                cache.v[:, d:d + b, :, :prefix] = self.prefix_kv[1][:, None]
            len_t = torch.as_tensor(lengths, device=device)
            ids_parts.append(torch.as_tensor(ids.reshape(-1), device=device))
            pos_parts.append((prefix + torch.arange(width, device=device)).repeat(b))
            prefill = cache.prefill_attend(d, len_t, width, prefix)
            ends = d + torch.arange(b, device=device) * width + len_t - 1
            self.stats.prefills += 1
            self.stats.prompt_tokens += int(lengths.sum())
            self.stats.padded_prefill_tokens += b * width
            self.stats.sizes.append(b)
        decode = cache.decode_attend(pos_parts[0], int(plan.pos.max()) + 1) if d else None

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
            if not b:
                return decode(layer, q, k, v)
            if not d:
                return prefill(layer, q, k, v)
            return torch.cat([decode(layer, q[:d], k[:d], v[:d]),
                              prefill(layer, q[d:], k[d:], v[d:])])

        hidden = self.stack.hidden(torch.cat(ids_parts), torch.cat(pos_parts), attend)
        return self.stack.logits(torch.cat([hidden[:d], hidden[ends]]) if b else hidden)
