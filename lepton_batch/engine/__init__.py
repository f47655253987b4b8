"""The throughput engine: a model loaded once per worker, fed token-budget batches.

``batching``: plans and collation (padded or packed); ``load``: device, dtype, weights;
``packed``: the BERT family without padding; ``encoder``: the engine itself (embed,
logits); ``quality``: the gate any precision but fp32 passes before it writes a row.

The names below load their module on first use: the driver plans a job with
``EngineConfig``, ``Tokenized`` and ``BatchStats`` without importing torch (seconds on a
small machine, which the embedded workers need then for their own imports).
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lepton_batch.engine.batching import Batch, BatchStats, Tokenized, collate, plan_batches
from lepton_batch.engine.config import EngineConfig

if TYPE_CHECKING:
    from lepton_batch.engine.decoder import Decoder
    from lepton_batch.engine.encoder import Engine, is_oom, pool
    from lepton_batch.engine.load import resolve_device, resolve_dtype
    from lepton_batch.engine.quality import QualityCheck, QualityError

_LAZY = {"Engine": "encoder", "is_oom": "encoder", "pool": "encoder",
         "resolve_device": "load", "resolve_dtype": "load",
         "QualityCheck": "quality", "QualityError": "quality"}


def __getattr__(name: str) -> Any:
    """The torch-backed names, imported on first use (PEP 562)."""
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

log = logging.getLogger(__name__)


class EngineCache:
    """Engines loaded in this process, keyed by their config: one load per worker."""

    def __init__(self) -> None:
        self._engines: dict[EngineConfig, Engine] = {}
        self._lock = threading.Lock()  # worker threads share the cache; load each model once
        self.loads = 0

    def get(self, config: EngineConfig,
            sample: Callable[[], list[str]] | None = None) -> Engine | Decoder:
        """The engine for ``config``, loaded on first use; ``sample()`` (some of the job's
        texts, only asked for when the engine loads) calibrates and checks a reduced
        precision (see ``quality.py``)."""
        with self._lock:
            if config not in self._engines:
                log.info("loading %s (%s head)", config.model_dir, config.head)
                if config.head == "causal_lm":
                    from lepton_batch.engine.decoder import Decoder

                    self._engines[config] = Decoder(config)
                else:
                    from lepton_batch.engine.encoder import Engine

                    self._engines[config] = Engine(config, sample() if sample else None)
                self.loads += 1
            return self._engines[config]


__all__ = ["Batch", "BatchStats", "Engine", "EngineCache", "EngineConfig", "QualityCheck",
           "QualityError", "Tokenized", "collate", "is_oom", "plan_batches", "pool",
           "resolve_device", "resolve_dtype"]
