"""Attention backend choice, by capability, with the reason logged.

The engine hands the chosen name to transformers' ``attn_implementation``. flash-attn's
varlen kernel is used only when the package is installed and a CUDA device is present;
everything else runs torch's scaled-dot-product attention (SDPA), which is also the
reference the fast paths are compared against.
"""

from __future__ import annotations

import importlib.util
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def pick_attention(device: str, dtype_name: str) -> tuple[str, str]:
    """Return ``(attn_implementation, reason)`` for a model on ``device`` in ``dtype_name``.

    ``device`` is ``"cpu"`` or ``"cuda"``; ``dtype_name`` is a torch dtype name such as
    ``"float32"`` or ``"bfloat16"``.
    """
    if device != "cuda":
        return "sdpa", "CPU: torch SDPA (flash-attn kernels are GPU only)"
    if dtype_name not in ("float16", "bfloat16"):
        return "sdpa", f"flash-attn needs fp16/bf16, model runs in {dtype_name}: torch SDPA"
    if importlib.util.find_spec("flash_attn") is None:
        return "sdpa", "flash-attn not installed (pip install 'lepton-batch[gpu]'): torch SDPA"
    return "flash_attention_2", "CUDA + flash-attn installed: flash_attention_2"


def avoid_cudnn_sdpa(device: str) -> str | None:
    """On CUDA, take cuDNN out of SDPA's backends for this process; returns the reason
    (logged once), None elsewhere.

    cuDNN's attention builds an execution plan for every new shape. Our decoder's eager
    steps attend over a key span that grows by one token per step, and score batches and
    padded encoder batches come in many shapes: each would pay a new plan. Measured on an
    H200 (torch 2.11, cu130): eager greedy decode of the same 48 rows and 186 steps took
    17.8 s in bf16 against 1.0 s in fp32 (cuDNN attention takes only fp16/bf16), and
    1.3 s in bf16 with bucketed (static) shapes. FlashAttention, memory-efficient and math
    kernels need no plan; this is the switch torch documents
    (``torch.backends.cuda.enable_cudnn_sdp``).
    """
    if device != "cuda" or not torch.backends.cuda.cudnn_sdp_enabled():
        return None
    torch.backends.cuda.enable_cudnn_sdp(False)
    reason = ("cuDNN SDPA off for this process: it builds an execution plan per new shape, "
              "and batches and decode steps here change shape every time")
    log.info("%s", reason)
    return reason


def _torch_varlen():
    """torch's own varlen attention (``torch.nn.attention.varlen``), or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def pick_varlen(device: str, dtype_name: str) -> tuple[str, str]:
    """Attention for packed rows: ``(backend, reason)``, backend one of ``flash_attn``,
    ``torch_varlen`` (both GPU only, fp16/bf16) or ``sdpa_padded`` (everywhere)."""
    if device != "cuda":
        return "sdpa_padded", "CPU: dense layers packed, attention by torch SDPA per batch"
    if dtype_name not in ("float16", "bfloat16"):
        return "sdpa_padded", f"varlen kernels need fp16/bf16, model runs in {dtype_name}"
    if importlib.util.find_spec("flash_attn") is not None:
        return "flash_attn", "CUDA + flash-attn installed: flash_attn_varlen_func"
    if _torch_varlen() is not None:
        return "torch_varlen", "flash-attn not installed: torch.nn.attention.varlen"
    return "sdpa_padded", "no varlen kernel in this torch: torch SDPA per batch"


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_len: int, backend: str, row_of: torch.Tensor, positions: torch.Tensor,
                     key_mask: torch.Tensor | None) -> torch.Tensor:
    """Bidirectional attention within each packed row.

    q, k, v: (T, heads, head_dim), rows back to back; cu_seqlens: (b + 1,) int32 row starts;
    max_len: longest row. ``sdpa_padded`` (the reference) also needs row_of (T,) int64,
    positions (T,) int64 and key_mask (b, max_len) bool (None: every row is max_len
    long), to scatter into (b, heads, L,
    head_dim) and back. Returns (T, heads, head_dim) in q's dtype; scale 1/sqrt(head_dim).
    """
    if backend == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len)
    if backend == "torch_varlen":
        return _torch_varlen()(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len)
    assert backend == "sdpa_padded", f"unknown varlen backend {backend!r}"
    b, heads, dim = len(cu_seqlens) - 1, q.shape[1], q.shape[2]

    def pad(x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(b, max_len, heads, dim)
        out[row_of, positions] = x
        return out.transpose(1, 2)

    mask = None if key_mask is None else key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask)
    return out.transpose(1, 2)[row_of, positions]


class PaddedAttention:
    """The ``sdpa_padded`` backend for one batch, from a fused q/k/v projection.

    :func:`varlen_attention` (the reference) scatters q, k and v into padded tensors and
    gathers the result back, allocating all four per layer. Here one padded buffer
    (b, max_len, 3, heads, head_dim) is zeroed once per batch and reused by every layer:
    q/k/v go in with a single row copy, and pad positions stay zero. A batch whose rows
    all have max_len tokens needs no buffer at all.

    rows: b; row_of, positions: (T,) int64; key_mask: (b, max_len) bool or None (every
    row max_len long). Calling it with qkv (T, 3 * heads * head_dim) returns (T, heads *
    head_dim), q/k/v's dtype, scale 1/sqrt(head_dim).
    """

    def __init__(self, rows: int, max_len: int, row_of: torch.Tensor, positions: torch.Tensor,
                 key_mask: torch.Tensor | None, heads: int, head_dim: int) -> None:
        self.shape = (rows, max_len, 3, heads, head_dim)
        self.mask = None if key_mask is None else key_mask[:, None, None, :]
        self.flat = None if key_mask is None else row_of * max_len + positions
        self.buf: torch.Tensor | None = None

    def __call__(self, qkv: torch.Tensor) -> torch.Tensor:
        b, length, _, heads, dim = self.shape
        if self.flat is None:
            padded = qkv.view(self.shape)
        else:
            if self.buf is None:
                self.buf = qkv.new_zeros(self.shape)
            self.buf.view(b * length, -1).index_copy_(0, self.flat, qkv)
            padded = self.buf
        q, k, v = (t.transpose(1, 2) for t in padded.unbind(2))  # (b, heads, L, dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)
        out = out.transpose(1, 2).reshape(b * length, heads * dim)
        return out if self.flat is None else out.index_select(0, self.flat)
