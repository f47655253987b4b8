"""``task.kind: generate`` — text generated from a prompt per row, by continuous batching.

Output columns: ``generation`` (the new text, cut before a stop string), ``finish_reason``
(``eos``, ``stop`` or ``length``), ``prompt_tokens`` and ``generated_tokens``. A prompt too
long for the model's context keeps its last tokens (``truncated``); sampling is resolved
before the run (the job, else the model's ``generation_config.json``; see generation.py),
and may be read per row from columns (``per_row.py``). With ``task.response_format`` every
generation is constrained to a JSON schema, choices or a regex (``job/structured.py``,
``engine/grammar.py``), and a JSON answer is also parsed into typed columns; one that does
not parse (cut by ``max_new_tokens``) keeps its text and gets ``error`` and nulls there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from lepton_batch.engine import BatchStats, Tokenized
from lepton_batch.job.generation import resolve_generation
from lepton_batch.job.modeldir import ModelInfo
from lepton_batch.job.settings import Settings
from lepton_batch.job.spec import EngineSpec, InputSpec, TaskSpec, template_fields
from lepton_batch.job.structured import fields as structured_fields
from lepton_batch.job.structured import grammar_text, typed_columns
from lepton_batch.pipelines.per_row import row_values
from lepton_batch.pipelines.prompts import chat_prompts, prepared, render, template
from lepton_batch.pipelines.shape import TaskShape
from lepton_batch.pipelines.text import PreparedText

if TYPE_CHECKING:  # built (and planned with) before torch is imported
    from lepton_batch.engine.continuous import RowSampling
    from lepton_batch.engine.decoder import Decoder


def fit_context(ids: list[list[int]], max_new: np.ndarray,
                context: int) -> tuple[Tokenized, np.ndarray]:
    """Cut each prompt from the left so prompt + ``max_new`` fits ``context`` (keeping at
    least one prompt token), and ``max_new`` to what is left. Returns the prompts (the cut
    ones flagged ``truncated``) and the per-row new-token limits."""
    keep = np.maximum(1, context - max_new)
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    truncated = lengths > keep
    cut = [row[-int(k):] if t else row for row, k, t in zip(ids, keep, truncated, strict=True)]
    lengths = np.minimum(lengths, keep)
    return Tokenized.from_lists(cut, truncated), np.minimum(max_new, context - lengths)


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """``text`` up to the first stop string, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


OUTPUT_FIELDS = (pa.field("generation", pa.string()), pa.field("finish_reason", pa.string()),
                   pa.field("prompt_tokens", pa.int32()), pa.field("generated_tokens", pa.int32()))
OUTPUT_NAMES = {f.name for f in OUTPUT_FIELDS} | {"num_tokens", "truncated", "error"}


def typed_fields(task: TaskSpec, inp: InputSpec) -> list[pa.Field]:
    """The typed columns of a JSON-schema ``response_format`` (none otherwise). Raises
    ValueError when one would take the name of another output or kept input column."""
    fmt = task.response_format
    if fmt is None or fmt.type != "json_schema":
        return []
    out = structured_fields(fmt.schema(), fmt.column)
    taken = OUTPUT_NAMES | {inp.id_column, *inp.passthrough_columns}
    clash = sorted(f.name for f in out if f.name in taken)
    if clash:
        raise ValueError(f"task.response_format: the schema's {', '.join(clash)} would "
                         "overwrite an output or input column of the same name; rename the "
                         "property, or put the answer in one column (response_format.column)")
    return out


