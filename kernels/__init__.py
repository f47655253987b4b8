"""Compute kernels and their dispatch (installed as ``lepton_batch.kernels``)."""

from lepton_batch.kernels.attention import pick_attention, pick_varlen, varlen_attention

__all__ = ["pick_attention", "pick_varlen", "varlen_attention"]
