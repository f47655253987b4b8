"""The throughput engine: load a local model once, tokenize, batch by token budget, run.

Rows are sorted by true token count (longest first, so an out-of-memory shows up on the
first batch) and cut into batches whose *padded* size ``rows x longest`` stays under
``max_tokens_per_batch``; results are scattered back so callers always get input order.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from lepton_batch.kernels import pick_attention

log = logging.getLogger(__name__)

Head = Literal["base", "classifier"]
Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class EngineConfig:
    """Everything that identifies a loaded model; the engine cache is keyed by it."""

    model_dir: str
    head: Head
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda
    max_length: int = 512
    trust_remote_code: bool = False
    allow_pickle: bool = False  # load pytorch_model.bin when there is no safetensors
    threads: int | None = None


@dataclass(frozen=True)
class Tokenized:
    """Token ids for a list of texts.

    ``ids[i]``: list of int token ids of row i, special tokens included, at most
    ``max_length`` long. ``truncated``: (n,) bool. ``lengths``: (n,) int64.
    """

    ids: list[list[int]]
    truncated: np.ndarray
    lengths: np.ndarray


@dataclass
class BatchStats:
    """Counters for one engine call: real tokens vs tokens including padding.

    ``sizes``: rows of each batch that ran, in run order. ``oom_splits``: batches halved
    after an out-of-memory error; ``max_rows_cap``: the batch size that then worked, kept
    for the rest of the call (None when nothing ran out of memory). ``failed_rows``:
    indices into the tokenized rows that could not run even alone (their output is NaN),
    with the reason for each in ``failed_reasons``.
    """

    batches: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    oom_splits: int = 0
    sizes: list[int] = field(default_factory=list)
    max_rows_cap: int | None = None
    failed_rows: list[int] = field(default_factory=list)
    failed_reasons: list[str] = field(default_factory=list)


_OOM_MESSAGES = ("out of memory", "DefaultCPUAllocator: can't allocate memory")


def is_oom(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or a RuntimeError from an allocator that ran out (CPU)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _OOM_MESSAGES)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device is cuda but torch sees no CUDA device")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto``: bf16 (or fp16) on CUDA; fp32 on CPU, where fp16 GEMMs are ~100x slower."""
    if dtype == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype == "float16" and device == "cpu":
        log.warning("model.dtype float16 on CPU is very slow on most CPUs; prefer bfloat16")
    return getattr(torch, dtype)


