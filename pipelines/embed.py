"""``task.kind: embed`` — pooled (and by default L2-normalised) sentence embeddings."""

from __future__ import annotations

import pyarrow as pa

from lepton_batch.engine import BatchStats, Engine, Tokenized
from lepton_batch.modeldir import ModelInfo
from lepton_batch.spec import EngineSpec, TaskSpec


class EmbedPipeline:
    """Output column ``embedding``: fixed_size_list<float32>[hidden_size]."""

    head = "base"

    def __init__(self, task: TaskSpec, info: ModelInfo) -> None:
        self.task = task
        self.dim = info.hidden_size

    def fields(self) -> list[pa.Field]:
        return [pa.field("embedding", pa.list_(pa.float32(), self.dim))]

    def run(self, engine: Engine, tok: Tokenized, spec: EngineSpec,
            stats: BatchStats) -> dict[str, pa.Array]:
        """Embeddings for the tokenized rows, in their order."""
        budget = engine.token_budget(spec.max_tokens_per_batch)
        emb = engine.embed(tok, self.task.pooling, self.task.normalize, budget,
                           spec.max_rows_per_batch, stats)
        flat = pa.array(emb.numpy().reshape(-1), pa.float32())
        return {"embedding": pa.FixedSizeListArray.from_arrays(flat, self.dim)}
