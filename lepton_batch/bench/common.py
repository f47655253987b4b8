"""What both comparisons (embed and generate) share: the device, the machine's facts, and
waiting for the device before a clock is read."""

from __future__ import annotations

import contextlib
import os

import torch


def pick_device(device: str) -> str:
    """``auto``: cuda when torch sees one, else cpu."""
    return "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) \
        else "cpu"


def machine_facts(device: str) -> dict[str, str]:
    """Versions, threads, device, CPU model and capability."""
    import transformers

    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    facts = {"torch": torch.__version__, "transformers": transformers.__version__,
             "threads": str(torch.get_num_threads()), "device": device,
             "cpu": f"{cpu or 'unknown'}, {os.cpu_count()} cores",
             "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if device == "cuda":
        facts["gpu"] = torch.cuda.get_device_name()
    return facts


def sync(device: str) -> None:
    """Wait for the device's queued work, so that a clock read after it is true."""
    if device == "cuda":
        torch.cuda.synchronize()


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``bfloat16``."""
    return str(dtype).removeprefix("torch.")
