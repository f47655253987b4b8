"""Compute kernels and their dispatch (installed as ``lepton_batch.kernels``)."""

from lepton_batch.kernels.attention import (
    avoid_cudnn_sdpa,
    pick_attention,
    pick_varlen,
    varlen_attention,
)

__all__ = ["avoid_cudnn_sdpa", "pick_attention", "pick_varlen", "varlen_attention"]
