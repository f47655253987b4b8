"""The sampler of ``generate``: the next token of each sequence from its logits.

Greedy (``do_sample`` false, which ``temperature: 0`` resolves to) takes the argmax, as
``model.generate`` does. Sampling runs the logits processors in ``model.generate``'s order
and draws by inverse CDF from counter-based uniforms: a row's draw depends only on its seed
(job seed and row id, :func:`row_seed`) and its step, never on the batch it runs in, so a
resumed or resharded job writes the same text.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from lepton_batch.engine.batching import Tokenized
    from lepton_batch.engine.grammar import Grammars
    from lepton_batch.engine.scheduler import StepPlan


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked; the processors run in ``model.generate``'s order:
    repetition penalty, then (sampling only) temperature, top-k, top-p."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def process(self, logits: torch.Tensor, history: torch.Tensor | None) -> torch.Tensor:
        """logits (b, V) float32; history (b, T) int64 ids seen so far (prompt included;
        padding repeats a row's own id). Returns the processed logits."""
        if self.repetition_penalty != 1.0 and history is not None:
            seen = logits.gather(1, history)
            seen = torch.where(seen < 0, seen * self.repetition_penalty,
                               seen / self.repetition_penalty)
            logits = logits.scatter(1, history, seen)
        if not self.do_sample:
            return logits
        if self.temperature != 1.0:
            logits = logits / self.temperature
        if 0 < self.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=False)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum <= 1 - self.top_p
            drop[:, -1] = False  # keep at least the most likely token
            logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        return logits

    def pick(self, logits: torch.Tensor, uniforms: torch.Tensor | None) -> torch.Tensor:
        """(b,) int64 next tokens: argmax, or inverse-CDF sampling with ``uniforms`` (b,)
        float64 in (0, 1), so a row's draw depends only on its own seed and step."""
        if not self.do_sample:
            return logits.argmax(-1)
        cdf = logits.softmax(-1).double().cumsum(-1)
        target = uniforms.to(cdf.device)[:, None] * cdf[:, -1:]
        picked = torch.searchsorted(cdf, target)[:, 0]
        return picked.clamp_(max=logits.shape[-1] - 1)


