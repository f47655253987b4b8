"""A job's task over the partitions of a Dask DataFrame the caller already holds
(:func:`lepton_batch.map_partitions`): the task's columns appended, computed on the workers
of the caller's Client by the same code a job's shards run (``worker.compute_rows``), one
model and one pipeline per worker, token-budget batches across each partition, row order
kept. Nothing is written: no output, manifest or lock; the result is a lazy DataFrame.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from lepton_batch.engine import BatchStats
from lepton_batch.job.spec import JobSpecError, validate_job
from lepton_batch.output.contract import BOOKKEEPING
from lepton_batch.pipelines.text import check_value
from lepton_batch.plan.build import resolve_task
from lepton_batch.plan.fingerprint import job_fingerprint
from lepton_batch.plan.work import TaskWork, task_work
from lepton_batch.run.cluster import worker_caches
from lepton_batch.run.worker import Stages, compute_rows, merge_errors

if TYPE_CHECKING:
    import pandas as pd
    from dask.dataframe import DataFrame

SOURCE = "map_partitions"
NO_ID = "__lepton_batch_no_id__"  # input.id_column when the caller names none: never read
ROW_FIELDS = BOOKKEEPING[:3]  # num_tokens, truncated, error: per row, as in a job's output


def frame_job(model: str | Mapping[str, Any], task: str | Mapping[str, Any],
              text_column: str, id_column: str | None,
              engine: Mapping[str, Any] | None) -> dict[str, Any]:
    """The job document map_partitions validates: the sections a job file would hold,
    with placeholders for the input and output paths it never reads."""
    return {
        "name": "map_partitions",
        "model": {"path": model} if isinstance(model, str) else dict(model),
        "task": {"kind": task} if isinstance(task, str) else dict(task),
        "input": {"path": "dask-dataframe", "text_column": text_column,
                  "id_column": id_column or NO_ID},
        "engine": dict(engine or {}),
        "output": {"path": "unused"},
    }


def plan_frame(document: dict[str, Any], overrides: list[str] | None,
               columns: list[str]) -> tuple[TaskWork, list[pa.Field]]:
    """The work every partition runs and the fields it appends, checked against the
    DataFrame's ``columns`` before anything is computed; raises JobSpecError naming every
    problem."""
    spec = validate_job(document, overrides, SOURCE)
    model, settings, shape, problems = resolve_task(spec)
    if shape is None or model is None or settings is None:
        raise JobSpecError(problems, SOURCE)
    fields = [*shape.fields, *ROW_FIELDS]
    missing = [c for c in shape.columns if c not in columns]
    if missing:
        problems.append(f"text_column: the DataFrame has no column {', '.join(missing)} "
                        f"(it has {', '.join(map(str, columns))})")
    clash = [f.name for f in fields if f.name in columns]
    if clash:
        problems.append(f"the DataFrame already has column(s) {', '.join(clash)}, which "
                        f"the {spec.task.kind} task adds; rename or drop them first")
    inp = spec.input
    sampled = settings.generation is not None and settings.generation.do_sample
    if inp.id_column == NO_ID and sampled:
        problems.append("id_column: sampled generation seeds each row from its id; name "
                        "the DataFrame's id column (or set task.temperature: 0 for greedy)")
    elif inp.id_column != NO_ID and inp.id_column not in columns:
        problems.append(f"id_column: the DataFrame has no column {inp.id_column}")
    if problems:
        raise JobSpecError(problems, SOURCE)
    fp = job_fingerprint(spec, model.revision, settings)
    return task_work(spec, model, settings, shape, f"frame-{uuid.uuid4().hex[:12]}", fp), fields


def meta_frame(meta: pd.DataFrame, fields: list[pa.Field]) -> pd.DataFrame:
    """The caller's ``meta`` with the appended columns, each an Arrow-backed pandas dtype of
    exactly the type computed (``embedding``: ``fixed_size_list<float>[384]``)."""
    import pandas as pd

    out = meta.copy()
    for f in fields:
        out[f.name] = pd.Series(pd.array([], dtype=pd.ArrowDtype(f.type)), index=meta.index)
    return out


def _text_column(values: pd.Series) -> tuple[pa.Array, dict[int, str]]:
    """One task column as Arrow, and the rows whose value is no text (a mixed object
    column: ``{position: reason}``); those rows go to the task as nulls."""
    try:
        return pa.array(values, from_pandas=True), {}
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass
    import pandas as pd

    texts, bad = [], {}
    for i, value in enumerate(values.tolist()):
        if not isinstance(value, (str, bytes)) and pd.isna(value):
            value = None
        text, reason = check_value(value)
        texts.append(text)
        if reason is not None and value is not None:
            bad[i] = reason
    return pa.array(texts, pa.string()), bad


def _partition(frame: pd.DataFrame, work: TaskWork, fields: list[pa.Field]) -> pd.DataFrame:
    """One partition: the task run over its rows, the columns appended in row order."""
    import pandas as pd

    if not len(frame):
        return meta_frame(frame, fields)
    names = list(work.task_columns)
    if work.input.id_column in frame.columns and work.input.id_column not in names:
        names.append(work.input.id_column)
    arrays, bad = {}, {}
    for name in names:
        arrays[name], wrong = _text_column(frame[name])
        bad.update(wrong)
    engines, pipelines = worker_caches()
    with pipelines.checkout(work) as pipeline:
        rows = compute_rows(pa.table(arrays), work, pipeline, engines, BatchStats(), Stages())
    columns = dict(rows.columns)
    if bad:  # the reason a value is no text, not "null text"
        columns["error"] = merge_errors(columns["error"], np.fromiter(bad, np.int64, len(bad)),
                                        list(bad.values()))
    out = frame.copy(deep=False)
    for f in fields:
        array = pa.array(columns[f.name]).cast(f.type)
        out[f.name] = pd.Series(pd.arrays.ArrowExtensionArray(array), index=frame.index)
    return out


def map_partitions(ddf: DataFrame, *, model: str | Mapping[str, Any],
                   task: str | Mapping[str, Any], text_column: str = "text",
                   id_column: str | None = None, engine: Mapping[str, Any] | None = None,
                   set: list[str] | None = None) -> DataFrame:
    """See :func:`lepton_batch.map_partitions` (the documented entry point)."""
    document = frame_job(model, task, text_column, id_column, engine)
    work, fields = plan_frame(document, set, [str(c) for c in ddf.columns])
    meta = meta_frame(ddf._meta, fields)
    return ddf.map_partitions(_partition, work, fields, meta=meta,
                              enforce_metadata=False, align_dataframes=False)


__all__ = ["map_partitions", "meta_frame", "plan_frame"]
