"""The quality gate: a precision other than fp32 must agree with fp32 on the job's rows.

Before an engine in bf16, fp16 or int8 writes a row, it runs a sample of the job's own
texts (topped up from lepton-batch's calibration sample when the job has fewer rows than
``quality.sample_rows``; see calibration.py) through itself and through the same model
loaded in fp32 (Hugging Face's padded forward, the reference). Embedding heads are
compared by the cosine of their mean-pooled last hidden states (the worst row counts),
classifier heads by how often the top label agrees.

The gate only measures: :func:`judge` returns a :class:`Verdict` and changes nothing.
The engine acts on it (``Encoder._gate`` in encoder.py): below the threshold it falls back
to the fp32 reference (or, with ``on_fail: error``, refuses to run); either way the figure
goes into the file metadata as a :class:`QualityCheck`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from lepton_batch.engine.batching import Tokenized, collate, plan_batches
from lepton_batch.engine.config import EngineConfig
from lepton_batch.engine.pooling import pool


class QualityError(RuntimeError):
    """The requested precision disagrees with fp32 beyond the job's threshold."""


class Gated(Protocol):
    """What the gate reads of an engine (``encoder.Encoder``); it calls, never sets."""

    config: EngineConfig
    device: str
    pad_id: int
    dtype: torch.dtype
    quantization: str

    def tokenize(self, texts: list[str]) -> Tokenized: ...

    def embed(self, tok: Tokenized, pooling: str, normalize: bool, max_tokens: int,
              max_rows: int) -> torch.Tensor: ...

    def logits(self, tok: Tokenized, max_tokens: int, max_rows: int) -> torch.Tensor: ...


@dataclass(frozen=True)
class QualityCheck:
    """What the gate measured. ``metric``: ``min_cosine`` or ``label_agreement``;
    ``candidate``: the precision that was checked (``bfloat16``, ``float32+int8`` …);
    ``used``: the precision the engine runs with after the check."""

    candidate: str
    metric: str
    value: float
    mean: float
    threshold: float
    passed: bool
    used: str
    sample_rows: int  # all rows it ran on: the job's, then calibration_rows
    seconds: float
    calibration_rows: int = 0  # of lepton-batch's calibration sample (calibration.py)

    def to_dict(self) -> dict:
        return asdict(self)

    def rows_used(self) -> str:
        """"64 rows of the job", or "8 rows of the job + 56 of lepton-batch's calibration
        sample"."""
        job = f"{self.sample_rows - self.calibration_rows} rows of the job"
        if not self.calibration_rows:
            return job
        return f"{job} + {self.calibration_rows} of lepton-batch's calibration sample"

    def summary(self) -> str:
        verdict = "kept" if self.passed else f"below {self.threshold}: using {self.used}"
        return (f"quality gate: {self.candidate} vs float32 on {self.rows_used()}, "
                f"{self.metric} {self.value:.4f} (mean {self.mean:.4f}); {verdict}")


@dataclass(frozen=True)
class Verdict:
    """The gate's judgement of one precision (``candidate``) against fp32: ``passed``
    when the measured agreement ``value`` (``metric``: the worst row's cosine, or the
    share of top labels that agree; ``mean`` beside it) reaches ``threshold``. ``reason``
    says why in one line, naming the job's setting."""

    passed: bool
    candidate: str
    metric: str
    value: float
    mean: float
    threshold: float
    reason: str
    sample_rows: int
    calibration_rows: int = 0

    def record(self, used: str, seconds: float) -> QualityCheck:
        """The check for the file metadata, once the engine runs with ``used``."""
        return QualityCheck(self.candidate, self.metric, round(self.value, 6),
                            round(self.mean, 6), self.threshold, self.passed, used,
                            self.sample_rows, seconds, self.calibration_rows)


def precision(engine: Gated) -> str:
    """The engine's precision as the gate names it: ``bfloat16``, ``float32+int8`` …"""
    name = str(engine.dtype).removeprefix("torch.")
    return name + (f"+{engine.quantization}" if engine.quantization != "none" else "")


@torch.inference_mode()
def _reference(engine: Gated, model: torch.nn.Module, tok: Tokenized) -> torch.Tensor:
    """fp32 outputs of ``model`` over ``tok`` with the padded HF forward, input order."""
    parts = []
    for idx in plan_batches(tok.lengths, 4096, 64):
        batch = collate(tok, idx, engine.pad_id, False, engine.device)
        out = model(input_ids=batch.ids, attention_mask=batch.mask)
        if engine.config.head == "classifier":
            parts.append((idx, out.logits.float().cpu()))
        else:
            hidden = out.last_hidden_state.float()
            parts.append((idx, pool(hidden, batch.mask, "mean").cpu()))
    outs = torch.empty(len(tok), parts[0][1].shape[1])
    for idx, val in parts:
        outs[torch.from_numpy(idx)] = val
    return outs


def judge(engine: Gated, reference: torch.nn.Module, sample: list[str],
          calibration_rows: int = 0) -> Verdict:
    """Compare ``engine`` with ``reference`` (the same model in fp32) on ``sample`` (whose
    last ``calibration_rows`` come from lepton-batch's calibration sample) against the
    job's threshold. Changes neither; the engine acts on the verdict."""
    cfg = engine.config
    candidate = precision(engine)
    tok = engine.tokenize(sample)
    want = _reference(engine, reference, tok)
    if cfg.head == "classifier":
        got = engine.logits(tok, 4096, 64)
        agree = (got.argmax(-1) == want.argmax(-1)).float()
        metric, value, mean, threshold = ("label_agreement", float(agree.mean()),
                                          float(agree.mean()), cfg.min_label_agreement)
        field = "min_label_agreement"
    else:
        got = engine.embed(tok, "mean", False, 4096, 64)
        cos = F.cosine_similarity(got, want, dim=-1)
        metric, value, mean, threshold = ("min_cosine", float(cos.min()), float(cos.mean()),
                                          cfg.min_cosine)
        field = "min_cosine"
    passed = value >= threshold
    if passed:
        reason = f"{metric} {value:.4f} >= quality.{field} {threshold}"
    else:
        reason = (f"{candidate} disagrees with float32 on {len(sample)} rows: {metric} "
                  f"{value:.4f} < quality.{field} {threshold}; use model.dtype: float32 and "
                  "model.quantization: none, or lower the threshold")
    return Verdict(passed, candidate, metric, value, mean, threshold, reason, len(sample),
                   calibration_rows)
