"""lepton-batch: batch offline inference for large text corpora."""

__version__ = "0.1.0"
