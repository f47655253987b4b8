"""``lepton-batch bench --task generate``: lepton-batch's continuous batching against
``model.generate`` on padded batches of the same size, same prompts, same per-row lengths.

Real generations end at an end-of-sequence token after very different numbers of tokens.
A random model has no such habit, so each row gets a planned length (drawn once, seeded)
and both methods run with end-of-sequence off: ``model.generate`` runs each padded batch
until its longest row is done (the rows that finished earlier wait, as they would behind
a real EOS), lepton-batch stops each row at its own length and refills its slot. Only the
planned tokens count as useful in either rate.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from lepton_batch.bench.common import dtype_name, pick_device, sync
from lepton_batch.bench.corpus import load_rows

log = logging.getLogger(__name__)

LENGTHS = ("exp", "uniform", "fixed")


def train_bpe_tokenizer(path: Path, texts: list[str], bos: bool, vocab: int = 800,
                        context: int = 256, chat_template: str | None = None) -> None:
    """A byte-level BPE tokenizer trained on ``texts`` and saved to ``path`` (``<s>``
    prepended to every text when ``bos``); ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>", model_max_length=context,
                            chat_template=chat_template).save_pretrained(path)


def random_llama(path: Path, texts: list[str], layers: int = 6, hidden: int = 512,
                 context: int = 1024, seed: int = 0) -> Path:
    """A randomly initialised Llama (``layers`` x ``hidden``, 4x MLP) with a BPE tokenizer
    trained on ``texts``, saved with ``save_pretrained``."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    train_bpe_tokenizer(path, texts, bos=True, vocab=8000, context=context)
    heads = max(1, hidden // 64)
    config = LlamaConfig(vocab_size=8000, hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, max_position_embeddings=context,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).eval().save_pretrained(path)
    return path


def planned_lengths(n: int, max_new: int, kind: str, seed: int = 0) -> np.ndarray:
    """(n,) int64 new tokens per row. ``exp``: exponential with mean ``max_new / 4``
    (most generations short, a few long, as EOS spreads them), clipped to
    ``1 .. max_new``; ``uniform``: ``max_new/16 .. max_new``; ``fixed``: ``max_new``."""
    rng = np.random.default_rng(seed)
    if kind == "exp":
        return np.clip(rng.exponential(max_new / 4, n).astype(np.int64) + 1, 1, max_new)
    if kind == "uniform":
        return rng.integers(max(1, max_new // 16), max_new + 1, n).astype(np.int64)
    return np.full(n, max_new, dtype=np.int64)


def spread_prompts(ids: list[list[int]], low: int, high: int, bos: int | None,
                   seed: int = 1) -> list[list[int]]:
    """As many prompts as ``ids``, of lengths drawn uniformly in ``low .. high`` (seeded),
    cut from the corpus's tokens laid end to end (each row's own BOS dropped; ``bos``, when
    given, starts every prompt), so prompt lengths spread over the range whatever the
    corpus's own row lengths."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(low, high + 1, len(ids))
    head = [bos] if bos is not None else []
    stream = [t for row in ids for t in (row[1:] if head and row[:1] == head else row)]
    out, at = [], 0
    for n in lengths:
        take = int(n) - len(head)
        while at + take > len(stream):  # wrap around a short corpus
            stream = stream + stream
        out.append(head + stream[at: at + take])
        at += take
    return out


