"""The KV cache of ``generate``: keys and values of a fixed number of sequence slots, and
the attention of a prefill or a decode step over them (SDPA with a per-sequence mask).

Sequences occupy slots ``0 .. active-1``; the scheduler (``scheduler.py``) moves a slot's
keys and values when an earlier one frees, so a decode step reads one contiguous block.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from lepton_batch.engine.decoder import Attend, DecoderStack


class KVCache:
    """Keys and values of ``slots`` sequences, up to ``max_len`` tokens each.

    ``k``, ``v``: (layers, slots, n_kv, max_len, head_dim) in the model dtype, zeroed so
    a masked-out position never holds a NaN that would leak through attention.
    """

    def __init__(self, stack: DecoderStack, slots: int, max_len: int, dtype: torch.dtype,
                 device: str) -> None:
        shape = (stack.n_layers, slots, stack.n_kv, max_len, stack.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.gqa = stack.n_kv != stack.n_heads
        self.scaling = stack.scaling

    @staticmethod
    def bytes_per_token(stack: DecoderStack, dtype: torch.dtype) -> int:
        itemsize = torch.empty(0, dtype=dtype).element_size()
        return 2 * stack.n_layers * stack.n_kv * stack.head_dim * itemsize

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot ``src``'s first ``length`` positions into slot ``dst``."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def prefill_attend(self, first: int, lengths: torch.Tensor, width: int,
                       start: int) -> Attend:
        """Attention for a prefill of b sequences into slots ``first .. first+b-1``.

        Each sequence's tokens sit at positions ``start .. start+width-1`` (right-padded to
        ``width``; ``lengths`` (b,) int64 real tokens); positions ``< start`` already hold a
        shared prefix. Queries are (b * width, H, D), row-major.
        """
        b = lengths.shape[0]
        device = lengths.device
        i = torch.arange(width, device=device)
        j = torch.arange(start + width, device=device)
        rel = j[None, :] - start  # key position relative to the new tokens
        mask = (rel[None] <= i[None, :, None]) & (rel[None] < lengths[:, None, None])
        mask = (mask | (j < start)[None, None, :])[:, None]  # (b, 1, width, start+width)
        slots = slice(first, first + b)

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            h, d = q.shape[1], q.shape[2]
            self.k[layer, slots, :, start:start + width] = k.view(b, width, -1, d).transpose(1, 2)
            self.v[layer, slots, :, start:start + width] = v.view(b, width, -1, d).transpose(1, 2)
            keys = self.k[layer, slots, :, :start + width]
            values = self.v[layer, slots, :, :start + width]
            qq = q.view(b, width, h, d).transpose(1, 2)
            o = F.scaled_dot_product_attention(qq, keys, values, attn_mask=mask,
                                               scale=self.scaling[layer], enable_gqa=self.gqa)
            return o.transpose(1, 2).reshape(b * width, h * d)

        return attend

    def decode_attend(self, positions: torch.Tensor, span: int) -> Attend:
        """Attention for one new token in each of slots ``0 .. b-1`` at ``positions`` (b,)
        int64; keys up to ``span`` (> every position) are read."""
        b = positions.shape[0]
        rows = torch.arange(b, device=positions.device)
        mask = (torch.arange(span, device=positions.device)[None] <= positions[:, None])
        mask = mask[:, None, None, :]  # (b, 1, 1, span)

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            self.k[layer, rows, :, positions] = k
            self.v[layer, rows, :, positions] = v
            o = F.scaled_dot_product_attention(
                q[:, :, None], self.k[layer, :b, :, :span], self.v[layer, :b, :, :span],
                attn_mask=mask, scale=self.scaling[layer], enable_gqa=self.gqa)
            return o.reshape(b, -1)

        return attend
