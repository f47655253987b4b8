"""``task.kind: generate``: the resolved generation settings, and where each came from.

The job's value wins; else the model's ``generation_config.json`` (read as JSON, as
``model.generate`` reads it; without one, the sampling keys of ``config.json``); else the
defaults of ``model.generate``. Setting a sampling field (temperature above 0, top_p,
top_k) with ``do_sample`` unset means sampling, and ``temperature: 0`` greedy, as in the
OpenAI API and vLLM (see :attr:`TaskSpec.samples`). ``validate`` shows these values and
the output's file metadata carries them, as it carries the pooling of an embedding job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lepton_batch.job.task import DEFAULT_MAX_NEW_TOKENS, Column, TaskSpec

JOB = "job"
DEFAULT = "lepton-batch default (as model.generate)"
# model.generate's own defaults, used when neither the job nor the model says.
GENERATE_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
                     "repetition_penalty": 1.0}


@dataclass(frozen=True)
class GenerationSettings:
    """What a generate job decodes with. ``prompt``: the template over the row's columns;
    ``sources[name]``: "job", "model (<file>)" or the default."""

    prompt: str
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    max_new_tokens: int
    max_new_tokens_column: str | None = None
    stop: tuple[str, ...] = ()
    chat: bool = False
    system: str | None = None
    seed: int = 0
    # {setting: input column} read per row (a null cell: the value above)
    columns: dict[str, str] = field(default_factory=dict)
    # task.response_format with its schema inline (structured.py), or None
    response_format: dict[str, Any] | None = None
    sources: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    def values(self) -> dict[str, Any]:
        """The settings that change generations, for the fingerprint, the file metadata and
        ``validate``. Greedy decoding leaves out what only sampling reads."""
        out: dict[str, Any] = {"prompt": self.prompt, "chat": self.chat}
        if self.chat:
            out["system"] = self.system
        out["do_sample"] = self.do_sample
        if self.do_sample:
            out |= {"temperature": self.temperature, "top_k": self.top_k,
                    "top_p": self.top_p, "seed": self.seed}
        out |= {"repetition_penalty": self.repetition_penalty,
                "max_new_tokens": self.max_new_tokens}
        if self.max_new_tokens_column:
            out["max_new_tokens_column"] = self.max_new_tokens_column
        out["stop"] = list(self.stop)
        # Added after outputs were written: only when set, so earlier fingerprints hold.
        columns = {k: v for k, v in self.columns.items() if k != "max_new_tokens"}
        if columns:
            out["columns"] = columns
        if self.response_format is not None:
            out["response_format"] = self.response_format
        return out

    def rows(self) -> list[tuple[str, str, str]]:
        """(setting, value, where it came from) for ``validate``'s settings table; strings
        as Python literals (a trailing space or newline shows), the rest as JSON."""
        values = self.values()
        fmt = values.get("response_format")
        if fmt is not None:  # the schema itself is in the output schema table below
            values["response_format"] = {k: v for k, v in fmt.items() if k != "schema"} | (
                {"properties": list(fmt["schema"].get("properties", {}))}
                if "schema" in fmt else {})
        return [(name, repr(v) if isinstance(v, str) else json.dumps(v),
                 self.sources.get(name, "")) for name, v in values.items()]

    def sampling_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``engine.continuous.Sampling``."""
        return {name: getattr(self, name) for name in GENERATE_DEFAULTS}


def _model_generation_config(model_dir: Path) -> tuple[dict[str, Any], str]:
    """The model's sampling defaults and the file they came from."""
    for name in ("generation_config.json", "config.json"):
        try:
            config = json.loads((model_dir / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(config, dict) and (name == "generation_config.json"
                                         or any(k in config for k in GENERATE_DEFAULTS)):
            return config, f"model ({name})"
    return {}, DEFAULT


def resolve_generation(model_dir: Path, task: TaskSpec, text_column: str) -> GenerationSettings:
    """The job's generation settings, else the model's, else ``model.generate``'s."""
    config, model_source = _model_generation_config(model_dir)
    sources: dict[str, str] = {}

    def pick(name: str, job_value: Any) -> Any:
        if job_value is not None:
            sources[name] = JOB
            return job_value
        value = config.get(name)
        if value is None:
            sources[name] = DEFAULT
            return GENERATE_DEFAULTS[name]
        sources[name] = model_source
        return value

    columns = task.row_columns()

    def job(name: str) -> Any:  # the job's value, None when it names a column
        value = getattr(task, name)
        return None if isinstance(value, Column) else value

    do_sample = task.samples
    if do_sample is not None and task.do_sample is None:
        sources["do_sample"] = ("job (temperature 0)" if task.temperature == 0 else
                                "job (a sampling field is set)")
    else:
        do_sample = pick("do_sample", task.do_sample)
    temperature = job("temperature") or None  # 0 is greedy: its value is not a temperature
    prompt = task.prompt if task.prompt is not None else "{" + text_column + "}"
    sources["prompt"] = JOB if task.prompt is not None else \
        "lepton-batch default (input.text_column)"
    for name in ("chat", "system", "seed", "max_new_tokens", "max_new_tokens_column", "stop",
                 "response_format"):
        sources[name] = JOB if name in task.model_fields_set else "lepton-batch default"
    for name, column in columns.items():
        sources[name] = f"column {column} per row; a null cell: {sources.get(name, JOB)}"
    return GenerationSettings(
        prompt=prompt, do_sample=bool(do_sample),
        temperature=float(pick("temperature", temperature)),
        top_k=int(pick("top_k", job("top_k"))), top_p=float(pick("top_p", job("top_p"))),
        repetition_penalty=float(pick("repetition_penalty", task.repetition_penalty)),
        max_new_tokens=job("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS,
        max_new_tokens_column=columns.get("max_new_tokens"), stop=tuple(job("stop") or ()),
        chat=task.chat, system=task.system, seed=job("seed") or 0, columns=columns,
        response_format=task.response_format.resolved() if task.response_format else None,
        sources=sources)