@dataclass
class GenConfig:
    model: str | None = None  # None: a random Llama, layers x hidden
    corpus: str = "data/samples/"
    rows: int = 256
    batch: int = 16
    max_new: int = 256
    max_prompt: int = 256
    min_prompt: int | None = None  # set: prompt lengths uniform in min_prompt .. max_prompt
    lengths: str = "exp"
    repeats: int = 3
    device: str = "auto"
    dtype: str = "auto"
    layers: int = 6
    hidden: int = 512
    graphs: bool = True  # CUDA graphs for decode steps; on CUDA also timed without them

    def check(self) -> None:
        if self.lengths not in LENGTHS:
            raise ValueError(f"--lengths: one of {', '.join(LENGTHS)}, got {self.lengths!r}")
        for name in ("rows", "batch", "max_new", "max_prompt", "repeats", "layers", "hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.min_prompt is not None and not 2 <= self.min_prompt <= self.max_prompt:
            raise ValueError(f"--min-prompt: 2 .. --max-length ({self.max_prompt}), got "
                             f"{self.min_prompt}")


@dataclass
class GenMethod:
    name: str
    seconds: list[float] = field(default_factory=list)
    useful_tokens: int = 0
    computed_tokens: int = 0  # decode positions computed, useful or not
    peak_cuda_mib: float | None = None
    note: str = ""

    @property
    def rate(self) -> float:
        return self.useful_tokens / statistics.median(self.seconds)

    @property
    def rates(self) -> list[float]:
        return [self.useful_tokens / s for s in self.seconds]


@dataclass
class GenResult:
    config: GenConfig
    device: str
    dtype: str
    model: str
    prompts: int
    prompt_tokens: int
    planned_tokens: int
    methods: list[GenMethod]
    identical_rows: float  # share of rows whose greedy tokens agree between the methods
    command: str = ""

    def to_json(self) -> dict:
        return asdict(self)


def bench_decoder(cfg: GenConfig, texts: list[str], tmp: Path, device: str, context: int,
                  say: Callable[[str], None]):
    """The benchmark's Decoder (``--model``, else a random Llama built in ``tmp``) and its
    name; raises ValueError when our stack cannot generate with it."""
    from lepton_batch.engine import EngineConfig
    from lepton_batch.engine.decoder import Decoder
    from lepton_batch.job.modeldir import resolve_model_dir

    if cfg.model is None:
        say(f"building a random Llama ({cfg.layers} layers x {cfg.hidden})")
        model_dir = random_llama(tmp / "llama", texts[:2000], cfg.layers, cfg.hidden,
                                 context=context)
        model_name = f"random Llama {cfg.layers}x{cfg.hidden}"
    else:
        model_dir = resolve_model_dir(cfg.model)
        model_name = str(model_dir)
    say("loading the model")
    dec = Decoder(EngineConfig(str(model_dir), "causal_lm", dtype=cfg.dtype, device=device,
                               max_length=context))
    if dec.stack is None:
        raise ValueError(f"--model: {dec.forward_reason}")
    return dec, model_name


def run_generate_bench(cfg: GenConfig, say: Callable[[str], None] = log.info) -> GenResult:
    """Both methods, ``cfg.repeats`` rounds each, on the same prompts and planned lengths."""
    from lepton_batch.engine import Tokenized
    from lepton_batch.engine.continuous import GenerateStats, Sampling, generate

    cfg.check()
    device = pick_device(cfg.device)
    texts, _ = load_rows(cfg.corpus, cfg.rows)
    with tempfile.TemporaryDirectory(prefix="lepton-bench-gen-") as tmp:
        dec, model_name = bench_decoder(cfg, texts, Path(tmp), device,
                                        cfg.max_prompt + cfg.max_new, say)
        dec.generation_config.eos_token_id = []  # lengths are planned; see the module doc
        ids = dec.tokenizer(texts, verbose=False)["input_ids"]
        if cfg.min_prompt is None:
            ids = [row[: cfg.max_prompt] for row in ids]
        else:
            ids = spread_prompts(ids, cfg.min_prompt, cfg.max_prompt,
                                 dec.tokenizer.bos_token_id)
        max_new = planned_lengths(len(ids), cfg.max_new, cfg.lengths)
        tok = Tokenized.from_lists(ids, np.zeros(len(ids), dtype=bool))
        graphs = cfg.graphs and device == "cuda"
        hf = GenMethod("hf-generate", note=f"padded batches of {cfg.batch}, left padding"
                       + (", cuDNN SDPA off as for lepton-batch" if device == "cuda" else ""))
        ours = GenMethod("lepton-batch", note="CUDA graphs" if graphs else "")
        methods = [hf, ours]
        if graphs:  # whether the graphs pay, measured beside them
            methods.append(GenMethod("lepton-batch-eager", note="no CUDA graphs"))
        ours_tokens: list[list[int]] = []
        hf_tokens: list[list[int]] = [[] for _ in ids]
        for rnd in range(cfg.repeats):
            for method in (methods[1:] + methods[:1] if rnd % 2 == 0 else methods):
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                sync(device)
                start = time.perf_counter()
                if method is hf:
                    hf.computed_tokens = _hf_generate(dec, ids, max_new, cfg.batch, hf_tokens)
                else:
                    stats = GenerateStats()
                    out = generate(dec, tok, max_new, np.zeros(len(ids), dtype=np.int64),
                                   Sampling(), [], cfg.batch, None, dec.token_budget(None),
                                   stats, graphs=graphs and method is ours)
                    method.computed_tokens = stats.slot_steps + len(ids)
                    if method is ours:
                        ours_tokens = out.tokens
                sync(device)
                method.seconds.append(time.perf_counter() - start)
                if device == "cuda":
                    method.peak_cuda_mib = torch.cuda.max_memory_allocated() / 2**20
                say(f"round {rnd + 1}: {method.name} {method.seconds[-1]:.2f} s")
        for method in methods:
            method.useful_tokens = int(max_new.sum())
        same = sum(a == b for a, b in zip(ours_tokens, hf_tokens, strict=True)) / len(ids)
        return GenResult(config=cfg, device=device, dtype=dtype_name(dec.dtype),
                         model=model_name, prompts=len(ids),
                         prompt_tokens=int(tok.lengths.sum()),
                         planned_tokens=int(max_new.sum()), methods=methods,
                         identical_rows=same)


@torch.inference_mode()
def _hf_generate(dec, ids: list[list[int]], max_new: np.ndarray, batch: int,
                 keep: list[list[int]]) -> int:
    """``model.generate`` (greedy) over left-padded batches of ``batch`` rows in input
    order, each run to its longest row's length; each row's first ``max_new[i]`` tokens
    are kept in ``keep[i]``. Returns the decode positions computed."""
    model, pad = dec.model, dec.pad_id
    computed = 0
    for start in range(0, len(ids), batch):
        rows = range(start, min(start + batch, len(ids)))
        width = max(len(ids[r]) for r in rows)
        inp = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            inp[j, width - len(ids[r]):] = torch.tensor(ids[r])
            mask[j, width - len(ids[r]):] = 1
        steps = int(max_new[list(rows)].max())
        out = model.generate(inp.to(dec.device), attention_mask=mask.to(dec.device),
                             do_sample=False, max_new_tokens=steps, min_new_tokens=steps,
                             pad_token_id=pad, eos_token_id=None)
        for j, r in enumerate(rows):
            keep[r] = out[j, width: width + int(max_new[r])].tolist()
        computed += len(rows) * steps
    return computed
