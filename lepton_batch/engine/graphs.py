"""Decode steps with static shapes, replayed from CUDA graphs on a GPU.

A decode step over a few dozen sequences is a few hundred small kernels, and on a GPU the
host takes longer to launch them than the GPU takes to run them. A CUDA graph records the
launches of one step once and replays them with one call. A graph needs fixed shapes and
fixed addresses, so a step here runs with:

- the active sequences padded to a batch bucket (1, 2, 4, ... up to the slot count); a
  padding entry writes its key and value at position 0 of a free slot, which the next
  prefill into that slot overwrites;
- attention over a span bucket of the cache (64, 128, ... up to its length), masked per
  sequence at its position;
- ids and positions copied into buffers the graph reads, logits into one it writes.

One graph per (batch, span) bucket, captured the first time the bucket is needed (that step
runs eagerly, on a side stream, as the capture's warm-up). The second use of a graph is
checked: it replays, the same step runs eagerly, and on a difference beyond the dtype's
rounding (:func:`replay_agrees`) the graphs are dropped and decoding goes on eagerly, with
a warning. A capture that fails does the same.

Off CUDA the same static step runs eagerly: the tests check it on CPU against
``model.generate``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from lepton_batch.engine.decoder import DecoderStack
from lepton_batch.engine.kvcache import KVCache

log = logging.getLogger(__name__)

MIN_SPAN = 64


def bucket(n: int, cap: int, floor: int = 1) -> int:
    """The power of two at least ``n`` (and ``floor``), at most ``cap``."""
    return min(cap, max(floor, 1 << max(0, n - 1).bit_length()))


def replay_agrees(replayed: torch.Tensor, eager: torch.Tensor,
                  dtype: torch.dtype) -> tuple[bool, float]:
    """Whether a replayed step's logits (d, vocab) match the eager step's within the
    rounding of the model's ``dtype``; also the largest absolute difference.

    The replay and the eager call need not run the same kernels (library heuristics see a
    capture's stream and workspace), so in bf16 they differ by rounding that every layer
    compounds: 0.047 on a 24-layer bf16 Llama's logits on an H200, which the old fixed
    1e-2 tolerance took for a broken capture. A broken capture (a stale buffer, a wrong
    address) is off by the logits' own scale. Tolerance: 2**-5 of the largest |logit| in
    fp16/bf16, 2**-12 in fp32 (at least that of a largest |logit| of 1).
    """
    diff = float((replayed.float() - eager.float()).abs().max())
    scale = max(1.0, float(eager.float().abs().max()))
    rel = 2.0**-5 if dtype in (torch.float16, torch.bfloat16) else 2.0**-12
    return diff <= rel * scale, diff


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # the graph's output buffer, (batch, vocab) float32
    checked: bool = False


class DecodeGraphs:
    """Static-shape decode steps over ``cache``; CUDA graphs when ``capture``."""

    def __init__(self, stack: DecoderStack, cache: KVCache, pad_id: int, capture: bool) -> None:
        self.stack, self.cache = stack, cache
        self.slots, self.span_cap = cache.k.shape[1], cache.k.shape[3]
        device = cache.k.device
        self.ids = torch.full((self.slots,), pad_id, dtype=torch.int64, device=device)
        self.pos = torch.zeros(self.slots, dtype=torch.int64, device=device)
        self.pad_id = pad_id
        self.capture = capture
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.pool = None
        self.replays = 0

    def describe(self) -> str:
        if not self.capture:
            return "static decode steps, eager"
        return f"{len(self.graphs)} CUDA graphs, {self.replays} replays"

    def _step(self, batch: int, span: int) -> torch.Tensor:
        """(batch, vocab) logits for the first ``batch`` buffer entries."""
        ids, pos = self.ids[:batch], self.pos[:batch]
        attend = self.cache.decode_attend(pos, span)
        return self.stack.logits(self.stack.hidden(ids, pos, attend))

    def __call__(self, last: np.ndarray, pos: np.ndarray) -> torch.Tensor:
        """Logits (d, vocab) of one decode step of slots ``0 .. d-1``: ``last`` (d,) their
        newest tokens at positions ``pos`` (d,)."""
        d = len(last)
        batch = bucket(d, self.slots)
        span = bucket(int(pos.max()) + 1, self.span_cap, MIN_SPAN)
        device = self.ids.device
        self.ids[:d] = torch.as_tensor(last, device=device)
        self.pos[:d] = torch.as_tensor(pos, device=device)
        if batch > d:
            self.ids[d:batch] = self.pad_id
            self.pos[d:batch] = 0
        if not self.capture:
            return self._step(batch, span)[:d]
        entry = self.graphs.get((batch, span))
        if entry is None:
            return self._capture(batch, span)[:d]
        entry.graph.replay()
        self.replays += 1
        if not entry.checked:
            eager = self._step(batch, span)
            ok, diff = replay_agrees(entry.logits[:d], eager[:d], self.cache.k.dtype)
            if not ok:
                self._give_up(f"a replay differs from the eager step by {diff:.3g}")
                return eager[:d]
            entry.checked = True
        return entry.logits[:d]

    def _capture(self, batch: int, span: int) -> torch.Tensor:
        """Capture the (batch, span) graph; returns this step's logits, computed eagerly
        as the capture's warm-up."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            eager = self._step(batch, span)  # also warms up cuBLAS and the SDPA kernels
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: a CUDA call from another of the worker's threads during the
            # capture is not an error of this capture.
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                logits = self._step(batch, span)
        except Exception as exc:  # noqa: BLE001 -- any capture failure means eager decode
            self._give_up(f"capture failed: {exc}")
            return eager
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs[(batch, span)] = _Graph(graph, logits)
        log.debug("captured a decode graph: batch %d, span %d", batch, span)
        return eager

    def _give_up(self, why: str) -> None:
        log.warning("CUDA graphs off for this generate call, decoding eagerly: %s", why)
        self.capture = False
        self.graphs.clear()
        self.pool = None
