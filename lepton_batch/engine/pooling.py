"""Pooling of an encoder's hidden states into one vector per row, as sentence-transformers'
``Pooling`` module computes it; the engine's embeddings and the quality gate's fp32
reference both pool here."""

from __future__ import annotations

import torch


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
