"""``task.kind: score`` — how likely a causal LM finds each row.

Output columns: ``logprob`` (sum of the scored tokens' log-probabilities), ``mean_logprob``,
``perplexity`` (``exp(-mean_logprob)``) and ``tokens`` (how many were scored). Without
``continuation_column`` every token after the first is scored; with it, only the
continuation's tokens, given the prompt: ``log p(continuation | prompt)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from lepton_batch.engine import BatchStats, Tokenized
from lepton_batch.job.modeldir import ModelInfo
from lepton_batch.job.settings import Settings
from lepton_batch.job.spec import EngineSpec, InputSpec, TaskSpec, template_fields
from lepton_batch.pipelines.prompts import prepared, render, template
from lepton_batch.pipelines.shape import TaskShape
from lepton_batch.pipelines.text import PreparedText, check_value

if TYPE_CHECKING:  # built (and planned with) before torch is imported
    from lepton_batch.engine.decoder import Decoder


class ScorePipeline:
    """Prompt (and continuation) -> log-probabilities from one forward per batch."""

    row_keyed = False  # a row's result depends on its content only

    head = "causal_lm"

    @classmethod
    def shape(cls, task: TaskSpec, info: ModelInfo, settings: Settings,
              inp: InputSpec) -> TaskShape:
        cont = task.continuation_column
        return TaskShape(
            cls.head,
            (*template_fields(template(task, inp.text_column)), *([cont] if cont else [])),
            (pa.field("logprob", pa.float64()), pa.field("mean_logprob", pa.float64()),
             pa.field("perplexity", pa.float64()), pa.field("tokens", pa.int32())))

    def __init__(self, task: TaskSpec, info: ModelInfo, settings: Settings,
                 inp: InputSpec) -> None:
        shape = self.shape(task, info, settings, inp)
        self.task = task
        self.template = template(task, inp.text_column)
        self.continuation = task.continuation_column
        self.columns, self._fields = list(shape.columns), list(shape.fields)
        self.conts: list[str] = []
        self.first = np.zeros(0, dtype=np.int64)

    def fields(self) -> list[pa.Field]:
        return self._fields

    def prepare(self, table: pa.Table) -> tuple[list[str], PreparedText]:
        prompts, errors = render(table, self.template)
        conts: list[str | None] = [None] * table.num_rows
        if self.continuation:
            for i, value in enumerate(table[self.continuation].to_pylist()):
                text, problem = check_value(value)
                if problem is not None and errors[i] is None:
                    errors[i], prompts[i] = f"{self.continuation}: {problem}", None
                conts[i] = text
        prep = prepared(prompts, errors)
        self.conts = [conts[i] for i in prep.valid] if self.continuation else []
        return prep.texts, prep

    def tokenize(self, engine: Decoder, texts: list[str]) -> Tokenized:
        """Prompt ids (+ continuation ids); rows over the context keep their last tokens."""
        if not texts:
            return Tokenized.from_lists([], np.zeros(0, dtype=bool))
        tokenizer, context = engine.tokenizer, engine.context
        ids = tokenizer(texts, verbose=False)["input_ids"]
        first = np.ones(len(ids), dtype=np.int64)
        if self.continuation:
            cont = tokenizer(self.conts, add_special_tokens=False)["input_ids"]
            first = np.fromiter((max(1, len(x)) for x in ids), dtype=np.int64, count=len(ids))
            ids = [a + b for a, b in zip(ids, cont, strict=True)]
        truncated = np.fromiter((len(x) > context for x in ids), dtype=bool, count=len(ids))
        for i in np.flatnonzero(truncated):
            cut = len(ids[i]) - context
            ids[i] = ids[i][cut:]
            first[i] = max(1, first[i] - cut)
        self.first = first
        return Tokenized.from_lists(ids, truncated)

    def run(self, engine: Decoder, tok: Tokenized, spec: EngineSpec,
            stats: BatchStats) -> dict[str, pa.Array]:
        """Scores for the tokenized rows, in their order; a row with nothing to score
        (one token) gets nulls, and its reason in ``stats.failed_rows``."""
        logprob, scored = engine.score(tok, self.first, engine.token_budget(
            spec.max_tokens_per_batch), spec.max_rows_per_batch, stats)
        empty = scored == 0
        for i in np.flatnonzero(empty):
            stats.failed_rows.append(int(i))
            stats.failed_reasons.append("nothing to score: the text is a single token")
        with np.errstate(divide="ignore", invalid="ignore"):
            mean = np.where(empty, np.nan, logprob / np.maximum(scored, 1))
        return {
            "logprob": pa.array(logprob, pa.float64()),
            "mean_logprob": pa.array(mean, pa.float64()),
            "perplexity": pa.array(np.exp(-mean), pa.float64()),
            "tokens": pa.array(scored, pa.int32()),
        }
