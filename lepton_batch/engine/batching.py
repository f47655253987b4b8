"""Token-budget batch plans and collation into padded or packed tensors, without Python
loops over tokens: rows live in one flat id array, batches are built by numpy gathers.

Importable without torch (the driver plans shards with :class:`Tokenized` and
:class:`BatchStats`); ``collate`` imports it when it builds tensors.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Tokenized:
    """Token ids for n texts, flat.

    ``flat``: (total,) int64 ids of every row back to back, special tokens included;
    ``offsets``: (n + 1,) int64, row i is ``flat[offsets[i]:offsets[i + 1]]``;
    ``lengths``: (n,) int64 (at most ``max_length``); ``truncated``: (n,) bool.
    """

    flat: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    truncated: np.ndarray

    @classmethod
    def from_lists(cls, ids: list[list[int]], truncated: np.ndarray) -> Tokenized:
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64,
                           count=int(offsets[-1]))
        return cls(flat, offsets, lengths, truncated)

    @classmethod
    def from_encodings(cls, encodings: list) -> Tokenized:
        """From a ``tokenizers`` batch encoded with truncation on: a row is ``truncated``
        when the tokenizer kept an overflow."""
        truncated = np.fromiter((bool(e.overflowing) for e in encodings), dtype=bool,
                                count=len(encodings))
        return cls.from_lists([e.ids for e in encodings], truncated)

    @classmethod
    def concat(cls, parts: list[Tokenized]) -> Tokenized:
        """The rows of ``parts``, one after another."""
        lengths = np.concatenate([p.lengths for p in parts])
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(np.concatenate([p.flat for p in parts]), offsets, lengths,
                   np.concatenate([p.truncated for p in parts]))

    def __len__(self) -> int:
        return len(self.lengths)

    def row(self, i: int) -> list[int]:
        """The token ids of row i."""
        return self.flat[self.offsets[i] : self.offsets[i + 1]].tolist()


@dataclass
class BatchStats:
    """Counters for one engine call: real tokens vs tokens the dense layers computed.

    ``padded_tokens``: rows x longest per batch on the padded path; on the packed path the
    real tokens, rounded up on CPU to a multiple of ``PACK_BUCKET`` (zero rows that keep
    GEMM shapes few, see ``packed.py``). ``sizes``: rows of each batch that
    ran, in run order. ``oom_splits``: batches halved after an out-of-memory error;
    ``max_rows_cap``: the batch size that then worked, kept for the rest of the call (None
    when nothing ran out of memory). ``failed_rows``: indices into the tokenized rows that
    could not run even alone (their output is NaN), with the reason for each in
    ``failed_reasons``. ``first_batch_at``: wall-clock time (epoch seconds) the first batch
    was launched, for the run's time to first batch.
    """

    batches: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    oom_splits: int = 0
    sizes: list[int] = field(default_factory=list)
    max_rows_cap: int | None = None
    failed_rows: list[int] = field(default_factory=list)
    failed_reasons: list[str] = field(default_factory=list)
    first_batch_at: float | None = None

    def started(self) -> None:
        """Note the first batch's launch (later calls keep the first time)."""
        if self.first_batch_at is None:
            self.first_batch_at = time.time()


def plan_batches(lengths: np.ndarray, max_tokens: int, max_rows: int,
                 packed: bool = False) -> list[np.ndarray]:
    """Indices of rows per batch, longest rows first, covering 0..n-1 once each.

    lengths: (n,) int token counts. Padded (``packed=False``): ``rows x longest <=
    max_tokens``. Packed: the real tokens ``sum(lengths) <= max_tokens``, and ``rows x
    longest <= 2 * max_tokens`` so attention's padded scratch stays bounded on the paths
    that pad for attention. A row longer than ``max_tokens`` forms a batch of its own.
    """
    order = np.argsort(-lengths, kind="stable")
    sorted_len = np.maximum(lengths[order], 1)
    batches, start, n = [], 0, len(order)
    while start < n:
        longest = int(sorted_len[start])
        size = max(1, min(max_rows, max_tokens // longest))
        if packed:
            # Rows are sorted longest first, so the real tokens of [start, start+k) grow
            # slower than k x longest: take as many rows as the budget allows.
            cap = max(1, min(max_rows, 2 * max_tokens // longest, n - start))
            csum = np.cumsum(sorted_len[start : start + cap])
            size = max(1, int(np.searchsorted(csum, max_tokens, side="right")))
        batches.append(order[start : start + size])
        start += size
    return batches


@dataclass
class Batch:
    """One collated batch, on the engine's device.

    ``rows``: (b,) int64 numpy indices into the Tokenized rows. Padded form: ``ids`` and
    ``mask`` are (b, L) int64, right-padded. Packed form: ``ids`` (T,) int64 real tokens
    only, ``positions`` (T,) int64 position of each token in its row, ``row_of`` (T,)
    int64 its batch row, ``cu_seqlens`` (b + 1,) int32 row starts; ``mask`` (b, L) is
    built too (pooling and the padded attention reference use it). ``max_len``: L.
    """

    rows: np.ndarray
    ids: torch.Tensor
    mask: torch.Tensor
    max_len: int
    positions: torch.Tensor | None = None
    row_of: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None


def collate(tok: Tokenized, rows: np.ndarray, pad_id: int, packed: bool,
            device: str) -> Batch:
    """Gather ``rows`` of ``tok`` into a :class:`Batch` on ``device``.

    On CUDA the host tensors are pinned and copied with ``non_blocking=True``, so the copy
    overlaps the compute that is still queued on the stream.
    """
    lengths = tok.lengths[rows]
    total, b, longest = int(lengths.sum()), len(rows), max(int(lengths.max()), 1)
    cu = np.zeros(b + 1, dtype=np.int64)
    np.cumsum(lengths, out=cu[1:])
    row_of = np.repeat(np.arange(b), lengths)
    pos = np.arange(total) - np.repeat(cu[:-1], lengths)
    ids = tok.flat[np.repeat(tok.offsets[rows], lengths) + pos]
    mask = np.zeros((b, longest), dtype=np.int64)
    mask[row_of, pos] = 1
    host: dict[str, np.ndarray] = {"mask": mask}
    if packed:
        host |= {"ids": ids, "positions": pos, "row_of": row_of,
                 "cu_seqlens": cu.astype(np.int32)}
    else:
        padded = np.full((b, longest), pad_id, dtype=np.int64)
        padded[row_of, pos] = ids
        host["ids"] = padded
    import torch

    cuda = device == "cuda"
    tensors = {}
    for name, arr in host.items():
        t = torch.from_numpy(arr)
        tensors[name] = t.pin_memory().to(device, non_blocking=True) if cuda else t
    return Batch(rows=rows, max_len=longest, **tensors)
