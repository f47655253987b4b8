"""Causal LMs for ``generate`` and ``score``: the model loaded once, a forward over a KV cache.

``DecoderStack`` is our own forward for the Llama family (llama, mistral, qwen2, qwen3) and
GPT-2. It reuses the modules ``from_pretrained`` loaded (same safetensors weights, same
dtype) and runs token-major: every tensor is (N, ...) over the N tokens of a step, so a
decode step over B sequences is B tokens, and attention reads a per-sequence slice of the
KV cache (``kvcache.py``). ``Decoder.score`` uses the Hugging Face forward and so serves any
causal LM.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from lepton_batch.engine.batching import Tokenized, collate, plan_batches
from lepton_batch.engine.load import EngineConfig, resolve_device, set_cpu_threads
from lepton_batch.kernels.attention import avoid_cudnn_sdpa
from lepton_batch.kernels.onednn import OneDnnLinear, fast_linear, onednn_ok, with_activation

log = logging.getLogger(__name__)

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
GPT2_LIKE = ("gpt2",)
STACK_MODEL_TYPES = LLAMA_LIKE + GPT2_LIKE

# attend(layer, q (N, H, D), k (N, Hkv, D), v (N, Hkv, D)) -> (N, H * D)
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def stack_support(config, context: int | None = None) -> tuple[bool, str]:
    """Whether :class:`DecoderStack` runs this model config with sequences of up to
    ``context`` tokens, and why not when it does not."""
    mt = getattr(config, "model_type", None)
    if mt not in STACK_MODEL_TYPES:
        return False, (f"model_type {mt!r}: generate runs the Llama family "
                       f"({', '.join(LLAMA_LIKE)}) and GPT-2")
    window = getattr(config, "sliding_window", None)
    # A sliding window changes nothing for sequences that fit in it.
    if window and getattr(config, "use_sliding_window", mt == "mistral") and (
            context is None or context > window):
        return False, (f"{mt} attends over a sliding window of {window} tokens, which the "
                       f"decoder stack does not implement; set model.max_length to at most "
                       f"{window}")
    if getattr(config, "rope_parameters", None) and config.rope_parameters.get(
            "rope_type", "default") not in ("default", "linear", "llama3"):
        return False, f"rope_type {config.rope_parameters['rope_type']} is not supported yet"
    return True, f"{mt}: lepton-batch decoder stack with a KV cache"


def _fuse(linears: list[nn.Linear]) -> nn.Linear:
    """One Linear computing ``cat([l(x) for l in linears], -1)``; each original keeps a
    view of the fused weight, so the model holds one copy of it."""
    weight = torch.cat([lin.weight.data for lin in linears])
    bias = None
    if linears[0].bias is not None:
        bias = torch.cat([lin.bias.data for lin in linears])
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                      device=weight.device, dtype=weight.dtype)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        fused.bias = nn.Parameter(bias, requires_grad=False)
    start = 0
    for lin in linears:
        n = lin.out_features
        lin.weight = nn.Parameter(weight[start:start + n], requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias[start:start + n], requires_grad=False)
        start += n
    return fused


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as Hugging Face applies it; x (N, H, D), cos/sin (N, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class DecoderStack:
    """Token-major forward of a causal LM's loaded modules.

    ``n_heads``, ``n_kv`` (key/value heads; fewer for grouped-query attention),
    ``head_dim``, ``n_layers`` describe the KV cache it needs.
    """

    def __init__(self, model: nn.Module, fast: bool = True) -> None:
        cfg = model.config
        self.gpt2 = cfg.model_type in GPT2_LIKE
        self.n_heads = cfg.num_attention_heads
        self.lm_head = model.get_output_embeddings()
        if self.gpt2:
            base = model.transformer
            self.layers = list(base.h)
            self.n_kv = self.n_heads
            self.head_dim = cfg.hidden_size // self.n_heads
            self.final_norm = base.ln_f
            self.wte, self.wpe = base.wte, base.wpe
            self.qkv = [layer.attn.c_attn for layer in self.layers]
            self.out = [layer.attn.c_proj for layer in self.layers]
            self.norm1 = [layer.ln_1 for layer in self.layers]
            self.norm2 = [layer.ln_2 for layer in self.layers]
            self.mlp = [layer.mlp for layer in self.layers]
            self.scaling = [layer.attn.scaling for layer in self.layers]
            self.q_norm = self.k_norm = None
        else:
            base = model.model
            self.layers = list(base.layers)
            attn0 = self.layers[0].self_attn
            self.n_kv = cfg.num_key_value_heads
            self.head_dim = attn0.head_dim
            self.final_norm = base.norm
            self.wte, self.rotary = base.embed_tokens, base.rotary_emb
            self.qkv = [_fuse([la.self_attn.q_proj, la.self_attn.k_proj, la.self_attn.v_proj])
                        for la in self.layers]
            self.out = [layer.self_attn.o_proj for layer in self.layers]
            self.norm1 = [layer.input_layernorm for layer in self.layers]
            self.norm2 = [layer.post_attention_layernorm for layer in self.layers]
            self.mlp = [layer.mlp for layer in self.layers]
            self.scaling = [layer.self_attn.scaling for layer in self.layers]
            qk = hasattr(attn0, "q_norm")
            self.q_norm = [la.self_attn.q_norm for la in self.layers] if qk else None
            self.k_norm = [la.self_attn.k_norm for la in self.layers] if qk else None
        self.n_layers = len(self.layers)
        self.splits = (self.n_heads * self.head_dim, self.n_kv * self.head_dim,
                       self.n_kv * self.head_dim)
        param = next(model.parameters())
        ok, why = onednn_ok(param.device.type, param.dtype) if fast else (False, "off")
        self.linear_path = f"oneDNN linears: {why}" if ok else f"torch linears ({why})"
        if ok:
            self._use_onednn(cfg)

    def _use_onednn(self, cfg) -> None:
        """Swap the projections, MLPs and LM head for oneDNN linears with weights reordered
        once (see ``kernels/onednn.py``): a decode step is a GEMM of a few rows, where
        reordering the weight on every call cost as much as the GEMM itself. Modules it
        cannot copy (an int8 swap) stay as they are."""
        self.qkv = [fast_linear(m) for m in self.qkv]
        self.out = [fast_linear(m) for m in self.out]
        self.lm_head = fast_linear(self.lm_head)
        if self.gpt2:
            self.mlp = [_Mlp(m, cfg.activation_function) for m in self.mlp]
        else:
            self.mlp = [_GatedMlp(m) for m in self.mlp]

    def hidden(self, ids: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        """Final hidden states (before the last norm), (N, d), for token ids (N,) int64 at
        ``positions`` (N,) int64; ``attend`` writes the cache and attends for each layer."""
        n = ids.shape[0]
        if self.gpt2:
            x = self.wte(ids) + self.wpe(positions)
            cos = sin = None
        else:
            x = self.wte(ids)
            cos, sin = self.rotary(x, positions[None])
            cos, sin = cos[0], sin[0]
        for i in range(self.n_layers):
            q, k, v = self.qkv[i](self.norm1[i](x)).split(self.splits, dim=-1)
            q = q.reshape(n, self.n_heads, self.head_dim)
            k = k.reshape(n, self.n_kv, self.head_dim)
            v = v.reshape(n, self.n_kv, self.head_dim)
            if self.q_norm is not None:
                q, k = self.q_norm[i](q), self.k_norm[i](k)
            if cos is not None:
                q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            x = x + self.out[i](attend(i, q, k, v))
            x = x + self.mlp[i](self.norm2[i](x))
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, vocab) float32 logits from ``hidden`` (N, d)."""
        return self.lm_head(self.final_norm(hidden)).float()


