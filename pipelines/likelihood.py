"""``task.kind: classify`` with ``method: likelihood`` — a causal LM picks the label it
finds most likely after the prompt.

Each label (or its description, when ``labels`` is a mapping) is scored as the
continuation of the row's prompt, ``log p(label | prompt)`` summed over its tokens, with a
space between the two unless the prompt ends in whitespace. ``scores`` are these
log-likelihoods turned into probabilities over the labels (softmax).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from lepton_batch.engine import BatchStats, Tokenized
from lepton_batch.job.modeldir import ModelInfo
from lepton_batch.job.settings import Settings
from lepton_batch.job.spec import EngineSpec, InputSpec, TaskSpec, template_fields
from lepton_batch.pipelines.classify import LABEL_FIELDS, top_labels
from lepton_batch.pipelines.prompts import prepared, render, template
from lepton_batch.pipelines.shape import TaskShape
from lepton_batch.pipelines.text import PreparedText

if TYPE_CHECKING:  # built (and planned with) before torch is imported
    from lepton_batch.engine.decoder import Decoder


class LikelihoodPipeline:
    """Prompt template -> one scored continuation per label -> top-k labels."""

    row_keyed = False  # a row's result depends on its content only

    head = "causal_lm"

    @classmethod
    def shape(cls, task: TaskSpec, info: ModelInfo, settings: Settings,
              inp: InputSpec) -> TaskShape:
        return TaskShape(cls.head, tuple(template_fields(template(task, inp.text_column))),
                         LABEL_FIELDS)

    def __init__(self, task: TaskSpec, info: ModelInfo, settings: Settings,
                 inp: InputSpec) -> None:
        self.task = task
        self.template = template(task, inp.text_column)
        self.columns = list(self.shape(task, info, settings, inp).columns)
        self.names, self.label_texts = task.label_texts()

    def fields(self) -> list[pa.Field]:
        return list(LABEL_FIELDS)

    def prepare(self, table: pa.Table) -> tuple[list[str], PreparedText]:
        prep = prepared(*render(table, self.template))
        return prep.texts, prep

    def tokenize(self, engine: Decoder, texts: list[str]) -> Tokenized:
        """Prompt ids, cut from the left so the longest label still fits the context."""
        if not texts:
            return Tokenized.from_lists([], np.zeros(0, dtype=bool))
        ids = engine.tokenizer(texts, verbose=False)["input_ids"]
        self.spaced = [not t[-1:].isspace() for t in texts]
        longest = max(len(x) for x in self._label_ids(engine, True) + self._label_ids(
            engine, False))
        keep = max(1, engine.context - longest)
        truncated = np.fromiter((len(x) > keep for x in ids), dtype=bool, count=len(ids))
        return Tokenized.from_lists([x[-keep:] for x in ids], truncated)

    def _label_ids(self, engine: Decoder, spaced: bool) -> list[list[int]]:
        sep = " " if spaced else ""
        return engine.tokenizer([sep + t for t in self.label_texts],
                                add_special_tokens=False)["input_ids"]

    def run(self, engine: Decoder, tok: Tokenized, spec: EngineSpec,
            stats: BatchStats) -> dict[str, pa.Array]:
        """Top-k labels for the tokenized prompts, in their order."""
        import torch

        n, k = len(tok), len(self.label_texts)
        if n == 0:
            return top_labels(torch.zeros(0, k), self.names, self.task.labels_k)
        labels = {True: self._label_ids(engine, True), False: self._label_ids(engine, False)}
        rows, first = [], []
        for i in range(n):
            prompt = tok.row(i)
            for cont in labels[self.spaced[i]]:
                rows.append(prompt + cont)
                first.append(len(prompt))
        pairs = Tokenized.from_lists(rows, np.zeros(len(rows), dtype=bool))
        logprob, _ = engine.score(pairs, np.asarray(first, dtype=np.int64),
                                  engine.token_budget(spec.max_tokens_per_batch),
                                  spec.max_rows_per_batch, stats)
        probs = torch.from_numpy(logprob.reshape(n, k)).softmax(-1).float()
        return top_labels(probs, self.names, self.task.labels_k, self.task.min_score)
