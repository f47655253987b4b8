"""A model directory's own embedding settings, merged with the job's.

Out of the box a model directory must give what ``SentenceTransformer(path).encode`` gives,
so its sentence-transformers files are the defaults: ``sentence_bert_config.json``
(``max_seq_length``, ``do_lower_case``), the Pooling module's ``config.json``, a
``Normalize`` module in ``modules.json``, and the prompts in
``config_sentence_transformers.json``. They are read as JSON; sentence-transformers is never
imported. A job value wins, with a warning when it contradicts the model's.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lepton_batch.job.generation import GenerationSettings, resolve_generation
from lepton_batch.job.modeldir import ModelInfo
from lepton_batch.job.spec import ModelSpec, TaskSpec

log = logging.getLogger(__name__)

JOB = "job"
DEFAULT = "lepton-batch default"
DEFAULT_MAX_LENGTH = 512  # only when neither the tokenizer nor the config states a limit
POOLING_MODES = ("mean", "cls", "max", "lasttoken")
# Pooling config keys of sentence-transformers < 6, in its concatenation order.
LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
SANE_MODEL_MAX_LENGTH = 1_000_000  # transformers stores 1e30 for "no limit"


class SettingsError(ValueError):
    """Settings that lepton-batch cannot apply; ``problems`` name the job field to set."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class Settings:
    """Resolved embedding settings, and where each value came from.

    ``prompt`` is prepended to every text ("" for none); ``include_prompt`` False leaves the
    prompt's tokens out of pooling. ``sources[name]`` is "job", "model (<file>)" or
    "lepton-batch default"; ``warnings`` lists job values that contradict the model's.
    """

    max_length: int
    pooling: str = "mean"
    normalize: bool = False
    prompt: str = ""
    lowercase: bool = False
    include_prompt: bool = True
    sources: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    warnings: tuple[str, ...] = field(default=(), compare=False)
    # generate: the resolved prompt, sampling, stop and length (see generation.py)
    generation: GenerationSettings | None = None

    def values(self) -> dict[str, Any]:
        """The settings that change outputs, for the job fingerprint and file metadata."""
        out = {"max_length": self.max_length, "pooling": self.pooling,
               "normalize": self.normalize, "prompt": self.prompt,
               "lowercase": self.lowercase, "include_prompt": self.include_prompt}
        if self.generation is not None:
            out["generation"] = self.generation.values()
        return out

    def apply(self, texts: list[str]) -> list[str]:
        """The texts the model sees: prompt prepended, lowercased when the model says so."""
        if self.prompt:
            texts = [self.prompt + t for t in texts]
        if self.lowercase:
            # The same normaliser sentence-transformers adds for do_lower_case (not str.lower,
            # which treats a final sigma differently).
            from tokenizers.normalizers import Lowercase

            lower = Lowercase()
            texts = [lower.normalize_str(t) for t in texts]
        return texts


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise SettingsError([f"model.path: cannot read {path}: {exc}"]) from None


def _module_kind(module: dict[str, Any]) -> str:
    """``sentence_transformers.models.Pooling`` (any package path) -> ``Pooling``."""
    return str(module.get("type", "")).rsplit(".", 1)[-1]


def _pooling_modes(config: dict[str, Any]) -> tuple[str, ...]:
    """The pooling modes a Pooling config.json selects, old or new key style."""
    mode = config.get("pooling_mode")
    if mode is not None:
        return (mode,) if isinstance(mode, str) else tuple(mode)
    modes = tuple(m for k, m in LEGACY_POOLING_KEYS.items() if config.get(k))
    return modes or ("mean",)  # sentence-transformers' default when no key is true


def _fallback_max_length(info: ModelInfo) -> tuple[int, str]:
    """What SentenceTransformer uses without max_seq_length: the tokenizer's
    model_max_length capped at max_position_embeddings."""
    tok_config = _read_json(info.path / "tokenizer_config.json") or {}
    tok_max = tok_config.get("model_max_length")
    candidates = []
    if isinstance(tok_max, (int, float)) and 0 < tok_max < SANE_MODEL_MAX_LENGTH:
        candidates.append((int(tok_max), "model (tokenizer_config.json model_max_length)"))
    if info.max_positions and info.max_positions > 0:
        candidates.append((info.max_positions,
                           "model (config.json max_position_embeddings)"))
    return min(candidates, default=(DEFAULT_MAX_LENGTH, DEFAULT), key=lambda c: c[0])


def _default_pooling(info: ModelInfo) -> str:
    """SentenceTransformer(plain HF dir): last-token pooling for causal LMs, else mean."""
    config = _read_json(info.path / "config.json") or {}
    causal = (info.architectures and info.architectures[0].endswith("ForCausalLM")
              and config.get("is_causal", True))
    return "lasttoken" if causal else "mean"