class _Mlp:
    """GPT-2's MLP on oneDNN linears: up (activation fused when oneDNN has it), down."""

    def __init__(self, mlp: nn.Module, act: str) -> None:
        self.up = with_activation(mlp.c_fc, act, mlp.act)
        self.down = fast_linear(mlp.c_proj)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.up(x))


class _GatedMlp:
    """The Llama MLP, ``down(act(gate(x)) * up(x))``, with gate and up in one oneDNN GEMM."""

    def __init__(self, mlp: nn.Module) -> None:
        self.mlp, self.act = mlp, mlp.act_fn
        self.width = mlp.gate_proj.out_features
        both = (mlp.gate_proj, mlp.up_proj)
        plain = all(type(m) is nn.Linear and m.bias is None for m in both)
        self.gate_up = OneDnnLinear(torch.cat([m.weight for m in both]), None) if plain \
            else None
        self.down = fast_linear(mlp.down_proj)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is None:
            return self.mlp(x)
        gate, up = self.gate_up(x).split(self.width, dim=-1)
        return self.down(self.act(gate) * up)


def resolve_causal_dtype(dtype: str, device: str, checkpoint: object) -> torch.dtype:
    """``auto`` loads what ``from_pretrained`` loads by default, the checkpoint's own dtype
    (``checkpoint``: config.json's ``dtype``; float32 when it names none), so greedy output
    is token for token what ``model.generate`` gives. Except: on CUDA a float32 checkpoint
    runs in bf16 (fp16 without bf16), and on CPU an fp16 one in float32 (CPUs emulate fp16
    at a crawl)."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if isinstance(checkpoint, str):
        checkpoint = getattr(torch, checkpoint, None)
    if not isinstance(checkpoint, torch.dtype) or not checkpoint.is_floating_point:
        checkpoint = torch.float32
    if device == "cuda":
        if checkpoint in (torch.float16, torch.bfloat16):
            return checkpoint
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32 if checkpoint == torch.float16 else checkpoint


class Decoder:
    """A causal LM and its tokenizer, loaded once per worker for ``generate`` and ``score``.

    The attributes the runner reads from any engine: ``dtype``, ``device``,
    ``quantization``, ``attn_implementation``, ``forward_reason``, ``quality``,
    ``describe()``, ``token_budget()``.
    """

    def __init__(self, config: EngineConfig) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.config = config
        self.device = resolve_device(config.device)
        if self.device == "cpu":
            set_cpu_threads(config)
        avoid_cudnn_sdpa(self.device)  # decode spans and score batches change shape each step
        self.tokenizer = AutoTokenizer.from_pretrained(
            config.model_dir, trust_remote_code=config.trust_remote_code)
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(config.model_dir,
                                               trust_remote_code=config.trust_remote_code)
        self.dtype = resolve_causal_dtype(config.dtype, self.device,
                                          getattr(hf_config, "dtype", None))
        self.model = AutoModelForCausalLM.from_pretrained(
            config.model_dir, dtype=self.dtype, attn_implementation="sdpa",
            trust_remote_code=config.trust_remote_code,
            use_safetensors=None if config.allow_pickle else True,
        ).to(self.device).eval()
        self.quantization = "none"
        self.quality = None
        ok, why = stack_support(self.model.config, config.max_length)
        self.stack = DecoderStack(self.model) if ok else None
        self.attn_implementation = "kv-cache/sdpa" if ok else "hf/sdpa"
        self.forward_reason = f"{why}; {self.stack.linear_path}" if ok else why
        self.generation_config = self.model.generation_config
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id or 0
        log.info("decoder: %s (%s)", self.attn_implementation, why)

    @property
    def context(self) -> int:
        """Most tokens (prompt + generated) one sequence may hold."""
        return self.config.max_length

    @property
    def vocab_size(self) -> int:
        """Width of the logits (the output embedding's rows, at least the tokenizer's)."""
        return int(self.model.get_output_embeddings().weight.shape[0])

    def describe(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return f"{dtype} on {self.device}, {self.attn_implementation}"

    def token_budget(self, requested: int | None) -> int:
        """``engine.max_tokens_per_batch``, or the default for this device."""
        return requested or (16_384 if self.device == "cuda" else 4096)

    def eos_ids(self) -> list[int]:
        """End-of-sequence ids as ``model.generate`` takes them: the generation config's,
        else the tokenizer's."""
        eos = self.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            return []
        return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]

    @torch.inference_mode()
    def score(self, tok: Tokenized, first: np.ndarray, max_tokens: int, max_rows: int,
              stats=None) -> tuple[np.ndarray, np.ndarray]:
        """Log-probability of each row's tokens from position ``first[i]`` on.

        tok: n rows; first: (n,) int64, at least 1 (token 0 has no prediction). Returns
        ``(logprob (n,) float64 sums, scored (n,) int64 token counts)``. Hugging Face
        forward on right-padded token-budget batches; the vocabulary projection runs only
        for scored positions, in chunks, in float32.
        """
        n = len(tok)
        logprob = np.zeros(n, dtype=np.float64)
        scored = np.maximum(tok.lengths - first, 0)
        base, head = self.model.base_model, self.model.get_output_embeddings()
        for rows in plan_batches(tok.lengths, max_tokens, max_rows):
            batch = collate(tok, rows, self.pad_id, False, self.device)
            if stats is not None:
                stats.started()
            hidden = base(input_ids=batch.ids, attention_mask=batch.mask).last_hidden_state
            starts = torch.as_tensor(first[rows], device=self.device)
            lengths = torch.as_tensor(tok.lengths[rows], device=self.device)
            pos = torch.arange(batch.max_len, device=self.device)[None]
            use = (pos >= starts[:, None]) & (pos < lengths[:, None])  # target positions
            row_idx, tgt = use.nonzero(as_tuple=True)
            targets = batch.ids[row_idx, tgt]
            h = hidden[row_idx, tgt - 1]
            lp = torch.empty(len(targets), dtype=torch.float32, device=self.device)
            for c in range(0, len(targets), 2048):
                logits = head(h[c:c + 2048]).float()
                lp[c:c + 2048] = logits.log_softmax(-1).gather(
                    1, targets[c:c + 2048, None])[:, 0]
            sums = torch.zeros(len(rows), dtype=torch.float64, device=self.device)
            sums.index_add_(0, row_idx, lp.double())
            logprob[rows] = sums.cpu().numpy()
            if stats is not None:
                stats.batches += 1
                stats.tokens += int(tok.lengths[rows].sum())
                stats.padded_tokens += len(rows) * batch.max_len
                stats.sizes.append(len(rows))
        return logprob, scored
