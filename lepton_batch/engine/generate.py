"""Continuous batching: a fixed number of KV-cache slots decoded together; when a sequence
finishes (end-of-sequence token, stop string, length) its slot is refilled from the waiting
prompts at once, so no sequence waits on the longest one of its batch.

Prompts are admitted longest first. Each step is one forward over the model's weights: the
decode tokens of every active slot and, in the same GEMMs, the prefill of the prompts just
admitted (right-padded to the longest of them); attention runs apart for the two parts.
Active sequences always occupy slots ``0 .. active-1``: a finished slot takes the last
active one's keys and values, so a decode step reads one contiguous block of the cache.
A token span every prompt starts with (a system message, an instruction) is computed once
and copied into each slot.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from lepton_batch.engine.batching import Tokenized
from lepton_batch.engine.decoder import Decoder, KVCache
from lepton_batch.engine.graphs import DecodeGraphs

log = logging.getLogger(__name__)

MIN_SHARED_PREFIX = 4  # tokens; a shorter common prefix is not worth a separate prefill
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked; the processors run in ``model.generate``'s order:
    repetition penalty, then (sampling only) temperature, top-k, top-p."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def process(self, logits: torch.Tensor, history: torch.Tensor | None) -> torch.Tensor:
        """logits (b, V) float32; history (b, T) int64 ids seen so far (prompt included;
        padding repeats a row's own id). Returns the processed logits."""
        if self.repetition_penalty != 1.0 and history is not None:
            seen = logits.gather(1, history)
            seen = torch.where(seen < 0, seen * self.repetition_penalty,
                               seen / self.repetition_penalty)
            logits = logits.scatter(1, history, seen)
        if not self.do_sample:
            return logits
        if self.temperature != 1.0:
            logits = logits / self.temperature
        if 0 < self.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=False)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum <= 1 - self.top_p
            drop[:, -1] = False  # keep at least the most likely token
            logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        return logits

    def pick(self, logits: torch.Tensor, uniforms: torch.Tensor | None) -> torch.Tensor:
        """(b,) int64 next tokens: argmax, or inverse-CDF sampling with ``uniforms`` (b,)
        float64 in (0, 1), so a row's draw depends only on its own seed and step."""
        if not self.do_sample:
            return logits.argmax(-1)
        cdf = logits.softmax(-1).double().cumsum(-1)
        target = uniforms.to(cdf.device)[:, None] * cdf[:, -1:]
        picked = torch.searchsorted(cdf, target)[:, 0]
        return picked.clamp_(max=logits.shape[-1] - 1)