class GeneratePipeline:
    """Prompt template (or chat template) -> continuous-batching generation."""

    head = "causal_lm"

    @classmethod
    def shape(cls, task: TaskSpec, info: ModelInfo, settings: Settings,
              inp: InputSpec) -> TaskShape:
        """Raises ValueError when the model's stack cannot generate within its context
        (``settings.max_length``) or a chat prompt meets a tokenizer without a template."""
        from transformers import AutoConfig

        from lepton_batch.engine.decoder import stack_support

        ok, why = stack_support(AutoConfig.from_pretrained(info.path), settings.max_length)
        if not ok:
            raise ValueError(f"task.kind: generate cannot run {info.path.name}: {why}")
        if task.chat and not info.has_chat_template:
            raise ValueError(f"task.chat: the tokenizer in {info.path} has no chat template "
                             "(chat_template in tokenizer_config.json or chat_template.jinja);"
                             " write the prompt in task.prompt and set task.chat: false")
        columns = [c for c in task.row_columns().values()]
        return TaskShape(
            cls.head, tuple(dict.fromkeys(
                [*template_fields(template(task, inp.text_column)), *columns])),
            (*OUTPUT_FIELDS, *typed_fields(task, inp)))

    def __init__(self, task: TaskSpec, info: ModelInfo, settings: Settings,
                 inp: InputSpec) -> None:
        self.columns = list(self.shape(task, info, settings, inp).columns)
        self.task = task
        self.generation = settings.generation or resolve_generation(info.path, task,
                                                                    inp.text_column)
        self.template = template(task, inp.text_column)
        self.max_new = np.zeros(0, dtype=np.int64)
        self.seeds = np.zeros(0, dtype=np.int64)
        self.stops: list[list[str]] | None = None
        self.rows: RowSampling | None = None
        fmt = self.generation.response_format
        self.grammar = grammar_text(fmt) if fmt else None
        self.typed = typed_fields(task, inp)
        self.id_column = inp.id_column
        # A sampled row's text depends on its id (the seed), not on its content only.
        self.row_keyed = self.generation.do_sample

    def fields(self) -> list[pa.Field]:
        return [*OUTPUT_FIELDS, *self.typed]

    def prepare(self, table: pa.Table) -> tuple[list[str], PreparedText]:
        """The prompts of the usable rows; their per-row settings kept for ``run``."""
        prompts, errors = render(table, self.template)
        per_row = row_values(table, self.generation)
        for i, problem in enumerate(per_row.errors):
            if problem is not None and errors[i] is None:
                errors[i], prompts[i] = problem, None
        from lepton_batch.engine.continuous import RowSampling, row_seed

        prep = prepared(prompts, errors)
        valid = prep.valid
        ids = table[self.id_column].to_pylist()
        self.max_new = per_row.take("max_new_tokens", valid, np.int64)
        self.seeds = np.fromiter((row_seed(per_row.values["seed"][i], ids[i]) for i in valid),
                                 dtype=np.int64, count=len(valid))
        columns = self.generation.columns
        self.stops = [list(per_row.values["stop"][i]) for i in valid] \
            if "stop" in columns else None
        self.rows = RowSampling(per_row.take("temperature", valid, np.float64),
                                per_row.take("top_k", valid, np.int64),
                                per_row.take("top_p", valid, np.float64)) \
            if columns.keys() & {"temperature", "top_k", "top_p"} else None
        return prep.texts, prep

    def tokenize(self, engine: Decoder, texts: list[str]) -> Tokenized:
        """Token ids of the prompts, cut to leave room for the new tokens."""
        if self.task.chat:
            texts = chat_prompts(engine.tokenizer, texts, self.task.system)
        ids = engine.tokenizer(texts, add_special_tokens=not self.task.chat,
                                 verbose=False)["input_ids"] \
            if texts else []
        tok, self.max_new = fit_context(ids, self.max_new, engine.context)
        return tok

    def run(self, engine: Decoder, tok: Tokenized, spec: EngineSpec,
            stats: BatchStats) -> dict[str, pa.Array]:
        """Generations for the tokenized prompts, in their order."""
        from lepton_batch.engine.continuous import GenerateStats, Sampling, generate

        gstats = GenerateStats()
        stats.started()  # the first step follows at once
        stop = list(self.generation.stop)
        out = generate(engine, tok, self.max_new, self.seeds,
                       Sampling(**self.generation.sampling_kwargs()), stop,
                       spec.max_num_seqs, spec.kv_cache_tokens,
                       engine.token_budget(spec.max_tokens_per_batch), gstats,
                       graphs=spec.cuda_graphs and engine.device == "cuda", rows=self.rows,
                       stops=self.stops,
                       grammars=[self.grammar] * len(tok) if self.grammar else None)
        texts = engine.tokenizer.batch_decode(out.tokens, skip_special_tokens=True) \
            if out.tokens else []
        finish = list(out.finish)
        for i, text in enumerate(texts):
            row_stop = self.stops[i] if self.stops is not None else stop
            if row_stop:
                texts[i], hit = cut_at_stop(text, row_stop)
                if hit:
                    finish[i] = "stop"
        stats.batches += gstats.prefills + gstats.decode_steps
        stats.tokens += gstats.prompt_tokens + gstats.generated_tokens
        stats.padded_tokens += gstats.padded_prefill_tokens + gstats.slot_steps
        stats.sizes += gstats.sizes
        results = {
            "generation": pa.array(texts, pa.string()),
            "finish_reason": pa.array(finish, pa.string()),
            "prompt_tokens": pa.array(tok.lengths, pa.int32()),
            "generated_tokens": pa.array([len(t) for t in out.tokens], pa.int32()),
        }
        if self.typed:  # the answer parsed into typed columns; one that does not parse
            typed, errors = typed_columns(texts, self.generation.response_format, self.typed)
            for i, error in enumerate(errors):  # (cut by max_new_tokens or a stop string)
                if error is not None:
                    errors[i] = f"{error}; finish_reason {finish[i]}"
            results |= typed
            results["error"] = pa.array(errors, pa.string())
        return results
