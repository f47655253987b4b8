"""``task.kind: classify`` — a sequence-classification head, or zero-shot by label embeddings.

Zero-shot: every label (or its description, when ``labels`` is a mapping), filled into
``task.label_template`` when one is set ("This post is {}."), is embedded by the same model
with the same settings (pooling, prompt, lowercasing; always normalised). ``scores: cosine``
(the default) writes the raw cosine similarities to the labels: they are not probabilities,
are often small (a top label at 0.02 is possible) and differ in scale between models.
``scores: softmax`` writes ``softmax(cosine / softmax_temperature)`` over the labels (sums
to 1 per row). With a head, scores are softmax probabilities (sigmoid for multi-label
models). ``task.min_score``: a row whose top score is below it gets a null ``label`` (its
``score``, ``labels`` and ``scores`` are kept, ``error`` stays null: it is not an error).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa

from lepton_batch.engine import BatchStats, Tokenized
from lepton_batch.job.modeldir import ModelInfo
from lepton_batch.job.settings import Settings
from lepton_batch.job.spec import EngineSpec, InputSpec, TaskSpec
from lepton_batch.job.task import DEFAULT_SOFTMAX_TEMPERATURE
from lepton_batch.pipelines.embed import prompt_tokens
from lepton_batch.pipelines.shape import TaskShape
from lepton_batch.pipelines.text import PreparedText, encoder_texts

if TYPE_CHECKING:  # built (and planned with) before torch is imported
    import torch

    from lepton_batch.engine.encoder import Encoder


def top_labels(scores: torch.Tensor, names: list[str], k: int,
               min_score: float | None = None) -> dict[str, pa.Array]:
    """``label``/``score`` (top 1) and ``labels``/``scores`` (top k) from (n, L) float32
    scores; ``label`` is null where the top score is below ``min_score``."""
    import torch

    top = torch.topk(scores, k, dim=-1)
    idx, val = top.indices.numpy(), top.values.numpy()
    picked = [[names[j] for j in row] for row in idx]
    offsets = pa.array(range(0, len(idx) * k + 1, k), pa.int32())
    below = None if min_score is None else val[:, 0] < min_score
    return {
        "label": pa.array([p[0] for p in picked], pa.string(), mask=below),
        "score": pa.array(val[:, 0], pa.float32()),
        "labels": pa.ListArray.from_arrays(
            offsets, pa.array([n for p in picked for n in p], pa.string())),
        "scores": pa.ListArray.from_arrays(offsets, pa.array(val.reshape(-1), pa.float32())),
    }


# label and score (top 1), labels and scores (top k): classify by a head, by embeddings or
# by likelihood
LABEL_FIELDS = (pa.field("label", pa.string()), pa.field("score", pa.float32()),
                pa.field("labels", pa.list_(pa.string())),
                pa.field("scores", pa.list_(pa.float32())))


class ClassifyPipeline:
    """Output columns: ``label``, ``score`` (top 1) and ``labels``, ``scores`` (top k)."""

    row_keyed = False  # a row's result depends on its content only
    chunkable = True  # rows run independently: a shard may be tokenized and run in chunks

    @staticmethod
    def _names(task: TaskSpec, info: ModelInfo) -> list[str]:
        """The labels: the job's (zero-shot) or the model head's; raises ValueError when the
        model has no head and the job names no labels, or ``top_k`` exceeds them."""
        if task.labels is not None:
            names = task.label_texts()[0]
        elif not info.has_classifier_head:
            arch = ", ".join(info.architectures) or "no architecture"
            raise ValueError(
                f"task.labels: model {info.path.name} ({arch}) has no sequence-classification "
                "head; give task.labels for zero-shot classification"
            )
        else:
            names = [info.id2label.get(i, str(i)) for i in range(len(info.id2label) or 2)]
        if task.labels_k > len(names):
            raise ValueError(f"task.top_k: {task.top_k} > the model's {len(names)} labels")
        return names

    @classmethod
    def shape(cls, task: TaskSpec, info: ModelInfo, settings: Settings,
              inp: InputSpec) -> TaskShape:
        cls._names(task, info)
        return TaskShape("base" if task.labels is not None else "classifier",
                         (inp.text_column,), LABEL_FIELDS)

    def __init__(self, task: TaskSpec, info: ModelInfo, settings: Settings,
                 inp: InputSpec) -> None:
        shape = self.shape(task, info, settings, inp)
        self.task = task
        self.text_column = inp.text_column
        self.columns = list(shape.columns)
        self.settings = settings
        self.zero_shot = task.labels is not None
        self.head = shape.head
        self.names = self._names(task, info)
        if self.zero_shot:
            self.label_texts = task.label_texts()[1]
        self.multi_label = info.problem_type == "multi_label_classification"

    def fields(self) -> list[pa.Field]:
        return list(LABEL_FIELDS)

    def prepare(self, table: pa.Table) -> tuple[list[str], PreparedText]:
        """The texts to tokenize (prompt prepended, lowercased when the model says so) and
        which rows they are; bad rows are recorded, not raised."""
        return encoder_texts(table[self.text_column], self.settings)

    def tokenize(self, engine: Encoder, texts: list[str]) -> Tokenized:
        return engine.tokenize(texts)

    def _scores(self, engine: Encoder, tok: Tokenized, spec: EngineSpec,
                stats: BatchStats) -> torch.Tensor:
        """(n, num_labels) float32 scores for the tokenized rows."""
        import torch

        budget, rows = engine.token_budget(spec.max_tokens_per_batch), spec.max_rows_per_batch
        if self.zero_shot:
            pooling, skip = self.settings.pooling, prompt_tokens(engine, self.settings)
            labels = engine.tokenize(self.settings.apply(self.label_texts))
            label_emb = engine.embed(labels, pooling, True, budget, rows, skip=skip)
            cosine = engine.embed(tok, pooling, True, budget, rows, stats, skip=skip) @ label_emb.T
            if self.task.score_kind == "softmax":
                temperature = self.task.softmax_temperature or DEFAULT_SOFTMAX_TEMPERATURE
                return torch.softmax(cosine / temperature, dim=-1)
            return cosine
        logits = engine.logits(tok, budget, rows, stats)
        return torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)

    def run(self, engine: Encoder, tok: Tokenized, spec: EngineSpec,
            stats: BatchStats) -> dict[str, pa.Array]:
        """Top-k labels and scores for the tokenized rows, in their order."""
        return top_labels(self._scores(engine, tok, spec, stats), self.names,
                          self.task.labels_k, self.task.min_score)
