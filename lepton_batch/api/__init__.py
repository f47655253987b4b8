"""The Python face of lepton-batch: ``submit``, ``validate``, ``read`` and
``map_partitions``, the exceptions
``submit`` raises and the ``RunResult`` it returns. Re-exported lazily by ``lepton_batch``
itself (``lepton_batch.submit``); docs/python-api.md."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lepton_batch.api.errors import Interrupted, JobError, OutputInUse, RunFailed
from lepton_batch.api.frame import map_partitions
from lepton_batch.api.run import read, submit, validate

if TYPE_CHECKING:
    from lepton_batch.run.lifecycle import RunResult

__all__ = ["Interrupted", "JobError", "OutputInUse", "RunFailed", "RunResult",
           "map_partitions", "read", "submit", "validate"]


def __getattr__(name: str) -> object:
    if name == "RunResult":  # run/lifecycle imports Dask: only when asked for
        from lepton_batch.run.lifecycle import RunResult

        return RunResult
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
