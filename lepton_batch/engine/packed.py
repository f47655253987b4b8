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
from lepton_batch.kernels.attention import PaddedAttention
from lepton_batch.kernels.onednn import OneDnnLinear, fast_linear, onednn_ok, with_activation

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
    ``backend``: a varlen attention backend (see ``pick_varlen``). ``fast``: on CPU, run
    the linear layers through oneDNN with reordered weights and fused activations, and
    attention through one reused padded buffer per batch (``kernels/onednn.py``,
    ``PaddedAttention``), when this torch can; False keeps the plain modules (the
    reference the tests compare against). ``compile``: run each layer's dense part (after
    attention) through ``torch.compile`` instead, one graph for every layer with dynamic
    token counts. ``self.layer_path`` says which ran and why.
    """

    def __init__(self, model: nn.Module, backend: str, fast: bool = True,
                 compile: bool = False) -> None:
        self.model, self.backend = model, backend
        self.base = model.base_model
        cfg = model.config
        # RoBERTa counts positions from padding_idx + 1; BERT from 0.
        self.position_offset = (cfg.pad_token_id + 1) if cfg.model_type != "bert" else 0
        self.layers = list(self.base.encoder.layer)
        sa = self.layers[0].attention.self
        self.heads, self.head_dim = sa.num_attention_heads, sa.attention_head_size
        self.head_kind = _HEADS.get(type(model).__name__)
        param = next(model.parameters())
        if compile:
            ok, why = False, "engine.compile"
        else:
            ok, why = onednn_ok(param.device.type, param.dtype) if fast else (False, "off")
        self.onednn = ok and backend == "sdpa_padded"
        self.padded_attention = fast and backend == "sdpa_padded"
        self.layer_path = f"oneDNN linears: {why}" if self.onednn else f"torch linears ({why})"
        # dynamic: packed batches each have their own token count; modules are inputs of
        # the graph (dynamo inlines them), so the layers share one compiled graph.
        self.compiled = torch.compile(_dense_part, dynamic=True) if compile else None
        act = cfg.hidden_act if isinstance(cfg.hidden_act, str) else None
        # One GEMM for q, k and v instead of three, when none of them was swapped (int8).
        self.qkv: list[tuple[torch.Tensor, torch.Tensor | None] | None] = []
        self.fast: list[_OneDnnLayer] = []
        for layer in self.layers:
            s = layer.attention.self
            lins = (s.query, s.key, s.value)
            fused = None
            if all(type(x) is nn.Linear for x in lins):
                w = torch.cat([x.weight for x in lins])
                b = torch.cat([x.bias for x in lins]) if all(
                    x.bias is not None for x in lins) else None
                fused = (w, b)
            if self.onednn:
                self.fast.append(_OneDnnLayer(layer, fused, act))
                fused = None  # the oneDNN copy serves q/k/v; no third copy of the weights
            self.qkv.append(fused)

    def _qkv(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """(T, hidden) -> (T, 3 * hidden): q, k and v side by side."""
        if self.fast and self.fast[i].qkv is not None:
            return self.fast[i].qkv(x)
        if self.qkv[i] is not None:
            return nn.functional.linear(x, *self.qkv[i])
        s = self.layers[i].attention.self
        return torch.cat([s.query(x), s.key(x), s.value(x)], dim=-1)

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
        padded = PaddedAttention(len(batch.rows), batch.max_len, batch.row_of,
                                 batch.positions, key_mask, self.heads, self.head_dim) \
            if self.padded_attention else None
        shape = (total, self.heads, self.head_dim)
        for i, layer in enumerate(self.layers):
            qkv = self._qkv(i, x)[:total]
            if padded is not None:
                ctx = padded(qkv)
            else:
                q, k, v = (t.reshape(shape) for t in qkv.split(width, dim=-1))
                ctx = varlen_attention(q, k, v, batch.cu_seqlens, batch.max_len, self.backend,
                                       batch.row_of, batch.positions, key_mask)
                ctx = ctx.reshape(total, width)
            if pad:
                ctx = torch.cat([ctx, ctx.new_zeros(pad, width)])
            if self.compiled is not None:
                x = self.compiled(layer, ctx, x)
            elif self.fast:
                x = self.fast[i](ctx, x)
            else:
                x = _dense_part(layer, ctx, x)
        return x[:total]

    def logits(self, batch: Batch) -> torch.Tensor:
        """Sequence-classification logits from each row's first token, (b, num_labels)."""
        first = self.hidden(batch)[batch.cu_seqlens[:-1].long()][:, None]  # (b, 1, hidden)
        if self.head_kind == "bert":
            return self.model.classifier(self.base.pooler(first))
        return self.model.classifier(first)  # RoBERTa's head reads features[:, 0]


def _dense_part(layer: nn.Module, ctx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A BERT layer after attention: output dense + residual + LayerNorm, then the
    feed-forward block. ctx: attention output (T, hidden); x: the layer's input (T,
    hidden); returns (T, hidden)."""
    x = layer.attention.output(ctx, x)
    return layer.output(layer.intermediate(x), x)


class _OneDnnLayer:
    """One encoder layer after attention, on oneDNN linears: attention output dense +
    residual + LayerNorm, then up-projection with its activation fused, down-projection +
    residual + LayerNorm. Modules it cannot copy (an int8 swap) run as they are."""

    def __init__(self, layer: nn.Module, qkv: tuple[torch.Tensor, torch.Tensor | None] | None,
                 act: str | None) -> None:
        self.qkv = OneDnnLinear(*qkv) if qkv is not None else None
        self.attn_dense = fast_linear(layer.attention.output.dense)
        self.attn_norm = layer.attention.output.LayerNorm
        self.up = with_activation(layer.intermediate.dense, act,
                                  layer.intermediate.intermediate_act_fn)
        self.down = fast_linear(layer.output.dense)
        self.out_norm = layer.output.LayerNorm

    def __call__(self, ctx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """ctx: attention output (T, hidden); x: the layer's input (T, hidden)."""
        x = self.attn_norm(self.attn_dense(ctx) + x)
        return self.out_norm(self.down(self.up(x)) + x)