def plan_batches(lengths: np.ndarray, max_tokens: int, max_rows: int) -> list[np.ndarray]:
    """Indices of rows per batch, longest rows first, padded size <= ``max_tokens``.

    lengths: (n,) int token counts. Returns a list of int64 index arrays covering 0..n-1
    once each. A single row longer than ``max_tokens`` forms a batch of its own.
    """
    order = np.argsort(-lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        longest = max(int(lengths[order[start]]), 1)
        size = max(1, min(max_rows, max_tokens // longest))
        batches.append(order[start : start + size])
        start += size
    return batches


class Engine:
    """A tokenizer and a model loaded from a local directory, ready for batched inference."""

    def __init__(self, config: EngineConfig) -> None:
        from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no "Loading weights" bars in worker logs

        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        if self.device == "cpu":
            # Dask's nanny starts workers with OMP_NUM_THREADS=1; set torch's pool explicitly.
            threads = config.threads or int(os.environ.get("LEPTON_BATCH_THREADS", 0)) or (
                os.cpu_count() or 1
            )
            torch.set_num_threads(threads)
        dtype_name = str(self.dtype).removeprefix("torch.")
        self.attn_implementation, reason = pick_attention(self.device, dtype_name)
        log.info("attention: %s (%s)", self.attn_implementation, reason)
        self.tokenizer = AutoTokenizer.from_pretrained(
            config.model_dir, trust_remote_code=config.trust_remote_code
        )
        if not self.tokenizer.is_fast:
            log.warning("%s has no fast tokenizer; tokenization will be slow", config.model_dir)
        cls = AutoModelForSequenceClassification if config.head == "classifier" else AutoModel
        self.model = cls.from_pretrained(
            config.model_dir,
            dtype=self.dtype,
            attn_implementation=self.attn_implementation,
            trust_remote_code=config.trust_remote_code,
            # True refuses pickled weights; None prefers safetensors and falls back to the
            # pickle (False would refuse safetensors, and so a safetensors-only model).
            use_safetensors=None if config.allow_pickle else True,
        ).to(self.device).eval()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.hidden_size = int(self.model.config.hidden_size)

    def token_budget(self, requested: int | None) -> int:
        """``engine.max_tokens_per_batch``, or the default for this device."""
        return requested or (16_384 if self.device == "cuda" else 4096)

    def tokenize(self, texts: list[str]) -> Tokenized:
        """Fast batched tokenization; rows over ``max_length`` are truncated and flagged."""
        max_len = self.config.max_length
        if not texts:
            empty = np.zeros(0, dtype=np.int64)
            return Tokenized([], empty.astype(bool), empty)
        ids = self.tokenizer(texts, truncation=False, verbose=False)["input_ids"]
        truncated = np.fromiter((len(x) > max_len for x in ids), dtype=bool, count=len(ids))
        long_rows = np.flatnonzero(truncated)
        if len(long_rows):
            # Re-tokenize only the long rows, letting the tokenizer keep its special tokens.
            cut = self.tokenizer(
                [texts[i] for i in long_rows], truncation=True, max_length=max_len
            )["input_ids"]
            for i, row in zip(long_rows, cut, strict=True):
                ids[i] = row
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        return Tokenized(ids, truncated, lengths)

    def _pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """rows -> input_ids (b, L) int64 and attention_mask (b, L) int64, right-padded."""
        longest = max(len(r) for r in rows)
        ids = np.full((len(rows), longest), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), longest), dtype=np.int64)
        for j, r in enumerate(rows):
            ids[j, : len(r)] = r
            mask[j, : len(r)] = 1
        return torch.from_numpy(ids).to(self.device), torch.from_numpy(mask).to(self.device)

    @torch.inference_mode()
    def run(self, tok: Tokenized, step: Step, width: int, max_tokens: int, max_rows: int,
            stats: BatchStats | None = None) -> torch.Tensor:
        """Apply ``step`` to every row in token-budget batches; return (n, width) float32.

        step(input_ids (b, L) int64, attention_mask (b, L) int64) -> (b, width) tensor.
        Output row i belongs to input row i, whatever order the batches ran in.

        Out of memory: the batch is halved and retried, down to one row; the first size
        that then works caps the rows per batch for the rest of this call (the remaining
        batches are re-cut, still longest first). A row that cannot run even alone gets
        NaN and is listed in ``stats.failed_rows``; without ``stats`` to report it in,
        its error is raised instead, since a caller could not tell the row was lost.
        """
        report_failures = stats is not None
        stats = stats if stats is not None else BatchStats()
        out = torch.empty((len(tok.ids), width), dtype=torch.float32)
        pending = deque(plan_batches(tok.lengths, max_tokens, max_rows))
        cap, split = max_rows, False  # split: a batch was halved and nothing ran since
        while pending:
            idx = pending.popleft()
            try:
                result = step(*self._pad([tok.ids[i] for i in idx]))
            except RuntimeError as exc:
                if not is_oom(exc) or (len(idx) == 1 and not report_failures):
                    raise
                result = None
            if result is None:
                # Outside the except block, so the failed batch's tensors are already freed.
                if self.device == "cuda":
                    torch.cuda.empty_cache()
                if len(idx) == 1:
                    row = int(idx[0])
                    reason = (f"out of memory: a row of {int(tok.lengths[row])} tokens could "
                              "not run even alone; lower model.max_length or "
                              "engine.max_tokens_per_batch")
                    log.warning("row %d: %s", row, reason)
                    out[row] = float("nan")
                    stats.failed_rows.append(row)
                    stats.failed_reasons.append(reason)
                    continue
                half = (len(idx) + 1) // 2  # the larger half first: its size caps the rest
                stats.oom_splits += 1
                split = True
                pending.extendleft([idx[half:], idx[:half]])
                continue
            if split and len(idx) < cap:
                cap = stats.max_rows_cap = len(idx)
                log.warning("out of memory: batches of %d rows work; keeping that size for "
                            "the rest of this shard (engine.max_rows_per_batch starts "
                            "there)", cap)
                if pending:
                    rest = np.concatenate(list(pending))  # still longest first
                    pending = deque(rest[b] for b in
                                    plan_batches(tok.lengths[rest], max_tokens, cap))
            split = False
            out[torch.from_numpy(idx)] = result.float().cpu()
            stats.batches += 1
            stats.sizes.append(len(idx))
            stats.tokens += int(tok.lengths[idx].sum())
            stats.padded_tokens += len(idx) * int(tok.lengths[idx].max())
        return out

    def embed(self, tok: Tokenized, pooling: str, normalize: bool, max_tokens: int,
              max_rows: int, stats: BatchStats | None = None, skip: int = 0) -> torch.Tensor:
        """Pooled sentence embeddings, (n, hidden_size) float32, in input order.

        skip: leading tokens of every row left out of pooling (a prompt's, see ``pool``).
        """

        def step(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
            pooled = pool(hidden, mask, pooling, skip)
            return F.normalize(pooled, dim=-1) if normalize else pooled

        return self.run(tok, step, self.hidden_size, max_tokens, max_rows, stats)

    def logits(self, tok: Tokenized, max_tokens: int, max_rows: int,
               stats: BatchStats | None = None) -> torch.Tensor:
        """Sequence-classification logits, (n, num_labels) float32, in input order."""

        def step(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=ids, attention_mask=mask).logits

        return self.run(tok, step, int(self.model.config.num_labels), max_tokens, max_rows,
                        stats)


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str, skip: int = 0) -> torch.Tensor:
    """hidden (b, L, d) float, mask (b, L) int, right-padded -> (b, d) float, as
    sentence-transformers' Pooling computes it.

    pooling: ``mean`` (masked mean), ``cls`` (first unmasked token), ``max`` (masked
    element-wise max), ``lasttoken`` (last non-pad token). skip: the first ``skip`` positions
    are masked out, as sentence-transformers does for a prompt with ``include_prompt: false``.
    """
    if skip:
        mask = mask.clone()
        mask[:, :skip] = 0
    rows = torch.arange(len(hidden), device=hidden.device)
    if pooling == "cls":
        return hidden[rows, mask.argmax(1)] if skip else hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if pooling == "max":
        return hidden.masked_fill(m == 0, float("-inf")).max(1).values
    if pooling == "lasttoken":
        # Right padding: the last 1 in the mask. A row with no unmasked token pools to zeros.
        last = mask.shape[1] - 1 - mask.flip(1).argmax(1)
        return hidden[rows, last] * m[rows, last]
    assert pooling == "mean", f"unknown pooling {pooling!r}"
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


class EngineCache:
    """Engines loaded in this process, keyed by their config: one load per worker."""

    def __init__(self) -> None:
        self._engines: dict[EngineConfig, Engine] = {}
        self._lock = threading.Lock()  # worker threads share the cache; load each model once
        self.loads = 0

    def get(self, config: EngineConfig) -> Engine:
        with self._lock:
            if config not in self._engines:
                log.info("loading %s (%s head)", config.model_dir, config.head)
                self._engines[config] = Engine(config)
                self.loads += 1
            return self._engines[config]
