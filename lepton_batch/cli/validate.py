"""``lepton-batch validate``: a job checked and planned without loading a model; and the
plan, settings and schema tables that submit prints too."""

from __future__ import annotations

import logging
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from lepton_batch.cli.common import (
    JobArg,
    RunDateOpt,
    SetOpt,
    best_effort,
    console,
    fail,
    load_plan,
    setup_logging,
    warn,
)
from lepton_batch.job.spec import JobSpecError
from lepton_batch.output.layout import OutputError


def validate(
    job_file: JobArg,
    set_: SetOpt = None,
    estimate: Annotated[bool, typer.Option(help="Tokenize a sample of rows to estimate the "
                                           "job's tokens (loads the tokenizer, not the model)."
                                           )] = True,
    run_date: RunDateOpt = None,
) -> None:
    """Check a job without loading a model: fields, input files, columns, model directory.

    Prints every problem at once with the field it belongs to, or the plan: files, shards,
    rows and an estimate of the tokens to run; then the settings (max_length, pooling,
    normalize, prompt, lowercase; for generate the prompt, sampling, stop, max_new_tokens)
    with where each came from: the job, the model directory or lepton-batch's default; then
    the output schema every part file will have (the contract written to _schema.json); in
    mode incremental, how many rows a submit now would compute. Warns when a job value
    contradicts the model's, or an id value repeats. Exit code 2 for an invalid job.

    The job file's fields: docs/job-file.md.
    """
    setup_logging(False)
    # The settings warnings are printed below, with the settings table; not twice.
    settings_log = logging.getLogger("lepton_batch.job.settings")
    level = settings_log.level
    settings_log.setLevel(logging.ERROR)
    try:
        plan = load_plan(job_file, set_, run_date)
    except (JobSpecError, OutputError) as exc:
        fail(exc)
    finally:
        settings_log.setLevel(level)
    table = plan_table(plan)
    if estimate:
        from lepton_batch.plan.estimate import estimate_tokens

        total, mean = estimate_tokens(plan)
        table.add_row("tokens (estimate)", f"~{total:,} ({mean:.1f} per row, after truncation "
                      f"to {plan.settings.max_length})")
    if plan.job.output.mode == "incremental":
        best_effort("the incremental row plan", _add_row_plan, table, plan)
    console.print(table)
    console.print(settings_table(plan.settings, plan.job.task.uses_template))
    console.print(schema_table(plan))
    for warning in plan.settings.warnings:
        warn(warning)
    _warn_duplicate_ids(plan)
    if note := plan.backfill_note():
        warn(note)
    console.print("[green]job is valid[/]")


def plan_table(plan) -> Table:
    """The plan at a glance: model, task, prompt, max_length, input, shards, output."""
    from lepton_batch.job.shards import describe_shards

    table = Table(title=f"plan for job '{plan.job.name}'", show_header=False)
    job = plan.job
    table.add_row("model", f"{plan.model.path} ({plan.model.model_type}, "
                  f"{', '.join(plan.model.architectures)})")
    t = job.task
    task = t.kind + (f" (zero-shot, {t.method or 'embedding'})" if t.labels else "")
    if t.kind == "generate":
        gen = plan.settings.generation
        per_row = ", ".join(f"{k} from {c}" for k, c in gen.columns.items())
        fmt = gen.response_format
        task += (f", at most {gen.max_new_tokens} new tokens"
                 + (", chat template" if t.chat else "")
                 + (", sampled" if gen.do_sample else ", greedy")
                 + (f"; per row: {per_row}" if per_row else "")
                 + (f"; every answer a {fmt['type'].replace('_', ' ')} match" if fmt else ""))
    table.add_row("task", escape(task))
    if t.uses_template:
        from lepton_batch.pipelines.prompts import template

        table.add_row("prompt", escape(repr(template(t, job.input.text_column))))
    table.add_row("max_length", f"{plan.settings.max_length} tokens, from the "
                  f"{escape(plan.settings.sources['max_length'])}")
    table.add_row("input", f"{len(plan.files)} file(s), {plan.rows:,} rows")
    table.add_row("shards", describe_shards(plan.shards, job.input.rows_per_shard))
    table.add_row("output", f"{plan.output_root} (mode {job.output.mode}, partition "
                  f"run_date={plan.run_date})")
    table.add_row("job fingerprint", plan.job_fingerprint)
    return table


def _add_row_plan(table: Table, plan) -> None:
    """What a submit now would compute (read-only: the output may be in use)."""
    table.add_row("incremental", plan.row_plan().describe())


def settings_table(settings, causal: bool = False) -> Table:
    """Each resolved setting, its value and where it came from (a causal LM's prompt is the
    job's template, so only the context length is resolved)."""
    table = Table(title="settings")
    for column in ("setting", "value", "from"):
        table.add_column(column)
    for name, value in settings.values().items():
        if causal and name != "max_length":
            continue
        # repr shows an empty or space-ended prompt; YAML spelling for booleans
        shown = repr(value) if name == "prompt" else (
            str(value).lower() if isinstance(value, bool) else str(value))
        table.add_row(name, escape(shown), escape(settings.sources.get(name, "")))
    for row in settings.generation.rows() if settings.generation else []:
        table.add_row(*map(escape, row))
    return table


def schema_table(plan) -> Table:
    """The output's columns: what every part file of every run of this job holds."""
    from lepton_batch.output.contract import SCHEMA_FILE

    table = Table(title=f"output schema ({SCHEMA_FILE}; plus the partition column run_date)")
    for column in ("column", "type"):
        table.add_column(column)
    for f in plan.schema:
        table.add_row(escape(f.name), escape(str(f.type)))
    return table


def _warn_duplicate_ids(plan) -> None:
    """Duplicate ids are allowed (rows are never keyed by id), but usually a mistake."""
    from lepton_batch.job.shards import count_duplicate_ids

    column = plan.job.input.id_column
    try:
        n, examples = count_duplicate_ids(plan.files, column)
    except (OSError, ValueError) as exc:
        warn(f"input.id_column: could not check for duplicate ids: {exc}")
        return
    if n:
        warn(f"input.id_column: {n:,} duplicate id value(s) across the input, e.g. "
             f"{examples!r}; every row is still processed and written once")
