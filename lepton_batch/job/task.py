"""The job file's ``task`` section: what to compute for every row, and its checks.

Re-exported by :mod:`lepton_batch.job.spec`, where the rest of the job file lives.
"""

from __future__ import annotations

import string
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PositiveInt,
    Tag,
    model_validator,
)

from lepton_batch.job.structured import ResponseFormat

# Task fields that settings.py resolves against the model; the fingerprint hashes the result.
RESOLVED_TASK_FIELDS = {"pooling", "normalize", "prompt", "prompt_name"}
CAUSAL_KINDS = ("generate", "score")
# Fields that only the causal-LM tasks read; each is refused with embed and classify.
GENERATE_FIELDS = {"chat", "system", "max_new_tokens", "max_new_tokens_column", "do_sample",
                   "temperature", "top_p", "repetition_penalty", "stop", "seed",
                   "response_format"}
# generate: fields that may name a column instead of a value ({column: name}), per row.
DEFAULT_MAX_NEW_TOKENS = 128
ROW_FIELDS = ("temperature", "top_p", "top_k", "max_new_tokens", "stop", "seed")
# generate: setting one of these (temperature above 0) means sampling when do_sample is
# unset, as in the OpenAI API and vLLM.
SAMPLING_FIELDS = ("temperature", "top_p", "top_k")
# Zero-shot classify by embeddings only.
ZERO_SHOT_FIELDS = ("label_template", "scores", "softmax_temperature")
DEFAULT_SOFTMAX_TEMPERATURE = 0.05
# Fields added after outputs were written: left out of the fingerprint while unset, so
# existing jobs keep their fingerprint (and their outputs).
LATER_FIELDS = {"label_template", "scores", "softmax_temperature", "min_score",
                "response_format"}


def template_fields(template: str) -> list[str]:
    """Column names a prompt template reads (``"Summarize: {text}"`` -> ``["text"]``).

    Raises ValueError for a malformed template or a field that is not a plain name.
    """
    names = []
    for _, name, spec, conv in string.Formatter().parse(template):
        if name is None:
            continue
        if not name.isidentifier() and not name.replace("-", "_").replace(".", "_").isidentifier():
            raise ValueError(f"{{{name}}} is not a column name; write {{column}}, and {{{{ "
                             "}} for literal braces")
        if spec or conv:
            raise ValueError(f"{{{name}}} may not carry a format spec or conversion")
        if name not in names:
            names.append(name)
    return names


def _check_label_template(template: str) -> None:
    """A label template holds exactly one ``{}`` (the label), ``{{ }}`` for literal braces."""
    try:
        fields = [(n, s, c) for _, n, s, c in string.Formatter().parse(template)
                  if n is not None]
    except ValueError as exc:
        raise ValueError(f"label_template: {exc}; write {{{{ }}}} for literal braces") from None
    if fields != [("", "", None)]:
        raise ValueError("label_template must hold the label as {} exactly once, e.g. "
                         f"'This post is {{}}.' (got {template!r})")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Column(_Strict):
    """``{column: name}``: a generate setting read per row from that input column (a null
    there takes the job's value, else the model's)."""

    column: str = Field(min_length=1)


def _branch(value: Any) -> str:
    return "[column]" if isinstance(value, (dict, Column)) else "[value]"


def per_row(value_type: Any) -> Any:
    """``value_type`` or ``{column: name}``; an error names only the branch the value took
    (the bracketed tags drop out of the field path in job errors)."""
    return Annotated[Union[Annotated[value_type, Tag("[value]")],  # noqa: UP007
                           Annotated[Column, Tag("[column]")]], Discriminator(_branch)]