@dataclass(frozen=True)
class RowSampling:
    """Per-row sampling values, (n,) arrays from the job's columns: ``temperature`` float64
    (0: that row is greedy), ``top_k`` int64 (0: off), ``top_p`` float64. A row with the
    same values as a :class:`Sampling` draws the same tokens as under it."""

    temperature: np.ndarray
    top_k: np.ndarray
    top_p: np.ndarray

    def process(self, logits: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        """Temperature, top-k, top-p of each of ``rows`` (b,) on its logits (b, V), as
        :meth:`Sampling.process` does with one value for all."""
        t, k, p = self.temperature[rows], self.top_k[rows], self.top_p[rows]
        dev = logits.device
        sampled = t > 0
        if (t[sampled] != 1.0).any():
            scale = torch.as_tensor(np.where(sampled, t, 1.0), dtype=torch.float32,
                                    device=dev)
            logits = logits / scale[:, None]
        vocab = logits.shape[-1]
        k = np.where(sampled & (k > 0) & (k < vocab), k, 0)
        if k.any():
            top = torch.topk(logits, int(k.max()), dim=-1).values
            kth = top.gather(1, torch.as_tensor(np.maximum(k - 1, 0), device=dev)[:, None])
            cut = (logits < kth) & torch.as_tensor(k > 0, device=dev)[:, None]
            logits = logits.masked_fill(cut, float("-inf"))
        p = np.where(sampled, p, 1.0)
        if (p < 1.0).any():
            sorted_logits, order = torch.sort(logits, descending=False)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum <= torch.as_tensor(1 - p, dtype=torch.float32, device=dev)[:, None]
            drop &= torch.as_tensor(p < 1.0, device=dev)[:, None]
            drop[:, -1] = False  # keep at least the most likely token
            logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        return logits

    def pick(self, logits: torch.Tensor, rows: np.ndarray,
             uniforms: torch.Tensor) -> torch.Tensor:
        """(b,) int64: argmax for the greedy rows, inverse-CDF draws for the others."""
        greedy = logits.argmax(-1)
        sampled = torch.as_tensor(self.temperature[rows] > 0, device=logits.device)
        if not bool(sampled.any()):
            return greedy
        return torch.where(sampled, Sampling(do_sample=True).pick(logits, uniforms), greedy)


def row_seed(seed: int, row_id: object) -> int:
    """A 63-bit seed for one row from the job's seed and the row's id (any type)."""
    digest = hashlib.blake2b(f"{seed}\x00{row_id!r}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser over uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def uniforms(seeds: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """(b,) float64 in (0, 1) from per-row ``seeds`` and ``steps``: counter-based, so a row
    draws the same numbers whatever batch it runs in."""
    with np.errstate(over="ignore"):
        x = _mix(seeds.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
                 * (steps.astype(np.uint64) + np.uint64(1)))
    return ((x >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)


class Sampler:
    """Next tokens for the slots of one ``generate`` call.

    tok: the n prompts; seeds: (n,) int64 per-row seeds. With a repetition penalty it keeps
    each slot's ids seen so far, ``history`` (slots, max_len) int64 on ``device``: the
    prompt when the row is admitted, then each picked token at its position.
    """

    def __init__(self, sampling: Sampling, tok: Tokenized, seeds: np.ndarray, slots: int,
                 max_len: int, device: str, rows: RowSampling | None = None,
                 grammars: Grammars | None = None) -> None:
        self.sampling, self.tok, self.seeds, self.device = sampling, tok, seeds, device
        self.rows, self.grammars = rows, grammars
        self.history = None
        if sampling.repetition_penalty != 1.0:
            self.history = torch.zeros((slots, max_len), dtype=torch.int64, device=device)

    def move(self, src: int, dst: int) -> None:
        """Slot ``src``'s sequence now lives in slot ``dst`` (see ``Scheduler``)."""
        if self.history is not None:
            self.history[dst] = self.history[src]

    def __call__(self, logits: torch.Tensor, plan: StepPlan) -> np.ndarray:
        """(b,) int64 next tokens of slots ``0 .. b-1`` from their logits (b, V) float32,
        after the step ``plan`` (its admitted rows in the slots after the decoded ones)."""
        history, tok = self.history, self.tok
        b = len(plan.rows)
        if history is not None:
            d = b - len(plan.admitted)
            for j, r in enumerate(plan.admitted):
                row = torch.as_tensor(tok.flat[tok.offsets[r]: tok.offsets[r + 1]])
                history[d + j, :len(row)] = row
                history[d + j, len(row):] = row[0]
        hist = history[:b, :int(plan.next_pos.max()) + 1] if history is not None else None
        if self.grammars is not None:
            self.grammars.mask(logits, plan.rows.tolist())
        u = None
        if self.sampling.do_sample or self.rows is not None:
            u = torch.from_numpy(uniforms(self.seeds[plan.rows], plan.generated))
        if self.rows is None:
            new = self.sampling.pick(self.sampling.process(logits, hist), u)
        else:  # per-row values: the penalty as for all, then each row's own
            processed = Sampling(repetition_penalty=self.sampling.repetition_penalty).process(
                logits, hist)
            new = self.rows.pick(self.rows.process(processed, plan.rows), plan.rows, u)
        new = new.cpu().numpy()
        if self.grammars is not None:
            self.grammars.consume(plan.rows.tolist(), new.tolist())
        if history is not None:
            history[torch.arange(b, device=self.device),
                    torch.as_tensor(plan.next_pos, device=self.device)] = torch.as_tensor(
                        new, device=self.device)
        return new
