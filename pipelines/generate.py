"""``task.kind: generate`` — text generated from a prompt per row, by continuous batching.

Output columns: ``generation`` (the new text, cut before a stop string), ``finish_reason``
(``eos``, ``stop`` or ``length``), ``prompt_tokens`` and ``generated_tokens``. A prompt too
long for the model's context keeps its last tokens (``truncated``); sampling is resolved
before the run (the job, else the model's ``generation_config.json``; see generation.py).
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
from lepton_batch.pipelines.prompts import chat_prompts, prepared, render, template
from lepton_batch.pipelines.shape import TaskShape
from lepton_batch.pipelines.text import PreparedText

if TYPE_CHECKING:  # built (and planned with) before torch is imported
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
        column = task.max_new_tokens_column
        return TaskShape(
            cls.head,
            (*template_fields(template(task, inp.text_column)), *([column] if column else [])),
            OUTPUT_FIELDS)

    def __init__(self, task: TaskSpec, info: ModelInfo, settings: Settings,
                 inp: InputSpec) -> None:
        self.columns = list(self.shape(task, info, settings, inp).columns)
        self.task = task
        self.generation = settings.generation or resolve_generation(info.path, task,
                                                                    inp.text_column)
        self.template = template(task, inp.text_column)
        self.max_new = np.zeros(0, dtype=np.int64)
        self.seeds = np.zeros(0, dtype=np.int64)
        self.id_column = inp.id_column
        # A sampled row's text depends on its id (the seed), not on its content only.
        self.row_keyed = self.generation.do_sample

    def fields(self) -> list[pa.Field]:
        return list(OUTPUT_FIELDS)

    def prepare(self, table: pa.Table) -> tuple[list[str], PreparedText]:
        """The prompts of the usable rows; per-row limits and seeds kept for ``run``."""
        prompts, errors = render(table, self.template)
        n = table.num_rows
        limits = np.full(n, self.task.max_new_tokens, dtype=np.int64)
        column = self.task.max_new_tokens_column
        if column:
            for i, value in enumerate(table[column].to_pylist()):
                if value is None:
                    continue
                if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                        value != int(value) or value < 1):
                    if errors[i] is None:
                        errors[i] = f"{column}: {value!r} is not a positive integer"
                        prompts[i] = None
                    continue
                limits[i] = int(value)
        from lepton_batch.engine.continuous import row_seed

        prep = prepared(prompts, errors)
        ids = table[self.id_column].to_pylist()
        self.max_new = limits[prep.valid]
        self.seeds = np.fromiter((row_seed(self.task.seed, ids[i]) for i in prep.valid),
                                 dtype=np.int64, count=len(prep.valid))
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
        out = generate(engine, tok, self.max_new, self.seeds,
                       Sampling(**self.generation.sampling_kwargs()), self.task.stop,
                       spec.max_num_seqs, spec.kv_cache_tokens,
                       engine.token_budget(spec.max_tokens_per_batch), gstats,
                       graphs=spec.cuda_graphs and engine.device == "cuda")
        texts = engine.tokenizer.batch_decode(out.tokens, skip_special_tokens=True) \
            if out.tokens else []
        finish = list(out.finish)
        if self.task.stop:
            for i, text in enumerate(texts):
                texts[i], hit = cut_at_stop(text, self.task.stop)
                if hit:
                    finish[i] = "stop"
        stats.batches += gstats.prefills + gstats.decode_steps
        stats.tokens += gstats.prompt_tokens + gstats.generated_tokens
        stats.padded_tokens += gstats.padded_prefill_tokens + gstats.slot_steps
        stats.sizes += gstats.sizes
        return {
            "generation": pa.array(texts, pa.string()),
            "finish_reason": pa.array(finish, pa.string()),
            "prompt_tokens": pa.array(tok.lengths, pa.int32()),
            "generated_tokens": pa.array([len(t) for t in out.tokens], pa.int32()),
        }
