"""``lepton-batch bench``: embedding throughput of lepton-batch against the usual ways.

All methods embed the same rows with the same model and the same max_length, pooling and
normalisation (the model directory's own, resolved as ``plan/`` does), in one process with
the same torch threads; every repeat runs each method once, in a rotating order. Methods:
``hf-pipeline`` (transformers' feature-extraction pipeline, pooled here), ``st-default`` and
``st-best`` (sentence-transformers at its defaults and at its fastest batch x dtype),
``engine`` / ``engine-fp32`` / ``engine-bf16`` / ``engine-int8`` (lepton-batch's engine
in-process), ``submit`` (a whole Parquet -> Dask -> Parquet job, wall clock) and, only when
named, ``engine-compile`` (the engine with ``engine.compile``) and ``submit-fp32`` (the job
with ``model.dtype: float32``).

This module holds lepton-batch's side (``engine*``, ``submit*``) and the driver; the usual
ways are in ``baselines.py``, the methods' shared parts in ``methods.py``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lepton_batch.bench.baselines import hf_pipeline, st_best, st_method, st_model
from lepton_batch.bench.common import dtype_name, machine_facts, pick_device, sync
from lepton_batch.bench.corpus import load_rows
from lepton_batch.bench.measure import PeakMemory, encoder_flops, gemm_peak, scaled_lengths
from lepton_batch.bench.methods import (
    METHODS,
    OPTIONAL_METHODS,
    BenchConfig,
    Inputs,
    Method,
    Pass,
)
from lepton_batch.job.modeldir import inspect_model_dir, resolve_model_dir
from lepton_batch.job.settings import resolve_settings
from lepton_batch.job.spec import ModelSpec, TaskSpec

log = logging.getLogger(__name__)


@dataclass
class MethodResult:
    """Raw figures of one method. tokens, padded_tokens, flops: per repeat (the same each
    time); seconds, rss_mib, cuda_mib: one per repeat; cosine against the reference."""

    name: str
    rows: int = 0
    dtype: str = ""
    note: str = ""
    skipped: str = ""
    seconds: list[float] = field(default_factory=list)
    tokens: int = 0
    padded_tokens: int = 0
    flops: float = 0.0
    rss_mib: list[float] = field(default_factory=list)
    cuda_mib: list[float] = field(default_factory=list)
    busy: list[float] = field(default_factory=list)  # GPU busy share, one per repeat
    cos_min: float | None = None
    cos_mean: float | None = None

    @property
    def rates(self) -> list[float]:
        return [self.rows / s for s in self.seconds]

    @property
    def rate(self) -> float:
        """Median rows/s of the repeats."""
        return statistics.median(self.rates) if self.seconds else 0.0

    @property
    def gpu_busy(self) -> float | None:
        """Median GPU busy share of the repeats (CUDA with NVML), else None."""
        return statistics.median(self.busy) if self.busy else None

    @property
    def tflops(self) -> float:
        return self.flops / statistics.median(self.seconds) / 1e12 if self.seconds else 0.0


@dataclass
class BenchResult:
    config: BenchConfig
    machine: dict[str, str]
    settings: dict[str, Any]
    rows: int
    gemm_peak_tflops: dict[str, float]
    reference: str  # the method the cosines compare with
    methods: list[MethodResult]
    notes: list[str] = field(default_factory=list)
    command: str = ""

    def write_json(self, path: Path) -> None:
        """Every raw figure, per repeat."""
        data = dataclasses.asdict(self)
        for m, raw in zip(self.methods, data["methods"], strict=True):
            raw["rows_per_s"] = m.rates
        path.write_text(json.dumps(data, indent=1, default=str))


def _engine(ctx: Inputs, dtype: str, quantization: str | None = None,
            compile: bool = False) -> Method:
    """lepton-batch's engine in this process, as a shard runs it: tokenize, token-budget
    batches, embed."""
    from lepton_batch.engine import BatchStats, Encoder, EngineConfig
    from lepton_batch.pipelines.embed import prompt_tokens

    extra = {"quantization": quantization} if quantization else {}
    # As a job does: a sample of the rows calibrates int8 and feeds the quality gate.
    eng = Encoder(EngineConfig(model_dir=str(ctx.model_dir), head="base", dtype=dtype,
                              device=ctx.cfg.device, max_length=ctx.settings.max_length,
                              threads=torch.get_num_threads(), compile=compile, **extra),
                 ctx.texts[: ctx.cfg.tune_rows])
    got, s, skip = dtype_name(eng.dtype), ctx.settings, prompt_tokens(eng, ctx.settings)
    notes = [f"asked {dtype}, runs {got}"] if dtype not in ("auto", got) else []
    if getattr(eng, "quantization", "none") == "int8":
        notes.append(f"int8 linear layers, the rest in {got}")
        got = "int8"  # its share of peak is against the int8 GEMM's
    if getattr(eng, "quality", None) is not None:
        notes.append(eng.quality.summary())

    def run(texts: list[str] = ctx.texts) -> Pass:
        tok, stats = eng.tokenize(texts), BatchStats()
        emb = eng.embed(tok, s.pooling, s.normalize, eng.token_budget(None), 1024, stats,
                        skip=skip)
        return Pass(emb, stats.tokens, stats.padded_tokens,
                    scaled_lengths(tok.lengths, stats.tokens, stats.padded_tokens))

    run(ctx.texts[:64])  # warm-up
    return Method(run, len(ctx.texts), got, "; ".join(notes))


def _submit(ctx: Inputs, tmp: Path, dtype: str, forced: str | None = None) -> Method:
    """The whole job, wall clock; ``forced``: its ``model.dtype`` (else auto, whose choice
    ``dtype`` names)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lepton_batch.job.spec import JobSpec
    from lepton_batch.output.dataset import published_parts
    from lepton_batch.plan.build import make_plan
    from lepton_batch.run.lifecycle import run_job
    from lepton_batch.run.startup import EarlyCluster

    tmp = tmp / f"submit-{forced or 'auto'}"
    (tmp / "in").mkdir(parents=True)
    # pyarrow, not polars: the GPU machine's image has no polars and no room to carry it
    pq.write_table(pa.table({"id": pa.array(range(len(ctx.raw)), pa.int64()),
                             "text": pa.array(ctx.raw, pa.string())}),
                   tmp / "in" / "rows.parquet")
    model = {"path": str(ctx.model_dir), "device": ctx.cfg.device,
             "max_length": ctx.cfg.max_length}
    job = JobSpec.model_validate({
        "name": "bench-submit", "input": {"path": str(tmp / "in")}, "task": {"kind": "embed"},
        "model": model | ({"dtype": forced} if forced else {}),
        "output": {"path": str(tmp / "out"), "mode": "overwrite"},
        "cluster": {"dashboard_address": "127.0.0.1:0"},
    })

    def run() -> Pass:
        start = time.perf_counter()
        early = EarlyCluster(job.cluster, job.model.path)  # as the CLI does: while planning
        try:
            plan = make_plan(job, "bench job")
            result = run_job(plan, early=early)
        finally:
            early.close()
        seconds = time.perf_counter() - start
        if not result.ok:
            raise RuntimeError(f"submit failed: {result.failures}")
        out = pa.concat_tables(pq.read_table(f, columns=["id", "embedding"]) for f in
                               published_parts(plan.output_root))
        out = out.sort_by("id")
        emb = torch.from_numpy(out["embedding"].combine_chunks().flatten().to_numpy(
            zero_copy_only=False).reshape(out.num_rows, -1).copy())
        return Pass(emb, result.tokens, result.padded_tokens,
                    scaled_lengths(ctx.lengths, result.tokens, result.padded_tokens), seconds)

    return Method(run, len(ctx.raw), dtype, "wall clock of plan, cluster start (begun while "
                  "planning, as submit does), model load, run and publish; one process worker",
                  in_process=False)


