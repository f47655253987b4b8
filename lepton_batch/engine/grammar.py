"""Grammar-constrained decoding for ``generate``: each constrained row's next token is one
its grammar allows (llguidance's grammar text of a JSON schema, a regex or choices, as
``job/structured.grammar_text`` writes it).

The grammar engine is llguidance, chosen over xgrammar (``benchmarks/grammar_engines.py``,
docs/performance.md): xgrammar masked 64 rows in ~0.5 ms against ~1.7 ms here, but needs
Triton and the TVM runtime; llguidance is one wheel without dependencies. Each row carries
its own matcher, made when the row enters a KV-cache slot and dropped when it leaves. Every
step the matchers of the step's constrained rows fill one bitmask together (on
llguidance's threads), which is unpacked on the logits' device and applied to the whole
step's logits at once; after the pick each matcher consumes its token. A row whose
grammar is complete (``is_stopped``: nothing may follow) ends there.
"""

from __future__ import annotations

from functools import lru_cache

import llguidance
import llguidance.hf
import llguidance.torch
import torch


@lru_cache(maxsize=4)
def _lltokenizer(tokenizer, n_vocab: int, eos: tuple[int, ...]) -> llguidance.LLTokenizer:
    # Built once per tokenizer (it walks the whole vocabulary); the model's vocabulary may
    # be larger than the tokenizer's (padded embeddings): those ids are never allowed.
    return llguidance.hf.from_tokenizer(tokenizer, n_vocab=max(n_vocab, len(tokenizer)),
                                        eos_token=list(eos))


class Grammars:
    """The matchers of one ``generate`` call. ``texts[r]``: row r's grammar text (None:
    unconstrained); ``vocab``: the width of the model's logits."""

    def __init__(self, tokenizer, texts: list[str | None], vocab: int, eos: list[int]) -> None:
        self.texts, self.vocab = texts, vocab
        self.lltok = _lltokenizer(tokenizer, vocab, tuple(eos))
        self.live: dict[int, llguidance.LLMatcher] = {}
        self.executor = llguidance.LLExecutor()
        self._bits: dict[str, torch.Tensor] = {}
        self._buffer: torch.Tensor | None = None  # (slots, words) int32, pinned on CUDA

    def mask(self, logits: torch.Tensor, rows: list[int]) -> None:
        """Set to -inf, in place, every logit its row's grammar forbids; ``logits`` (b, V)
        holds the step's slots, slot s running row ``rows[s]``."""
        live = {}
        for r in rows:
            if self.texts[r] is not None:
                matcher = self.live.get(r)
                live[r] = matcher if matcher is not None else llguidance.LLMatcher(
                    self.lltok, self.texts[r])
        self.live = live  # rows that left their slot drop their matcher
        slots = [(live[r], s) for s, r in enumerate(rows) if r in live]
        if not slots:
            return
        if self._buffer is None or len(self._buffer) < len(rows):  # once per call, mostly:
            # pinning memory costs more than a step's mask, so the buffer is reused
            self._buffer = llguidance.torch.allocate_token_bitmask(len(rows), self.vocab)
        bitmask = self._buffer[: len(rows)]
        bitmask.fill_(-1)  # unconstrained slots allow every token
        llguidance.torch.fill_next_token_bitmask_par(self.executor, slots, bitmask)
        logits.masked_fill_(~self._allowed(bitmask.to(logits.device, non_blocking=True),
                                           logits.shape[1]), float("-inf"))

    def _allowed(self, bitmask: torch.Tensor, width: int) -> torch.Tensor:
        """(b, width) bool from a (b, ceil(V/32)) int32 bitmask (bit j of word w: token
        32w+j); tokens past the mask are not allowed."""
        key = str(bitmask.device)
        shifts = self._bits.get(key)
        if shifts is None:
            shifts = self._bits[key] = torch.arange(32, dtype=torch.int32,
                                                    device=bitmask.device)
        bits = ((bitmask[:, :, None] >> shifts) & 1).bool().reshape(len(bitmask), -1)
        if bits.shape[1] >= width:
            return bits[:, :width]
        pad = torch.zeros((len(bits), width - bits.shape[1]), dtype=torch.bool,
                          device=bits.device)
        return torch.cat([bits, pad], dim=1)

    def consume(self, rows: list[int], tokens: list[int]) -> None:
        """Each constrained row's matcher takes its picked token."""
        for r, token in zip(rows, tokens, strict=True):
            matcher = self.live.get(r)
            if matcher is not None and not matcher.consume_token(token):
                raise RuntimeError(f"row {r}: token {token} broke its grammar: "
                                   f"{matcher.get_error()}")

    def ended(self, r: int) -> bool:
        """Whether row r's grammar is complete (nothing may follow, or it took the
        end-of-sequence token)."""
        matcher = self.live.get(r)
        return matcher is not None and matcher.is_stopped()
