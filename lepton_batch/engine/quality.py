"""The quality gate: a precision other than fp32 must agree with fp32 on the job's rows.

Before an engine in bf16, fp16 or int8 writes a row, it runs a sample of the job's own
texts (topped up from lepton-batch's calibration sample when the job has fewer rows than
``quality.sample_rows``; see calibration.py) through itself and through the same model
loaded in fp32 (Hugging Face's padded forward, the reference). Embedding heads are
compared by the cosine of their mean-pooled last hidden states (the worst row counts),
classifier heads by how often the top label agrees. Below the threshold the engine falls
back to the fp32 reference (or, with ``on_fail: error``, refuses to run); either way the
figure goes into the file metadata.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from lepton_batch.engine.batching import collate, plan_batches
from lepton_batch.engine.load import load_model

if TYPE_CHECKING:
    from lepton_batch.engine.encoder import Engine

log = logging.getLogger(__name__)


class QualityError(RuntimeError):
    """The requested precision disagrees with fp32 beyond the job's threshold."""


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


@torch.inference_mode()
def _reference(engine: Engine, model: torch.nn.Module, tok) -> torch.Tensor:
    """fp32 outputs of ``model`` over ``tok`` with the padded HF forward, input order."""
    from lepton_batch.engine.encoder import pool  # encoder imports this module

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


def check_quality(engine: Engine, sample: list[str], calibration_rows: int = 0) -> QualityCheck:
    """Compare ``engine`` with its fp32 self on ``sample`` (whose last ``calibration_rows``
    come from lepton-batch's calibration sample); fall back or raise when the agreement is
    below the configured threshold. Returns what was measured."""
    cfg, start = engine.config, time.perf_counter()
    candidate = str(engine.dtype).removeprefix("torch.")
    if engine.quantization != "none":
        candidate += f"+{engine.quantization}"
    tok = engine.tokenize(sample)
    reference = load_model(cfg, torch.float32, engine.device, "sdpa")
    want = _reference(engine, reference, tok)
    if cfg.head == "classifier":
        got = engine.logits(tok, 4096, 64)
        agree = (got.argmax(-1) == want.argmax(-1)).float()
        metric, value, mean, threshold = ("label_agreement", float(agree.mean()),
                                          float(agree.mean()), cfg.min_label_agreement)
    else:
        got = engine.embed(tok, "mean", False, 4096, 64)
        cos = F.cosine_similarity(got, want, dim=-1)
        metric, value, mean, threshold = ("min_cosine", float(cos.min()), float(cos.mean()),
                                          cfg.min_cosine)
    passed = value >= threshold
    used = candidate
    if not passed:
        if cfg.on_fail == "error":
            field = "min_label_agreement" if cfg.head == "classifier" else "min_cosine"
            raise QualityError(
                f"{candidate} disagrees with float32 on {len(sample)} rows: {metric} {value:.4f} "
                f"< quality.{field} {threshold}; use model.dtype: float32 and "
                "model.quantization: none, or lower the threshold")
        engine.quantization = "none"
        engine.setup(torch.float32, reference)
        used = "float32"
    else:
        del reference
    check = QualityCheck(candidate, metric, round(value, 6), round(mean, 6), threshold, passed,
                         used, len(sample), round(time.perf_counter() - start, 3),
                         calibration_rows)
    (log.info if passed else log.warning)("%s", check.summary())
    return check