class _Skip(Exception):
    """A method that cannot run here; the message says why."""


def _setup(name: str, ctx: Inputs, tmp: Path, loaded: dict[str, Method],
           models: dict[str, Any]) -> Method:
    """Load and warm up one method; raise _Skip when it cannot run or would repeat one.
    ``models``: models the methods share (st-default's fp32 SentenceTransformer)."""
    if name.startswith("engine"):
        from lepton_batch.engine import EngineConfig

        if name == "engine-int8":
            if ctx.device == "cuda":
                raise _Skip("int8 is for CPUs (on CUDA it measured slower than bf16)")
            if "quantization" not in {f.name for f in dataclasses.fields(EngineConfig)}:
                raise _Skip("EngineConfig has no quantization field yet")
            return _engine(ctx, "auto", "int8")
        if name == "engine-compile":
            return _engine(ctx, "auto", compile=True)
        dtype = {"engine": "auto", "engine-fp32": "float32", "engine-bf16": "bfloat16"}[name]
        if "engine" in loaded and loaded["engine"].dtype == dtype:
            raise _Skip(f"same as engine (dtype auto is {dtype} here)")
        return _engine(ctx, dtype)
    if name.startswith("st-"):
        if "st32" not in models:
            try:
                models["st32"] = st_model(ctx, torch.float32)
            except ImportError as exc:
                raise _Skip(f"{exc}: pip install sentence-transformers") from exc
        st32 = models["st32"]
        return st_method(ctx, st32, 32) if name == "st-default" else st_best(ctx, st32)
    if name == "hf-pipeline":
        return hf_pipeline(ctx)
    if name == "submit-fp32":
        return _submit(ctx, tmp, "float32", forced="float32")
    auto = loaded.get("engine")  # a job's dtype is auto
    return _submit(ctx, tmp, auto.dtype if auto else "auto")