def row_seed(seed: int, row_id: object) -> int:
    """A 63-bit seed for one row from the job's seed and the row's id (any type)."""
    digest = hashlib.blake2b(f"{seed}\x00{row_id!r}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser over uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def uniforms(seeds: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """(b,) float64 in (0, 1) from per-row ``seeds`` and ``steps``: counter-based, so a row
    draws the same numbers whatever batch it runs in."""
    with np.errstate(over="ignore"):
        x = _mix(seeds.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
                 * (steps.astype(np.uint64) + np.uint64(1)))
    return ((x >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)


@dataclass
class GenerateStats:
    """Counters of one ``generate`` call."""

    prefills: int = 0
    decode_steps: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    padded_prefill_tokens: int = 0
    shared_prefix: int = 0  # tokens every prompt shared, computed once
    slots: int = 0
    slot_steps: int = 0  # sum over decode steps of active sequences (occupancy)
    graph_steps: int = 0  # decode steps with static shapes (CUDA graphs on CUDA)
    sizes: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Generated:
    """Per row: generated ids (an end-of-sequence id included when one ended it) and why
    it ended: ``eos``, ``length`` or ``stop``."""

    tokens: list[list[int]]
    finish: list[str]


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


class _StopChecker:
    """Finds stop strings in the tail of a row's decoded text."""

    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        # A stop string of c characters spans at most c tokens (+2 for merges at the edge).
        self.window = max(len(s) for s in stop) + 2 if stop else 0

    def hit(self, tokens: list[int]) -> bool:
        tail = self.tokenizer.decode(tokens[-self.window:], skip_special_tokens=True)
        return any(s in tail for s in self.stop)


@torch.inference_mode()
def generate(dec: Decoder, tok: Tokenized, max_new: np.ndarray, seeds: np.ndarray,
             sampling: Sampling, stop: list[str], max_seqs: int, kv_tokens: int | None,
             prefill_tokens: int, stats: GenerateStats | None = None,
             graphs: bool = False) -> Generated:
    """Generate for every row of ``tok`` (prompts, already cut to fit the context).

    max_new: (n,) int64 >= 1 new tokens per row; seeds: (n,) int64 per-row sampling seeds;
    max_seqs: KV-cache slots; kv_tokens: the cache size in tokens (None: from memory);
    prefill_tokens: padded prompt tokens per prefill step; graphs: steps that only decode
    run with static shapes (``engine/graphs.py``), replayed from CUDA graphs on CUDA.
    Results are in row order.
    """
    assert dec.stack is not None, dec.forward_reason
    stats = stats if stats is not None else GenerateStats()
    n = len(tok)
    tokens: list[list[int]] = [[] for _ in range(n)]
    finish = [""] * n
    if n == 0:
        return Generated(tokens, finish)
    stack, device = dec.stack, dec.device
    eos = np.asarray(dec.eos_ids(), dtype=np.int64)
    checker = _StopChecker(dec.tokenizer, stop) if stop else None
    prefix = shared_prefix(tok)
    max_len = int((tok.lengths + max_new).max())
    if kv_tokens is None:
        kv_tokens = _default_kv_tokens(dec)
    slots = max(1, min(max_seqs, n, kv_tokens // max_len))
    if slots < min(max_seqs, n):
        log.info("KV cache of %d tokens holds %d sequences of up to %d tokens",
                 kv_tokens, slots, max_len)
    cache = KVCache(stack, slots, max_len, dec.dtype, device)
    penalty = sampling.repetition_penalty != 1.0
    history = torch.zeros((slots, max_len), dtype=torch.int64, device=device) if penalty else None
    stats.shared_prefix, stats.slots = prefix, slots
    static = DecodeGraphs(stack, cache, dec.pad_id, capture=device == "cuda") if graphs \
        else None

    prefix_kv = None
    if prefix:
        ids = torch.as_tensor(tok.flat[tok.offsets[0]: tok.offsets[0] + prefix], device=device)
        attend = cache.prefill_attend(0, torch.tensor([prefix], device=device), prefix, 0)
        stack.hidden(ids, torch.arange(prefix, device=device), attend)
        prefix_kv = (cache.k[:, 0, :, :prefix].clone(), cache.v[:, 0, :, :prefix].clone())
        stats.prompt_tokens += prefix

    # Per-slot state on the host; slot s < active holds row row_of[s].
    row_of = np.zeros(slots, dtype=np.int64)
    pos = np.zeros(slots, dtype=np.int64)  # tokens in the cache
    last = np.zeros(slots, dtype=np.int64)  # newest token, not yet in the cache
    active = 0
    waiting = list(np.argsort(-tok.lengths, kind="stable"))[::-1]  # pop() gives the longest

    def done(slot: int, token: int) -> str | None:
        r = row_of[slot]
        if len(eos) and token in eos:
            return "eos"
        if len(tokens[r]) >= max_new[r]:
            return "length"
        if checker is not None and checker.hit(tokens[r]):
            return "stop"
        return None

    def retire(finished: list[int]) -> None:
        """Free finished slots; the last active slot moves into each."""
        nonlocal active
        for s in sorted(finished, reverse=True):
            tail = active - 1
            if s != tail:
                cache.move(tail, s, int(pos[tail]))
                if history is not None:
                    history[s] = history[tail]
                row_of[s], pos[s], last[s] = row_of[tail], pos[tail], last[tail]
            active -= 1

    def accept(new: np.ndarray) -> None:
        """Record one new token per active slot ``0 ..``; retire the finished ones."""
        finished = []
        for s, token in enumerate(new.tolist()):
            r = row_of[s]
            tokens[r].append(token)
            last[s] = token
            reason = done(s, token)
            if reason is not None:
                finish[r] = reason
                finished.append(s)
        stats.generated_tokens += len(new)
        retire(finished)

    def sample(logits: torch.Tensor, b: int) -> np.ndarray:
        """Next tokens for slots ``0 .. b-1`` from their (b, V) logits."""
        hist = None
        if history is not None:
            hist = history[:b, :int(pos[:b].max()) + 1]
        u = None
        if sampling.do_sample:
            rows = row_of[:b]
            steps = np.fromiter((len(tokens[r]) for r in rows), dtype=np.int64, count=b)
            u = torch.from_numpy(uniforms(seeds[rows], steps))
        return sampling.pick(sampling.process(logits, hist), u).cpu().numpy()

    def next_group() -> list[int]:
        """Waiting rows to admit now: longest first, into free slots, under the budget."""
        group: list[int] = []
        if waiting:
            width = int(tok.lengths[waiting[-1]]) - prefix
            while waiting and active + len(group) < slots and (
                    (len(group) + 1) * width <= prefill_tokens or not group):
                group.append(waiting.pop())
        return group

    def step(group: list[int]) -> None:
        """One forward: a decode token for each active slot and, in the same GEMMs, the
        prefill of ``group`` into the slots after them."""
        nonlocal active
        d, b = active, len(group)
        if static is not None and not b:
            logits = static(last[:d], pos[:d])
            stats.graph_steps += 1
            advance(logits, d, 0)
            return
        ids_parts = [torch.as_tensor(last[:d], device=device)]
        pos_parts = [torch.as_tensor(pos[:d], device=device)]
        if b:
            rows = np.asarray(group, dtype=np.int64)
            lengths = tok.lengths[rows] - prefix
            width = int(lengths.max())
            ids = np.full((b, width), dec.pad_id, dtype=np.int64)
            for j, r in enumerate(rows):
                ids[j, :lengths[j]] = tok.flat[tok.offsets[r] + prefix: tok.offsets[r + 1]]
            row_of[d:d + b] = rows
            pos[d:d + b] = tok.lengths[rows]
            if prefix_kv is not None:
                cache.k[:, d:d + b, :, :prefix] = prefix_kv[0][:, None]
                cache.v[:, d:d + b, :, :prefix] = prefix_kv[1][:, None]
            if history is not None:
                for j, r in enumerate(rows):
                    row = torch.as_tensor(tok.flat[tok.offsets[r]: tok.offsets[r + 1]])
                    history[d + j, :len(row)] = row
                    history[d + j, len(row):] = row[0]
            len_t = torch.as_tensor(lengths, device=device)
            ids_parts.append(torch.as_tensor(ids.reshape(-1), device=device))
            pos_parts.append((prefix + torch.arange(width, device=device)).repeat(b))
            prefill = cache.prefill_attend(d, len_t, width, prefix)
            ends = d + torch.arange(b, device=device) * width + len_t - 1
            stats.prefills += 1
            stats.prompt_tokens += int(lengths.sum())
            stats.padded_prefill_tokens += b * width
            stats.sizes.append(b)
        decode = cache.decode_attend(pos_parts[0], int(pos[:d].max()) + 1) if d else None

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
            if not b:
                return decode(layer, q, k, v)
            if not d:
                return prefill(layer, q, k, v)
            return torch.cat([decode(layer, q[:d], k[:d], v[:d]),
                              prefill(layer, q[d:], k[d:], v[d:])])

        hidden = stack.hidden(torch.cat(ids_parts), torch.cat(pos_parts), attend)
        advance(stack.logits(torch.cat([hidden[:d], hidden[ends]]) if b else hidden), d, b)

    def advance(logits: torch.Tensor, d: int, b: int) -> None:
        """After a step's forward: count it, sample a token for each of the ``d`` decoded
        and ``b`` admitted slots, and retire the finished ones."""
        nonlocal active
        pos[:d] += 1
        if d:
            stats.decode_steps += 1
            stats.slot_steps += d
        active += b
        new = sample(logits, active)
        if history is not None:
            history[torch.arange(active, device=device),
                    torch.as_tensor(pos[:active], device=device)] = torch.as_tensor(
                        new, device=device)
        accept(new)

    while active or waiting:
        step(next_group())
    if static is not None:
        log.debug("decode: %s", static.describe())
    return Generated(tokens, finish)


def _default_kv_tokens(dec: Decoder) -> int:
    """KV-cache tokens that fit: half the free GPU memory, or 1 GiB on CPU."""
    per_token = KVCache.bytes_per_token(dec.stack, dec.dtype)
    if dec.device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        budget = free // 2
    else:
        budget = 1 << 30
    return max(1, budget // per_token)
