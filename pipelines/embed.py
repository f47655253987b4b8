"""``task.kind: embed`` — pooled (and, when the model says so, L2-normalised) embeddings.

Pooling, normalisation, prompt and lowercasing come from the resolved :class:`Settings`:
the job's values, else the model directory's own, as sentence-transformers applies them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa

from lepton_batch.engine import BatchStats, Tokenized
from lepton_batch.job.modeldir import ModelInfo
from lepton_batch.job.settings import Settings
from lepton_batch.job.spec import EngineSpec, InputSpec, TaskSpec
from lepton_batch.pipelines.shape import TaskShape
from lepton_batch.pipelines.text import PreparedText, encoder_texts

if TYPE_CHECKING:  # built (and planned with) before torch is imported
    from lepton_batch.engine.encoder import Encoder


def prompt_tokens(engine: Encoder, settings: Settings) -> int:
    """Leading tokens to leave out of pooling: none, unless the model's Pooling module has
    ``include_prompt: false``; then the prompt's tokens (with the first special token, not
    a trailing one), counted as sentence-transformers counts them."""
    if settings.include_prompt or not settings.prompt:
        return 0
    ids = engine.tokenizer(settings.apply([""])[0])["input_ids"]
    return len(ids) - int(bool(ids) and ids[-1] in engine.tokenizer.all_special_ids)


class EmbedPipeline:
    """Output column ``embedding``: fixed_size_list<float32>[hidden_size]."""

    row_keyed = False  # a row's result depends on its content only
    chunkable = True  # rows run independently: a shard may be tokenized and run in chunks

    head = "base"

    @classmethod
    def shape(cls, task: TaskSpec, info: ModelInfo, settings: Settings,
              inp: InputSpec) -> TaskShape:
        return TaskShape(cls.head, (inp.text_column,),
                         (pa.field("embedding", pa.list_(pa.float32(), info.hidden_size)),))

    def __init__(self, task: TaskSpec, info: ModelInfo, settings: Settings,
                 inp: InputSpec) -> None:
        shape = self.shape(task, info, settings, inp)
        self.task = task
        self.text_column = inp.text_column
        self.columns, self._fields = list(shape.columns), list(shape.fields)
        self.settings = settings
        self.dim = info.hidden_size

    def fields(self) -> list[pa.Field]:
        return self._fields

    def prepare(self, table: pa.Table) -> tuple[list[str], PreparedText]:
        """The texts to tokenize (prompt prepended, lowercased when the model says so) and
        which rows they are; bad rows are recorded, not raised."""
        return encoder_texts(table[self.text_column], self.settings)

    def tokenize(self, engine: Encoder, texts: list[str]) -> Tokenized:
        return engine.tokenize(texts)

    def run(self, engine: Encoder, tok: Tokenized, spec: EngineSpec,
            stats: BatchStats) -> dict[str, pa.Array]:
        """Embeddings for the tokenized rows, in their order."""
        budget = engine.token_budget(spec.max_tokens_per_batch)
        s = self.settings
        emb = engine.embed(tok, s.pooling, s.normalize, budget, spec.max_rows_per_batch, stats,
                           skip=prompt_tokens(engine, s))
        flat = pa.array(emb.numpy().reshape(-1), pa.float32())
        return {"embedding": pa.FixedSizeListArray.from_arrays(flat, self.dim)}
