"""The schema contract: the output's Arrow schema, derived from the job before any model
loads, stated in ``<output>/_schema.json`` and held by every part file of every run.

A table built on the output never breaks: column order, types (fixed-size embedding lists,
typed nulls) and the layout (a snapshot, or an incremental history) stay what the first run
stated. A job whose schema or layout no longer matches is refused before it computes
anything, with the way out (a new ``output.path``, or ``mode: overwrite``).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pyarrow as pa

from lepton_batch.job.shards import InputFile
from lepton_batch.job.spec import JobSpec

SCHEMA_FILE = "_schema.json"
# Row bookkeeping after the task's columns, in this order, in every output.
BOOKKEEPING = (
    pa.field("num_tokens", pa.int32()),
    pa.field("truncated", pa.bool_()),
    pa.field("error", pa.string()),
    pa.field("content_hash", pa.string()),  # of the input columns the task reads
    pa.field("job_fingerprint", pa.string()),
    pa.field("run_id", pa.string()),  # the run that computed the row
)
# output.tombstones: after the bookkeeping; true on a row that marks its id deleted.
DELETED = pa.field("deleted", pa.bool_())


_LAYOUTS = {"incremental": "an incremental (history)", "snapshot": "a snapshot"}


def layout_of(mode: str) -> str:
    """``incremental``: runs add partitions to a history; else a snapshot of the input."""
    return "incremental" if mode == "incremental" else "snapshot"


def input_field(files: list[InputFile], column: str) -> pa.Field:
    """``column``'s type across all input files (widened where they differ: int32 and int64
    give int64, string and large_string give large_string); ValueError when they clash."""
    fields = [f.schema.field(column) for f in files if column in f.schema.names]
    if not fields:
        return pa.field(column, pa.string())
    try:
        unified = pa.unify_schemas([pa.schema([f]) for f in fields],
                                   promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        kinds = sorted({str(f.type) for f in fields})
        raise ValueError(f"column {column!r} has different types across the input files "
                         f"({', '.join(kinds)}); the output needs one") from None
    return unified.field(column).with_nullable(True)


def output_schema(job: JobSpec, files: list[InputFile], task_fields: list[pa.Field]
                  ) -> pa.Schema:
    """The dataset's columns: id, passthrough, the task's columns, bookkeeping.

    Delta Lake has no fixed-size arrays: with output.format delta an embedding is a
    ``list<float>`` (every row still has the model's dimension).
    """
    inp = job.input
    fields = [input_field(files, inp.id_column)]
    fields += [input_field(files, c) for c in inp.passthrough_columns]
    if job.output.format == "delta":
        task_fields = [f.with_type(pa.list_(f.type.value_type))
                       if pa.types.is_fixed_size_list(f.type) else f for f in task_fields]
    return pa.schema([*fields, *task_fields, *BOOKKEEPING,
                      *([DELETED] if job.output.tombstones else [])])


def contract_document(job: JobSpec, schema: pa.Schema) -> dict:
    """What ``_schema.json`` holds: readable fields plus the exact Arrow schema."""
    return {
        "format": 1,
        "job": job.name,
        "task": job.task.kind,
        "id_column": job.input.id_column,
        "layout": layout_of(job.output.mode),
        "output_format": job.output.format,
        "partitioning": "hive: run_date=YYYY-MM-DD",
        "fields": [{"name": f.name, "type": str(f.type), "nullable": f.nullable}
                   for f in schema],
        "arrow_schema": base64.b64encode(schema.serialize().to_pybytes()).decode(),
    }


def schema_of(document: dict) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(document["arrow_schema"])))


def read_contract(root: Path) -> dict | None:
    """The output's ``_schema.json``, or None when there is none (or it is unreadable)."""
    try:
        return json.loads((root / SCHEMA_FILE).read_text())
    except (OSError, ValueError):
        return None


def contract_problem(root: Path, document: dict, mode: str, has_published: bool) -> str | None:
    """Why this job may not write to ``root`` as it stands, or None.

    mode overwrite replaces the dataset and its contract, so only the other modes check.
    ``has_published``: the output holds published parts (an output from before contracts
    counts as a snapshot).
    """
    if mode == "overwrite":
        return None
    existing = read_contract(root)
    if existing is None:
        if has_published and mode == "incremental":
            return (f"output.path: {root} holds a snapshot dataset (written in mode resume or "
                    "overwrite); an incremental history needs its own output.path")
        return None
    if existing.get("layout") != document["layout"]:
        return (f"output.path: {root} holds {_LAYOUTS.get(existing.get('layout'), 'a')} "
                f"dataset; mode {mode} writes {_LAYOUTS[document['layout']]} one. Keep "
                "output.mode as it was, choose a new output.path, or use mode: overwrite to "
                "replace the dataset")
    fmt = existing.get("output_format", "parquet")
    if fmt != document["output_format"]:
        return (f"output.path: {root} holds a {fmt} dataset; output.format is "
                f"{document['output_format']}. Keep the format, or choose a new output.path")
    try:
        old = schema_of(existing)
    except (KeyError, ValueError, pa.ArrowException):
        return f"output.path: {root / SCHEMA_FILE} is unreadable; restore it or use overwrite"
    new = schema_of(document)
    if not old.equals(new):
        return (f"output.path: this job's output schema differs from {root / SCHEMA_FILE}: "
                f"{describe_change(old, new)}. Every run of an output keeps one schema; "
                "write to a new output.path, or use mode: overwrite to replace the dataset")
    return None


def describe_change(old: pa.Schema, new: pa.Schema) -> str:
    """The first differences between two schemas, in words."""
    changes = []
    for f in new:
        if f.name not in old.names:
            changes.append(f"new column {f.name} ({f.type})")
        elif not old.field(f.name).equals(f):
            changes.append(f"{f.name} {old.field(f.name).type} -> {f.type}")
    changes += [f"column {f.name} dropped" for f in old if f.name not in new.names]
    if not changes and old.names != new.names:
        changes.append(f"column order {old.names} -> {new.names}")
    return "; ".join(changes[:4]) or "metadata"
