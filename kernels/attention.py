"""Attention backend choice, by capability, with the reason logged.

The engine hands the chosen name to transformers' ``attn_implementation``. flash-attn's
varlen kernel is used only when the package is installed and a CUDA device is present;
everything else runs torch's scaled-dot-product attention (SDPA), which is also the
reference the fast paths are compared against.
"""

from __future__ import annotations

import importlib.util
import logging

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
