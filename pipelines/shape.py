"""What planning needs of a task's pipeline, known without building it."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from lepton_batch.engine.config import Head


@dataclass(frozen=True)
class TaskShape:
    """A pipeline's engine ``head``, the input ``columns`` it reads (what ``content_hash``
    covers) and the output ``fields`` it writes, in order."""

    head: Head
    columns: tuple[str, ...]
    fields: tuple[pa.Field, ...]
