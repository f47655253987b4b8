"""A packed forward for the BERT family (BERT, RoBERTa, XLM-R, MiniLM): no FLOP on padding.

Hugging Face's BERT forward takes (b, L) padded input. Here the rows of a batch are laid
back to back as (T, hidden) and every dense layer (q/k/v, attention output, feed-forward)
runs on real tokens only; attention runs per row through a varlen kernel
(:func:`~lepton_batch.kernels.varlen_attention`). The weights are the modules
``from_pretrained`` already loaded (same safetensors, dtype and any int8 swap), so the
only new code is the order of calls, as TEI does for its BERT path. Anything this does not
recognise falls back to the Hugging Face forward, with the reason logged.
"""

from __future__ import annotations

import torch
from torch import nn

from lepton_batch.engine.batching import Batch
from lepton_batch.kernels import varlen_attention

_FAMILY = {"bert", "roberta", "xlm-roberta", "camembert"}
_HEADS = {"BertForSequenceClassification": "bert", "RobertaForSequenceClassification": "roberta",
          "XLMRobertaForSequenceClassification": "roberta",
          "CamembertForSequenceClassification": "roberta"}


def packable(model: nn.Module, head: str) -> tuple[bool, str]:
    """Whether :class:`PackedEncoder` can run ``model``, and why (not)."""
    cfg = model.config
    if cfg.model_type not in _FAMILY:
        return False, f"{cfg.model_type} is not in the BERT family: Hugging Face forward"
    if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
        return False, "decoder configuration: Hugging Face forward"
    if getattr(cfg, "position_embedding_type", "absolute") != "absolute":
        return False, f"{cfg.position_embedding_type} positions: Hugging Face forward"
    if head == "classifier" and type(model).__name__ not in _HEADS:
        return False, f"{type(model).__name__} head: Hugging Face forward"
    base = model.base_model
    layer = base.encoder.layer[0] if hasattr(base, "encoder") else None
    needed = ("attention.self.query", "attention.self.key", "attention.self.value",
              "attention.output.dense", "intermediate.dense", "output.dense")
    missing = [n for n in needed if layer is None or not _has(layer, n)]
    if missing or not hasattr(base, "embeddings"):
        return False, "unexpected module layout: Hugging Face forward"
    return True, f"{cfg.model_type}: packed rows, no padding in the dense layers"


def _has(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


PACK_BUCKET = 1024  # tokens; see PackedEncoder.hidden


def dense_rows(tokens: int, device: str) -> int:
    """Rows the dense layers compute for ``tokens`` packed tokens: on CPU rounded up to a
    multiple of PACK_BUCKET (zero rows), so that GEMM shapes repeat."""
    return tokens + (-tokens) % PACK_BUCKET if device == "cpu" else tokens


class PackedEncoder:
    """Runs a BERT-family model loaded by transformers on packed rows.

    ``model``: a ``BertModel``-like base model or a supported ``*ForSequenceClassification``.
    ``backend``: a varlen attention backend (see ``pick_varlen``).
    """

    def __init__(self, model: nn.Module, backend: str) -> None:
        self.model, self.backend = model, backend
        self.base = model.base_model
        cfg = model.config
        # RoBERTa counts positions from padding_idx + 1; BERT from 0.
        self.position_offset = (cfg.pad_token_id + 1) if cfg.model_type != "bert" else 0
        self.layers = list(self.base.encoder.layer)
        sa = self.layers[0].attention.self
        self.heads, self.head_dim = sa.num_attention_heads, sa.attention_head_size
        self.head_kind = _HEADS.get(type(model).__name__)
        # One GEMM for q, k and v instead of three, when none of them was swapped (int8).
        self.qkv: list[tuple[torch.Tensor, torch.Tensor | None] | None] = []
        for layer in self.layers:
            s = layer.attention.self
            lins = (s.query, s.key, s.value)
            if all(type(x) is nn.Linear for x in lins):
                w = torch.cat([x.weight for x in lins])
                b = torch.cat([x.bias for x in lins]) if all(
                    x.bias is not None for x in lins) else None
                self.qkv.append((w, b))
            else:
                self.qkv.append(None)

    def hidden(self, batch: Batch) -> torch.Tensor:
        """Last hidden states of the packed rows, (T, hidden) in the model's dtype."""
        assert batch.packed, "PackedEncoder needs a packed batch"
        ids, pos = batch.ids[None], batch.positions[None] + self.position_offset
        x = self.base.embeddings(input_ids=ids, position_ids=pos,
                                 token_type_ids=torch.zeros_like(ids))[0]
        key_mask = None
        if int(batch.rows.size) * batch.max_len != int(batch.ids.shape[0]):
            key_mask = batch.mask.bool()
        total, width = x.shape[0], self.heads * self.head_dim
        # On CPU every new GEMM row count costs oneDNN a new cached primitive, and packed
        # batches each have their own token count: the worker's memory grew with the
        # corpus. Zero rows up to a multiple of PACK_BUCKET keep the shapes few.
        pad = dense_rows(total, x.device.type) - total
        if pad:
            x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
        shape = (total, self.heads, self.head_dim)
        for layer, qkv in zip(self.layers, self.qkv, strict=True):
            s = layer.attention.self
            if qkv is not None:
                q, k, v = nn.functional.linear(x, *qkv).split(width, dim=-1)
            else:
                q, k, v = s.query(x), s.key(x), s.value(x)
            ctx = varlen_attention(q[:total].reshape(shape), k[:total].reshape(shape),
                                   v[:total].reshape(shape), batch.cu_seqlens, batch.max_len,
                                   self.backend, batch.row_of, batch.positions, key_mask)
            ctx = ctx.reshape(total, width)
            if pad:
                ctx = torch.cat([ctx, ctx.new_zeros(pad, width)])
            x = layer.attention.output(ctx, x)  # dense + residual + LN
            x = layer.output(layer.intermediate(x), x)
        return x[:total]

    def logits(self, batch: Batch) -> torch.Tensor:
        """Sequence-classification logits from each row's first token, (b, num_labels)."""
        first = self.hidden(batch)[batch.cu_seqlens[:-1].long()][:, None]  # (b, 1, hidden)
        if self.head_kind == "bert":
            return self.model.classifier(self.base.pooler(first))
        return self.model.classifier(first)  # RoBERTa's head reads features[:, 0]