def resolve_settings(info: ModelInfo, model: ModelSpec, task: TaskSpec,
                     text_column: str = "text") -> Settings:
    """The job's value for each setting, else the model directory's, else a default;
    for kind generate also the generation settings (``text_column``: the default prompt).

    Raises :class:`SettingsError` for a model module lepton-batch cannot apply (unless the
    job sets ``task.pooling`` and so opts out of it) or an unknown ``task.prompt_name``.
    """
    path = info.path
    problems: list[str] = []
    warnings: list[str] = []
    sources: dict[str, str] = {}
    # Pooling only matters for embeddings; a classifier head ignores it.
    pools = task.kind == "embed" or (task.labels is not None and task.method != "likelihood")

    def pick(name: str, job_value: Any, model_value: Any, model_source: str,
             declared: bool) -> Any:
        """Job value over the model's; warn when it contradicts a value the model states."""
        if job_value is None:
            sources[name] = model_source
            return model_value
        sources[name] = JOB
        if declared and job_value != model_value:
            job_field = "model.max_length" if name == "max_length" else f"task.{name}"
            warnings.append(f"{job_field}: the job sets {job_value!r} but the model's "
                            f"{model_source.removeprefix('model (').rstrip(')')} says "
                            f"{model_value!r}; outputs will differ from sentence-transformers")
        return job_value

    modules = _read_json(path / "modules.json")
    if modules is not None and not (isinstance(modules, list)
                                    and all(isinstance(m, dict) for m in modules)):
        raise SettingsError([f"model.path: {path / 'modules.json'} is not a list of modules"])
    st_config = _read_json(path / "sentence_bert_config.json") or {}
    kinds = {_module_kind(m): m for m in modules or []}

    # max_length
    if st_config.get("max_seq_length"):
        model_max = int(st_config["max_seq_length"])
        max_source = "model (sentence_bert_config.json)"
    else:
        model_max, max_source = _fallback_max_length(info)
    max_length = pick("max_length", model.max_length, model_max, max_source,
                      declared="sentence_bert_config" in max_source)
    lowercase = bool(st_config.get("do_lower_case", False))
    sources["lowercase"] = "model (sentence_bert_config.json)" if st_config else DEFAULT

    # pooling, include_prompt, normalize
    include_prompt, model_pooling = True, _default_pooling(info)
    pool_source, pool_declared = DEFAULT, False
    if modules is not None:
        unsupported = [f"{k} ({m.get('path') or 'no folder'})" for k, m in kinds.items()
                       if k not in ("Transformer", "Pooling", "Normalize")]
        transformer = kinds.get("Transformer")
        if transformer is not None and transformer.get("path"):
            unsupported.append(f"Transformer in {transformer['path']}/ (not the directory "
                               "itself)")
        pooling_module = kinds.get("Pooling")
        if pooling_module is None:
            unsupported.append("no Pooling module")
        else:
            rel = Path(pooling_module.get("path") or ".") / "config.json"
            pool_config = _read_json(path / rel) or {}
            modes = _pooling_modes(pool_config)
            include_prompt = bool(pool_config.get("include_prompt", True))
            pool_source, pool_declared = f"model ({rel.as_posix()})", True
            if len(modes) == 1 and modes[0] in POOLING_MODES:
                model_pooling = modes[0]
            else:
                model_pooling = "+".join(modes)
                unsupported.append(f"pooling mode {model_pooling} in {rel.as_posix()}")
        if unsupported and pools:
            what = "; ".join(unsupported)
            if task.pooling is None:
                problems.append(
                    f"task.pooling: lepton-batch cannot apply the model's {what} "
                    "(modules.json), so its embeddings would differ from sentence-transformers"
                    f". Set task.pooling ({' | '.join(POOLING_MODES)}) to embed the "
                    "transformer's output with that pooling instead")
            else:
                warnings.append(f"task.pooling: the model's {what} is not applied; outputs "
                                "will differ from sentence-transformers")
    pooling = pick("pooling", task.pooling, model_pooling, pool_source,
                   declared=pool_declared and model_pooling in POOLING_MODES)
    sources["include_prompt"] = pool_source if pool_declared else DEFAULT
    if task.labels is not None:  # zero-shot compares rows and labels by cosine similarity
        normalize, sources["normalize"] = True, "lepton-batch (zero-shot uses cosine)"
        if task.normalize is False:
            warnings.append("task.normalize: false is ignored by zero-shot classify, which "
                            "compares normalised embeddings (cosine similarity)")
    else:
        normalize = pick("normalize", task.normalize, "Normalize" in kinds,
                         "model (modules.json)" if modules is not None else DEFAULT,
                         declared=modules is not None)

    # prompt
    prompt_config = _read_json(path / "config_sentence_transformers.json")
    prompts = dict((prompt_config or {}).get("prompts") or {})
    default_name = (prompt_config or {}).get("default_prompt_name")
    model_prompt = prompts.get(default_name, "") if default_name else ""
    prompt_source = "model (config_sentence_transformers.json)" if prompt_config else DEFAULT
    if task.prompt_name is not None:
        if task.prompt_name in prompts:
            prompt, sources["prompt"] = prompts[task.prompt_name], JOB
        else:
            prompt = ""
            known = ", ".join(map(repr, prompts)) or "none"
            problems.append(f"task.prompt_name: {task.prompt_name!r} is not one of the "
                            f"model's prompts in config_sentence_transformers.json ({known})")
    else:
        # A causal LM's task.prompt is a template the pipeline renders, not a prefix.
        job_prompt = None if task.uses_template else task.prompt
        prompt = pick("prompt", job_prompt, model_prompt, prompt_source,
                      declared=bool(default_name))
    if problems:
        raise SettingsError(problems)
    for w in warnings:
        log.warning(w)
    generation = resolve_generation(path, task, text_column) if task.kind == "generate" \
        else None
    return Settings(max_length=max_length, pooling=pooling, normalize=normalize, prompt=prompt,
                    lowercase=lowercase, include_prompt=include_prompt, sources=sources,
                    warnings=tuple(warnings), generation=generation)
