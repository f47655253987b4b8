"""Model directory -> model on the device: device, dtype, attention backend, int8 swap."""

from __future__ import annotations

import functools
import logging
import os
import time

import torch
from torch import nn

from lepton_batch.engine.config import EngineConfig

log = logging.getLogger(__name__)


def set_cpu_threads(config: EngineConfig) -> None:
    """torch's thread pool for a CPU engine: ``engine.threads``, else LEPTON_BATCH_THREADS,
    else every core. Dask's nanny starts workers with OMP_NUM_THREADS=1, so it is set
    explicitly."""
    threads = config.threads or int(os.environ.get("LEPTON_BATCH_THREADS", 0)) or (
        os.cpu_count() or 1)
    torch.set_num_threads(threads)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device is cuda but torch sees no CUDA device")
    return device


@functools.cache
def cpu_bf16_speedup() -> float:
    """bf16 over fp32 GEMM speed on this CPU (best of 3, 512 x 1024 x 1024); 0.0 when the
    CPU has no native bf16 (avx512_bf16 or AMX), where bf16 is emulated and slow."""
    if not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return 0.0
    a, b = torch.randn(512, 1024), torch.randn(1024, 1024)

    def best(x: torch.Tensor, y: torch.Tensor) -> float:
        x @ y  # warm-up
        times = []
        for _ in range(3):
            start = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - start)
        return min(times)

    return best(a, b) / best(a.bfloat16(), b.bfloat16())


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto``: bf16 (or fp16) on CUDA; on CPU bf16 where the CPU computes it natively and
    a GEMM measures faster than fp32 (AMX: ~12x here), else fp32. fp16 never on CPU by
    default (~1 GFLOP/s on these CPUs). The quality gate checks any choice but fp32."""
    if dtype == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        speedup = cpu_bf16_speedup()
        log.info("CPU bf16 GEMM speed-up over fp32: %.1fx", speedup)
        return torch.bfloat16 if speedup > 1.2 else torch.float32
    if dtype == "float16" and device == "cpu":
        log.warning("model.dtype float16 on CPU is very slow on most CPUs; prefer bfloat16")
    return getattr(torch, dtype)


def load_model(config: EngineConfig, dtype: torch.dtype, device: str,
               attn_implementation: str) -> nn.Module:
    """The model of ``config.head`` from ``config.model_dir``, in ``dtype`` on ``device``,
    in eval mode. Weights load straight into ``dtype``; safetensors unless pickles are
    allowed."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if config.head == "classifier" else AutoModel
    return cls.from_pretrained(
        config.model_dir,
        dtype=dtype,
        attn_implementation=attn_implementation,
        trust_remote_code=config.trust_remote_code,
        # True refuses pickled weights; None prefers safetensors and falls back to the
        # pickle (False would refuse safetensors, and so a safetensors-only model).
        use_safetensors=None if config.allow_pickle else True,
    ).to(device).eval()
