"""What the embedding comparison measures besides the clock: matmul FLOPs of an encoder
forward, the machine's GEMM peak, padded tokens of a batching, and peak memory and GPU busy
share while a method runs."""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import psutil  # a dependency of dask.distributed
import torch

from lepton_batch.bench.common import sync

MiB = 1 << 20


def encoder_flops(config: Any, padded_tokens: int, seq_lens: np.ndarray) -> float:
    """Matmul FLOPs of a BERT-style encoder forward.

    Each token through the model (real or padding) costs, per layer, 2 x the weights of
    the linear layers: 4 h^2 (Q, K, V, output) + 2 h i (feed-forward); plus attention,
    4 L h (QK^T and attention x V, 2 L h each) with L the length its row's attention ran
    at, so a row adds 4 h L^2 per layer. Embeddings, norms, softmax and pooling are left
    out (~1 % for MiniLM).

    config: a transformers config (hidden_size, num_hidden_layers, intermediate_size).
    padded_tokens: tokens through the linear layers (rows x padded length, summed).
    seq_lens: (n,) each row's attention length: its batch's padded length, or its own
    length on an unpadded (packed) path, hence both arguments.
    """
    h, layers = int(config.hidden_size), int(config.num_hidden_layers)
    inter = int(getattr(config, "intermediate_size", None) or 4 * h)
    linear = 2 * (4 * h * h + 2 * h * inter) * layers
    attention = 4 * h * layers * float(np.square(seq_lens.astype(np.float64)).sum())
    return float(linear * padded_tokens + attention)


def gemm_peak(device: str, dtype: torch.dtype, m: int = 4096, k: int = 1024,
              n: int = 1024, tries: int = 10) -> float:
    """TFLOP/s (TOP/s for int8) of the best of ``tries`` (m, k) x (k, n) matmuls in
    ``dtype``; int8 as ``kernels/int8.py`` multiplies, int8 x int8 -> int32."""
    a, b = torch.randn(m, k, device=device).to(dtype), torch.randn(k, n, device=device).to(dtype)
    mm = torch._int_mm if dtype == torch.int8 else torch.matmul
    best = float("inf")
    for _ in range(tries + 1):  # the first is a warm-up
        sync(device)
        start = time.perf_counter()
        mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best / 1e12


def batch_pad(lengths: np.ndarray, order: np.ndarray, size: int) -> tuple[int, np.ndarray]:
    """Batches of ``size`` consecutive rows of ``order``, each padded to its longest row:
    (padded tokens, (n,) padded length of each row)."""
    seq = np.zeros_like(lengths)
    for start in range(0, len(order), size):
        idx = order[start : start + size]
        seq[idx] = lengths[idx].max()
    return int(seq.sum()), seq


def scaled_lengths(lengths: np.ndarray, tokens: int, padded: int) -> np.ndarray:
    """Attention lengths when only the totals are known: each row's length scaled by the
    padding (exact on the engine's packed path, where padded == tokens)."""
    return lengths * (padded / max(tokens, 1))


def _tree_rss() -> int:
    """RSS of this process and its children (a Dask worker), bytes."""
    me, total = psutil.Process(), 0
    for proc in (me, *me.children(recursive=True)):
        with contextlib.suppress(psutil.Error):  # a worker that just exited
            total += proc.memory_info().rss
    return total


def _nvml(read: Callable[[], float]) -> float | None:
    """One NVML reading through torch (needs the ``nvidia-ml-py`` package), or None."""
    try:
        return float(read())
    except Exception:  # noqa: BLE001 -- no NVML here: the figure is left out, not faked
        return None


class PeakMemory:
    """While a method runs: peak RSS (process tree) and, on CUDA, peak memory allocated
    in this process, peak device memory in use (NVML: a Dask worker's too) and the GPU
    busy share, sampled every 10 ms. Memory figures are MiB above their values at the
    start; memory the allocator kept from an earlier method is reused, not counted: read
    it as what a method needs on top of a warm process.

    GPU busy: the mean of NVML's utilization over the run, the share of time in which a
    kernel was running (what ``nvidia-smi`` shows as GPU-Util), whoever launched it.
    """

    def __init__(self, cuda: bool, in_process: bool = True) -> None:
        self.cuda, self.in_process, self._stop = cuda, in_process, threading.Event()
        self.base = self.peak = _tree_rss()
        self.busy: list[float] = []
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            self.cuda_base = torch.cuda.memory_allocated()
            self.device_base = self.device_peak = _nvml(torch.cuda.device_memory_used)
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _tree_rss())
            if self.cuda:
                util = _nvml(torch.cuda.utilization)
                if util is not None:
                    self.busy.append(util / 100)
                used = _nvml(torch.cuda.device_memory_used)
                if used is not None and self.device_peak is not None:
                    self.device_peak = max(self.device_peak, used)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.rss_mib = (max(self.peak, _tree_rss()) - self.base) / MiB
        self.cuda_mib: float | None = None
        self.gpu_busy = statistics.mean(self.busy) if self.busy else None
        if not self.cuda:
            return
        if self.in_process:
            self.cuda_mib = (torch.cuda.max_memory_allocated() - self.cuda_base) / MiB
        elif self.device_peak is not None and self.device_base is not None:
            self.cuda_mib = (self.device_peak - self.device_base) / MiB

