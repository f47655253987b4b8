"""The throughput engine: a model loaded once per worker, fed token-budget batches.

``batching``: plans and collation (padded or packed); ``load``: device, dtype, weights;
``packed``: the BERT family without padding; ``encoder``: the encoder engine (embed,
logits) and ``pooling``; ``quality``: the gate any precision but fp32 passes before it
writes a row (it returns a verdict; the engine acts on it); ``tokens``: the model's
tokenizer without transformers. Causal LMs: ``decoder`` (the model, our forward, score),
``kvcache``, and ``generate``, which wires ``scheduler`` (slots, admission, finishing),
``steps`` (one forward per step; ``graphs``: static shapes, CUDA graphs) and ``sampler``.

The names below load their module on first use: the driver plans a job with
``EngineConfig``, ``Tokenized`` and ``BatchStats`` without importing torch (seconds on a
small machine, which the embedded workers need then for their own imports).
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lepton_batch.engine.batching import Batch, BatchStats, Tokenized, collate, plan_batches
from lepton_batch.engine.config import EngineConfig

if TYPE_CHECKING:
    from lepton_batch.engine.decoder import Decoder
    from lepton_batch.engine.encoder import Encoder, is_oom
    from lepton_batch.engine.load import resolve_device, resolve_dtype
    from lepton_batch.engine.pooling import pool
    from lepton_batch.engine.quality import QualityCheck, QualityError
    from lepton_batch.engine.tokens import Pretokenized

_LAZY = {"Encoder": "encoder", "is_oom": "encoder", "pool": "pooling",
         "resolve_device": "load", "resolve_dtype": "load",
         "QualityCheck": "quality", "QualityError": "quality"}


def __getattr__(name: str) -> Any:
    """The torch-backed names, imported on first use (PEP 562)."""
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

log = logging.getLogger(__name__)


def _never() -> bool:
    return False


def _nothing() -> None:
    return None


class EngineCache:
    """Engines loaded in this process, keyed by their config: one load per worker.

    ``warming()``: whether this process is still importing the model stack ahead of its
    first task (a Dask worker's warm-up, see ``cluster.warm_up``); ``wait()`` blocks until
    that has ended, and runs before any engine loads. Outside a warmed worker, neither.
    """

    def __init__(self, warming: Callable[[], bool] = _never,
                 wait: Callable[[], None] = _nothing) -> None:
        self._engines: dict[EngineConfig, Encoder] = {}
        self._lock = threading.Lock()  # worker threads share the cache; load each model once
        self._warming, self._wait = warming, wait
        self.loads = 0

    def wait_for_warm_up(self) -> None:
        """Block until this process's warm-up has ended: code that imports transformers
        must not run beside it (its lazy module is not safe to import from two threads)."""
        self._wait()

    def pretokenize(self, config: EngineConfig, texts: list[str]) -> Pretokenized | None:
        """Tokenize the leading rows of ``texts`` while this worker's warm-up still runs,
        with the model's ``tokenizer.json`` and no transformers; stop when it ends (then
        the engine loads). The warm-up imports on one core; the tokenizer's Rust code runs
        on another without holding the GIL, so these ids cost the shard little time. None when
        the engine is loaded already, nothing is warming or the model has no
        ``tokenizer.json``; the engine checks the tokenizer before it uses the ids
        (``Encoder.adopt``)."""
        if config in self._engines or not texts or not self._warming():
            return None
        from lepton_batch.engine.tokens import PRETOKENIZE_ROWS, Pretokenized, file_tokenizer

        tokenizer = file_tokenizer(Path(config.model_dir), config.max_length)
        if tokenizer is None:
            return None
        parts: list[Tokenized] = []
        done = 0
        while done < len(texts) and self._warming():
            batch = texts[done : done + PRETOKENIZE_ROWS]
            parts.append(Tokenized.from_encodings(tokenizer.encode_batch_fast(batch)))
            done += len(batch)
        log.debug("tokenized %d of %d rows while the warm-up imported", done, len(texts))
        return Pretokenized(tokenizer.to_str(), Tokenized.concat(parts)) if parts else None

    def get(self, config: EngineConfig,
            sample: Callable[[], list[str]] | None = None) -> Encoder | Decoder:
        """The engine for ``config``, loaded on first use; ``sample()`` (some of the job's
        texts, only asked for when the engine loads) calibrates and checks a reduced
        precision (see ``quality.py``)."""
        with self._lock:
            if config not in self._engines:
                self._wait()
                log.info("loading %s (%s head)", config.model_dir, config.head)
                if config.head == "causal_lm":
                    from lepton_batch.engine.decoder import Decoder

                    self._engines[config] = Decoder(config)
                else:
                    from lepton_batch.engine.encoder import Encoder

                    self._engines[config] = Encoder(config, sample() if sample else None)
                self.loads += 1
            return self._engines[config]


__all__ = ["Batch", "BatchStats", "Encoder", "EngineCache", "EngineConfig", "QualityCheck",
           "QualityError", "Tokenized", "collate", "is_oom", "plan_batches", "pool",
           "resolve_device", "resolve_dtype"]