class TaskSpec(_Strict):
    kind: Literal["embed", "classify", "generate", "score"]
    # None: the model directory's own setting (1_Pooling/, a Normalize module, the prompts in
    # config_sentence_transformers.json), so a job gives what sentence-transformers gives.
    pooling: Literal["mean", "cls", "max", "lasttoken"] | None = None
    normalize: bool | None = None  # zero-shot classify always normalises (cosine similarity)
    # embed / classify: literal text prepended to every row (and zero-shot label).
    # generate / score: a template over the row's columns, "Summarize: {text}"; default
    # "{<input.text_column>}".
    prompt: str | None = None
    prompt_name: str | None = None  # a key of the model's `prompts`
    # classify: None uses the model's sequence-classification head; a list (or a mapping of
    # label -> description) runs zero-shot classification by cosine similarity.
    labels: list[str] | dict[str, str] | None = None
    # Zero-shot by embeddings: each label (or description) is embedded as this template
    # filled with it ("This post is {}."); None: the label as it stands.
    label_template: str | None = None
    # Zero-shot by embeddings: cosine (default) writes the raw cosine similarities, which
    # are small and not comparable across models; softmax writes softmax(cosine /
    # softmax_temperature) over the labels, which sums to 1 per row.
    scores: Literal["cosine", "softmax"] | None = None
    softmax_temperature: float | None = Field(default=None, gt=0)
    # classify: a row whose top score is below this gets a null label (its scores are kept;
    # it is not an error).
    min_score: float | None = Field(default=None, ge=-1, le=1)
    # classify: how many top labels to write (default 1). generate: top-k sampling (0 off;
    # default: the model's generation_config.json, as for the other sampling fields).
    top_k: per_row(Annotated[int, Field(ge=0)]) | None = None
    # classify with labels: "embedding" (zero-shot by cosine similarity, the default) or
    # "likelihood" (a causal LM scores each label as the continuation of task.prompt).
    method: Literal["embedding", "likelihood"] | None = None

    # generate: the prompt through the tokenizer's chat template (a user turn, after
    # `system` when given) instead of as plain text.
    chat: bool = False
    system: str | None = None
    max_new_tokens: per_row(PositiveInt) = DEFAULT_MAX_NEW_TOKENS
    max_new_tokens_column: str | None = None  # per-row limit; null rows use max_new_tokens
    # Sampling, as in the OpenAI API and vLLM: temperature 0 is greedy; setting temperature
    # (above 0), top_p or top_k samples. do_sample states it outright (false with a sampling
    # field is an error). None everywhere: the model's generation_config.json, as
    # model.generate reads it; greedy when it says nothing.
    do_sample: bool | None = None
    temperature: per_row(Annotated[float, Field(ge=0)]) | None = None
    top_p: per_row(Annotated[float, Field(gt=0, le=1)]) | None = None
    repetition_penalty: float | None = Field(default=None, gt=0)
    stop: per_row(list[str]) = Field(default_factory=list)  # generation ends before these
    seed: per_row(int) = 0  # a row samples from seed + its id: the same text in any rerun
    # generate: every generation JSON of a schema, one of some choices, or a regex match
    # (structured.py); a JSON schema's answer also lands in typed columns.
    response_format: ResponseFormat | None = None
    # score: log p(continuation | prompt) only, instead of the whole prompt's likelihood.
    continuation_column: str | None = None

    @model_validator(mode="after")
    def _check_kind_fields(self) -> TaskSpec:
        self._check_zero_shot_fields()
        causal = self.kind in CAUSAL_KINDS
        if not causal:
            given = sorted(f for f in GENERATE_FIELDS if f in self.model_fields_set)
            if given:
                raise ValueError(f"{', '.join(given)} only apply to kind: generate; remove "
                                 "them or change task.kind")
        if self.kind != "score" and self.continuation_column is not None:
            raise ValueError("continuation_column only applies to kind: score")
        if self.method is not None and (self.kind != "classify" or self.labels is None):
            raise ValueError("method applies to kind: classify with labels (zero-shot)")
        if self.method == "likelihood":
            for name in ("pooling", "normalize", "prompt_name"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} does not apply to method: likelihood; write "
                                     "the prompt template in task.prompt")
            if self.prompt is not None:
                template_fields(self.prompt)
            return self._check_labels()
        if causal:
            for name in ("pooling", "normalize", "prompt_name", "labels"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} does not apply to kind: {self.kind}; for a "
                                     "causal LM write the prompt template in task.prompt")
            extra = self.model_fields_set & (GENERATE_FIELDS | {"top_k"})
            if self.kind == "score" and extra:
                raise ValueError(f"{', '.join(sorted(extra))} only apply to kind: generate")
            if self.prompt is not None:
                template_fields(self.prompt)
            if self.system is not None and not self.chat:
                raise ValueError("system is the chat template's system message; set "
                                 "task.chat: true or drop task.system")
            if isinstance(self.stop, list) and any(not s for s in self.stop):
                raise ValueError("stop may not hold an empty string")
            if isinstance(self.max_new_tokens, Column) and self.max_new_tokens_column:
                raise ValueError("give max_new_tokens: {column: ...} or max_new_tokens_column,"
                                 " not both")
            if self.response_format is not None and self.kind != "generate":
                raise ValueError("response_format only applies to kind: generate")
            return self._check_sampling()
        if isinstance(self.top_k, Column):
            raise ValueError("top_k: {column: ...} is for kind: generate; classify writes "
                             "the same number of labels for every row")
        if self.top_k == 0:
            raise ValueError("top_k must be at least 1 for classify")
        if self.prompt is not None and self.prompt_name is not None:
            raise ValueError("give task.prompt (literal text) or task.prompt_name (one of the "
                             "model's prompts), not both")
        if self.kind == "embed" and self.labels is not None:
            raise ValueError("labels only apply to kind: classify; remove task.labels")
        return self._check_labels()

    def _check_zero_shot_fields(self) -> None:
        zero_shot = self.kind == "classify" and self.labels is not None \
            and self.method != "likelihood"
        given = [f for f in ZERO_SHOT_FIELDS if getattr(self, f) is not None]
        if given and not zero_shot:
            raise ValueError(f"{', '.join(given)} apply to kind: classify with labels "
                             "(zero-shot by embeddings); remove them")
        if self.min_score is not None and self.kind != "classify":
            raise ValueError("min_score applies to kind: classify; remove task.min_score")
        if self.softmax_temperature is not None and self.scores != "softmax":
            raise ValueError("softmax_temperature applies to scores: softmax; set task.scores:"
                             " softmax or drop task.softmax_temperature")
        if self.label_template is not None:
            _check_label_template(self.label_template)

    def _check_sampling(self) -> TaskSpec:
        """generate: do_sample, temperature 0 and the sampling fields must agree."""
        if self.kind != "generate":
            return self
        sampling = [f for f in SAMPLING_FIELDS if getattr(self, f) is not None
                    and not (f == "temperature" and self.temperature == 0)]
        if self.do_sample is False and sampling:
            fields = ", ".join(sampling)
            verb = "applies" if len(sampling) == 1 else "apply"
            raise ValueError(f"do_sample: false is greedy decoding, but {fields} only {verb} "
                             f"when sampling; drop do_sample (setting {fields} samples, as in "
                             f"the OpenAI API and vLLM) or drop {fields}")
        if self.temperature == 0 and (self.do_sample or sampling):
            fields = ", ".join(["do_sample: true"] * bool(self.do_sample) + sampling)
            raise ValueError(f"temperature: 0 is greedy decoding (as in the OpenAI API and "
                             f"vLLM), but {fields} asks for sampling; drop one of them")
        return self

    def _check_labels(self) -> TaskSpec:
        if self.labels is not None:
            if len(self.labels) < 2:
                raise ValueError("labels needs at least 2 labels for zero-shot classification")
            if len(set(self.labels)) != len(self.labels):
                raise ValueError("labels has duplicates")
            if self.labels_k > len(self.labels):
                raise ValueError(
                    f"top_k is {self.top_k} but there are only {len(self.labels)} labels"
                )
        return self

    @property
    def uses_template(self) -> bool:
        """task.prompt is a template over the row's columns (causal LMs), not a prefix."""
        return self.kind in CAUSAL_KINDS or self.method == "likelihood"

    def row_columns(self) -> dict[str, str]:
        """generate: the settings read per row, {field: input column}."""
        out = {name: value.column for name in ROW_FIELDS
               if isinstance(value := getattr(self, name), Column)}
        if self.max_new_tokens_column:
            out["max_new_tokens"] = self.max_new_tokens_column
        return out

    @property
    def samples(self) -> bool | None:
        """generate: whether the job asks for sampling (do_sample, else temperature 0 for
        greedy, else any sampling field for sampling); None: the model's
        generation_config.json decides."""
        if self.do_sample is not None:
            return self.do_sample
        if self.temperature == 0:
            return False
        if any(getattr(self, f) is not None for f in SAMPLING_FIELDS):
            return True
        return None

    @property
    def labels_k(self) -> int:
        """classify: how many top labels each row gets."""
        return self.top_k or 1

    @property
    def score_kind(self) -> str:
        """Zero-shot by embeddings: ``cosine`` or ``softmax`` (task.scores)."""
        return self.scores or "cosine"

    def label_texts(self) -> tuple[list[str], list[str]]:
        """Zero-shot labels and the texts embedded for them (the description when given,
        filled into ``label_template`` when one is set)."""
        if isinstance(self.labels, dict):
            names, texts = list(self.labels), list(self.labels.values())
        else:
            names, texts = list(self.labels or []), list(self.labels or [])
        if self.label_template is not None:
            texts = [self.label_template.format(t) for t in texts]
        return names, texts