def run_bench(cfg: BenchConfig, say: Callable[[str], None] = log.info) -> BenchResult:
    """Load every method, run ``cfg.repeats`` rotating rounds, return the raw figures.

    Raises ValueError (or FileNotFoundError) for bad options, model or corpus before any
    model loads. ``say`` gets a line of progress at each step.
    """
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    cfg.check()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar per model
    model_dir = resolve_model_dir(cfg.model)
    settings = resolve_settings(inspect_model_dir(model_dir),
                                ModelSpec(path=str(model_dir), max_length=cfg.max_length),
                                TaskSpec(kind="embed"))
    device = pick_device(cfg.device)
    torch.set_num_threads(os.cpu_count() or 1)  # what the engine takes; the others get it too
    from lepton_batch.kernels import avoid_cudnn_sdpa

    # What the engine does on CUDA, done for every method before any loads, so that no
    # baseline pays cuDNN's per-shape plans either.
    sdpa_note = avoid_cudnn_sdpa(device)
    raw, corpus_note = load_rows(cfg.corpus, cfg.rows)
    texts = settings.apply(raw)
    ids = AutoTokenizer.from_pretrained(str(model_dir))(
        texts, truncation=True, max_length=settings.max_length)["input_ids"]
    ctx = Inputs(cfg, model_dir, settings, device, raw, texts,
                 np.array([len(x) for x in ids], dtype=np.int64), say)
    model_config = AutoConfig.from_pretrained(str(model_dir))
    say("measuring the GEMM peak")
    peaks = {d: gemm_peak(device, getattr(torch, d)) for d in ("float32", "bfloat16", "int8")}
    results = {n: MethodResult(n) for n in METHODS + OPTIONAL_METHODS if n in cfg.methods}
    methods: dict[str, Method] = {}
    outputs: dict[str, torch.Tensor] = {}
    tmp = Path(tempfile.mkdtemp(prefix="lepton-bench-"))
    try:
        shared: dict[str, Any] = {}
        for name, res in results.items():
            say(f"loading {name}")
            try:
                methods[name] = m = _setup(name, ctx, tmp, methods, shared)
            except _Skip as exc:
                res.skipped = str(exc)
                say(f"{name}: skipped, {exc}")
                continue
            res.rows, res.dtype, res.note = m.rows, m.dtype, m.note
        names = list(methods)
        for r in range(cfg.repeats):
            for name in names[r % len(names):] + names[: r % len(names)]:
                m, res = methods[name], results[name]
                with PeakMemory(device == "cuda", m.in_process) as mem:
                    start = time.perf_counter()
                    p = m.run()
                    sync(device)
                    seconds = p.seconds or time.perf_counter() - start
                res.seconds.append(seconds)
                res.rss_mib.append(mem.rss_mib)
                if mem.cuda_mib is not None:
                    res.cuda_mib.append(mem.cuda_mib)
                if mem.gpu_busy is not None:
                    res.busy.append(mem.gpu_busy)
                res.tokens, res.padded_tokens = p.tokens, p.padded_tokens
                res.flops = encoder_flops(model_config, p.padded_tokens, p.seq_lens)
                outputs[name] = p.emb
                say(f"repeat {r + 1}/{cfg.repeats}: {name} {m.rows / seconds:,.1f} rows/s")
    finally:
        methods.clear()  # free the models before the caller goes on
        shutil.rmtree(tmp, ignore_errors=True)
    # Again at the end, keeping the best: a busy neighbour on a shared machine can slow
    # one measurement and would make the peak look low.
    peaks = {d: max(t, gemm_peak(device, getattr(torch, d))) for d, t in peaks.items()}
    fp32 = [n for n in ("engine-fp32", "engine", "st-default")
            if n in outputs and results[n].dtype == "float32"]
    reference = (fp32 or list(outputs) or [""])[0]
    for name, emb in outputs.items():
        cos = F.cosine_similarity(emb, outputs[reference][: len(emb)], dim=-1)
        results[name].cos_min, results[name].cos_mean = float(cos.min()), float(cos.mean())
    notes = [corpus_note, *settings.warnings] + ([f"every method: {sdpa_note}"]
                                                 if sdpa_note else [])
    return BenchResult(cfg, machine_facts(device), settings.values(), len(raw), peaks,
                       reference, list(results.values()), notes)
