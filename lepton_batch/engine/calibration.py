"""The quality gate's floor: lepton-batch's own calibration sample.

The gate (quality.py) compares a reduced precision with fp32 on ``quality.sample_rows``
rows of the job (64 by default), and int8 calibrates its activation ranges on them. A small
night of 4 rows would decide both on 4 rows; so a job's rows are topped up to
``sample_rows`` from ``calibration.json``: 64 rows of the repository's sample corpus (the
CPython documentation), spread over its length distribution, long ones included. The
summary says how many rows of each the gate ran on.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

import numpy as np


@dataclass(frozen=True)
class GateSample:
    """Texts the gate runs on: the job's rows first, then ``calibration_rows`` of
    lepton-batch's calibration sample."""

    texts: list[str]
    calibration_rows: int = 0

    @property
    def job_rows(self) -> int:
        return len(self.texts) - self.calibration_rows


@functools.cache
def calibration_texts() -> tuple[str, ...]:
    """The shipped calibration sample (64 texts, shortest first)."""
    doc = json.loads(resources.files("lepton_batch.engine").joinpath("calibration.json")
                     .read_text(encoding="utf-8"))
    return tuple(doc["texts"])


def quality_sample(texts: list[str], n: int) -> list[str]:
    """Up to ``n`` of ``texts`` for calibration and the quality gate: the longest quarter
    (where low precision drifts most) and the rest spread evenly over the shard."""
    if len(texts) <= n:
        return list(texts)
    longest = set(sorted(range(len(texts)), key=lambda i: -len(texts[i]))[: n // 4])
    rest = [i for i in np.linspace(0, len(texts) - 1, n).astype(int) if i not in longest]
    return [texts[i] for i in sorted(longest | set(rest[: n - len(longest)]))]


def gate_sample(texts: list[str], n: int,
                prepare: Callable[[list[str]], list[str]] | None = None) -> GateSample:
    """``n`` texts for the gate: :func:`quality_sample` of the job's ``texts``, topped up
    from the calibration sample when the job has fewer (spread over its lengths).
    ``prepare``: what the job does to a text before the model sees it (its prompt,
    lowercasing), applied to the calibration rows."""
    own = quality_sample(texts, n)
    pool = calibration_texts()
    missing = min(n - len(own), len(pool))
    if missing <= 0:
        return GateSample(own)
    picked = [pool[i] for i in np.linspace(0, len(pool) - 1, missing).round().astype(int)]
    return GateSample(own + (prepare(picked) if prepare else picked), missing)
