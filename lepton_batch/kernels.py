"""Compute kernels and their dispatch: the package ``lepton_batch.kernels``, whose modules
are in the repository's top-level ``kernels/`` folder (see
:func:`lepton_batch.top_level_folder`)."""

from lepton_batch import top_level_folder

__path__ = top_level_folder(__file__)

# Imported once __path__ is set: the submodule lives in the folder it names.
from lepton_batch.kernels.attention import (
    avoid_cudnn_sdpa,
    pick_attention,
    pick_varlen,
    varlen_attention,
)

__all__ = ["avoid_cudnn_sdpa", "pick_attention", "pick_varlen", "varlen_attention"]
