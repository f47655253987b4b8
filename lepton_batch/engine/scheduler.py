"""The scheduler of ``generate``: which sequences run in which KV-cache slot, and when.

A fixed number of slots (as many as the KV budget holds, :func:`slot_count`) decode
together; when a sequence finishes (end-of-sequence token, stop string, length) its slot
is refilled from the waiting prompts at once, so no sequence waits on the longest one of
its batch. Prompts are admitted longest first, as many per step as free slots and the
prefill budget allow. Active sequences always occupy slots ``0 .. active-1``: a finished
slot takes the last active one's sequence (its keys and values move with it), so a decode
step reads one contiguous block of the cache.

The scheduler is host-side bookkeeping (numpy) and knows no model: each step it hands a
:class:`StepPlan` to a step function that returns one new token per slot.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class StepPlan:
    """One step: a decode token for each of slots ``0 .. d-1`` and, in the same forward,
    the prefill of the ``admitted`` rows into slots ``d .. d+b-1``. All int64 arrays.

    last, pos: (d,) each decoding slot's newest token (not yet in the cache) and its
    position; admitted: (b,) rows; rows: (d+b,) the row each slot holds; generated: (d+b,)
    tokens each slot's row has generated so far (a sampling step counter); next_pos:
    (d+b,) the position each slot's new token will take.
    """

    last: np.ndarray
    pos: np.ndarray
    admitted: np.ndarray
    rows: np.ndarray
    generated: np.ndarray
    next_pos: np.ndarray


# step(plan) -> (d+b,) int64 new tokens of slots 0 .. d+b-1
Step = Callable[[StepPlan], np.ndarray]
# move(src, dst, length): slot src's sequence (length tokens in the cache) moves to dst
Move = Callable[[int, int, int], None]


def slot_count(max_seqs: int, rows: int, kv_tokens: int, max_len: int) -> int:
    """KV-cache slots: ``max_seqs``, fewer when there are fewer rows or when the cache of
    ``kv_tokens`` tokens holds fewer sequences of ``max_len`` tokens (at least one)."""
    slots = max(1, min(max_seqs, rows, kv_tokens // max_len))
    if slots < min(max_seqs, rows):
        log.info("KV cache of %d tokens holds %d sequences of up to %d tokens",
                 kv_tokens, slots, max_len)
    return slots


class StopChecker:
    """Finds a row's stop strings in the tail of its decoded text; ``stops[r]``: row r's
    (empty: none)."""

    def __init__(self, tokenizer, stops: list[list[str]]) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        # A stop string of c characters spans at most c tokens (+2 for merges at the edge).
        self.windows = [max(map(len, s)) + 2 if s else 0 for s in stops]

    def __call__(self, row: int, tokens: list[int]) -> bool:
        if not self.windows[row]:
            return False
        tail = self.tokenizer.decode(tokens[-self.windows[row]:], skip_special_tokens=True)
        return any(s in tail for s in self.stops[row])


class Scheduler:
    """Slots, admission and finishing for ``n`` prompts.

    lengths: (n,) int64 prompt tokens; max_new: (n,) int64 >= 1 new tokens per row; eos:
    end-of-sequence ids; slots: KV-cache slots; prefill_tokens: padded prompt tokens per
    prefill step; prefix: tokens of a prefix every prompt shares, in the cache already (not
    counted against the prefill budget); stop(row, tokens): whether a row's tokens hit a
    stop string; ended(row): whether a row's grammar is complete (it ends with ``stop``).
    """

    def __init__(self, lengths: np.ndarray, max_new: np.ndarray, eos: list[int], slots: int,
                 prefill_tokens: int, prefix: int = 0,
                 stop: Callable[[int, list[int]], bool] | None = None,
                 stats: GenerateStats | None = None,
                 ended: Callable[[int], bool] | None = None) -> None:
        n = len(lengths)
        self.lengths, self.max_new = lengths, max_new
        self.eos = np.asarray(eos, dtype=np.int64)
        self.slots, self.prefill_tokens, self.prefix = slots, prefill_tokens, prefix
        self.stop, self.ended = stop, ended
        self.stats = stats if stats is not None else GenerateStats()
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.finish = [""] * n
        # Per-slot state; slot s < active holds row row_of[s].
        self.row_of = np.zeros(slots, dtype=np.int64)
        self.pos = np.zeros(slots, dtype=np.int64)  # tokens in the cache
        self.last = np.zeros(slots, dtype=np.int64)  # newest token, not yet in the cache
        self.made = np.zeros(slots, dtype=np.int64)  # tokens generated by the slot's row
        self.active = 0
        self.waiting = list(np.argsort(-lengths, kind="stable"))[::-1]  # pop() gives the longest

    def run(self, step: Step, move: Move | None = None) -> Generated:
        """Step until every row has finished; ``move`` follows a sequence that changes
        slot. Results are in row order."""
        while self.active or self.waiting:
            plan = self.plan(self.next_group())
            self.advance(plan, step(plan), move)
        return Generated(self.tokens, self.finish)

    def next_group(self) -> list[int]:
        """Waiting rows to admit now: longest first, into free slots, under the budget."""
        group: list[int] = []
        if self.waiting:
            width = int(self.lengths[self.waiting[-1]]) - self.prefix
            while self.waiting and self.active + len(group) < self.slots and (
                    (len(group) + 1) * width <= self.prefill_tokens or not group):
                group.append(self.waiting.pop())
        return group

    def plan(self, group: list[int]) -> StepPlan:
        """Admit ``group`` into the slots after the active ones; the step to run next."""
        d, b = self.active, len(group)
        rows = np.asarray(group, dtype=np.int64)
        self.row_of[d:d + b] = rows
        self.pos[d:d + b] = self.lengths[rows]
        self.made[d:d + b] = 0
        next_pos = self.pos[:d + b].copy()
        next_pos[:d] += 1
        return StepPlan(self.last[:d].copy(), self.pos[:d].copy(), rows,
                        self.row_of[:d + b].copy(), self.made[:d + b].copy(), next_pos)

    def advance(self, plan: StepPlan, new: np.ndarray, move: Move | None = None) -> None:
        """After ``plan``'s step: the decoded slots' tokens are in the cache, the admitted
        slots are active; record ``new`` (d+b,) and free the finished slots."""
        d = len(plan.last)
        self.pos[:d] += 1
        if d:
            self.stats.decode_steps += 1
            self.stats.slot_steps += d
        self.active += len(plan.admitted)
        finished = []
        for s, token in enumerate(new.tolist()):
            r = self.row_of[s]
            self.tokens[r].append(token)
            self.last[s] = token
            self.made[s] += 1
            reason = self._done(r, token)
            if reason is not None:
                self.finish[r] = reason
                finished.append(s)
        self.stats.generated_tokens += len(new)
        self._retire(finished, move)

    def _done(self, r: int, token: int) -> str | None:
        if self.ended is not None and self.ended(r):
            return "stop"
        if len(self.eos) and token in self.eos:
            return "eos"
        if len(self.tokens[r]) >= self.max_new[r]:
            return "length"
        if self.stop is not None and self.stop(r, self.tokens[r]):
            return "stop"
        return None

    def _retire(self, finished: list[int], move: Move | None) -> None:
        """Free finished slots; the last active slot moves into each."""
        for s in sorted(finished, reverse=True):
            tail = self.active - 1
            if s != tail:
                if move is not None:
                    move(tail, s, int(self.pos[tail]))
                for a in (self.row_of, self.pos, self.last, self.made):
                    a[s] = a[tail]
            self.active -= 1
