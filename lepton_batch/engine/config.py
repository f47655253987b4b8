"""What identifies a loaded engine, importable without torch (the driver plans with it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Head = Literal["base", "classifier", "causal_lm"]


@dataclass(frozen=True)
class EngineConfig:
    """Everything that identifies a loaded model; the engine cache is keyed by it."""

    model_dir: str
    head: Head
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda
    max_length: int = 512
    trust_remote_code: bool = False
    allow_pickle: bool = False  # load pytorch_model.bin when there is no safetensors
    threads: int | None = None
    quantization: str = "none"  # none | int8
    packed: bool = True  # BERT-family models run on packed rows (see packed.py)
    compile: bool = False  # torch.compile the packed layers (see packed.py)
    # The quality gate: a precision other than fp32 must agree with fp32 on a sample of
    # the job's rows (see quality.py); 0 turns the check off.
    min_cosine: float = 0.99
    min_label_agreement: float = 0.98
    on_fail: str = "fallback"  # fallback (to float32) | error
