"""The encoder engine: tokenize, batch by token budget, forward (packed or padded), pool.

Rows are sorted by true token count (longest first, so an out-of-memory shows up on the
first batch) and cut into batches by a token budget; results are scattered back so callers
always get input order. The next batch is collated (and, on CUDA, copied to the device)
on a helper thread while the current one computes, and results stay on the device until
the whole call is done: no host sync per batch.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lepton_batch.engine.batching import Batch, BatchStats, Tokenized, collate, plan_batches
from lepton_batch.engine.calibration import GateSample
from lepton_batch.engine.load import (
    EngineConfig,
    load_model,
    resolve_device,
    resolve_dtype,
    set_cpu_threads,
)
from lepton_batch.engine.packed import PackedEncoder, dense_rows, packable
from lepton_batch.engine.pooling import pool
from lepton_batch.engine.quality import QualityCheck, QualityError, judge
from lepton_batch.engine.tokens import Pretokenized, truncating
from lepton_batch.kernels import avoid_cudnn_sdpa, pick_attention, pick_varlen

log = logging.getLogger(__name__)

Step = Callable[[Batch], torch.Tensor]


_OOM_MESSAGES = ("out of memory", "DefaultCPUAllocator: can't allocate memory")


def is_oom(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or a RuntimeError from an allocator that ran out (CPU)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _OOM_MESSAGES)


class Encoder:
    """A tokenizer and a model loaded from a local directory, ready for batched inference.

    ``sample``: some of the job's own texts (prompt applied), or a :class:`GateSample`
    that adds rows of lepton-batch's calibration sample to them. With a precision other
    than fp32 (bf16, fp16, int8) they calibrate int8 and feed the quality gate, which
    compares the model with its fp32 self before any row is written (``self.quality``).
    """

    def __init__(self, config: EngineConfig,
                 sample: list[str] | GateSample | None = None) -> None:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no "Loading weights" bars in worker logs
        if not isinstance(sample, GateSample):
            sample = GateSample(list(sample or []))

        self.config = config
        self.device = resolve_device(config.device)
        if self.device == "cpu":
            set_cpu_threads(config)
        avoid_cudnn_sdpa(self.device)  # padded batches (quality gate, HF path) vary in shape
        self.tokenizer = AutoTokenizer.from_pretrained(
            config.model_dir, trust_remote_code=config.trust_remote_code
        )
        if not self.tokenizer.is_fast:
            log.warning("%s has no fast tokenizer; tokenization will be slow", config.model_dir)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._truncating = truncating_backend(self.tokenizer, config.max_length)
        self._tokenizer_json: str | None = None  # its serialisation, made on first adopt()
        self._prefetch = ThreadPoolExecutor(1, thread_name_prefix="lepton-collate")
        self.quantization = "none"
        self.note = ""  # what the engine did other than the job asked, for describe()
        self.setup(resolve_dtype(config.dtype, self.device))
        if config.quantization == "int8" and self.device == "cuda":
            # device auto landed on a GPU; the job file names the field when it says cuda
            self.note = "int8 is for CPUs (slower than bf16 on CUDA): ran without it"
            log.warning("model.quantization int8: %s", self.note)
        elif config.quantization == "int8":
            from lepton_batch.kernels.int8 import quantize_linears

            calib = self.tokenize(sample.texts)

            def calibrate() -> None:
                # Through the Hugging Face forward: the packed one fuses q/k/v into one
                # GEMM, and the calibration hooks need each Linear called on its own.
                packed, self.packed = self.packed, None
                if len(calib):
                    self.embed(calib, "mean", False, 4096, 64)
                self.packed = packed

            report = quantize_linears(self.model, calibrate, skip=lambda name, _: (
                "classifier" in name or "pooler" in name))
            log.info("%s", report.summary())
            self.quantization = "int8"
            self.setup(self.dtype, self.model)  # rebuild the packed view over the swapped layers
        self.quality: QualityCheck | None = None
        if (self.dtype != torch.float32 or self.quantization != "none") and sample.texts:
            self.quality = self._gate(sample)

    def _gate(self, sample: GateSample) -> QualityCheck:
        """Run the quality gate (``quality.py``) on ``sample`` and act on its verdict: keep
        this precision, fall back to the fp32 reference it was judged against, or (with
        ``quality.on_fail: error``) refuse to run. Returns what goes into the metadata."""
        start = time.perf_counter()
        reference = load_model(self.config, torch.float32, self.device, "sdpa")
        verdict = judge(self, reference, sample.texts, sample.calibration_rows)
        used = verdict.candidate
        if not verdict.passed:
            if self.config.on_fail == "error":
                raise QualityError(verdict.reason)
            self.quantization = "none"
            self.setup(torch.float32, reference)
            used = "float32"
        check = verdict.record(used, round(time.perf_counter() - start, 3))
        (log.info if check.passed else log.warning)("%s", check.summary())
        return check

    def setup(self, dtype: torch.dtype, model: torch.nn.Module | None = None) -> None:
        """Load the model in ``dtype`` (or adopt ``model``) and choose how it runs."""
        self.dtype = dtype
        dtype_name = str(dtype).removeprefix("torch.")
        attn, reason = pick_attention(self.device, dtype_name)
        if model is None:
            self.model = load_model(self.config, dtype, self.device, attn)
        else:
            self.model = model
        self.hidden_size = int(self.model.config.hidden_size)
        self.packed: PackedEncoder | None = None
        ok, why = packable(self.model, self.config.head) if self.config.packed else (
            False, "engine.packed is off: Hugging Face forward")
        if ok:
            backend, reason = pick_varlen(self.device, dtype_name)
            self.packed = PackedEncoder(self.model, backend, compile=self.config.compile)
            self.attn_implementation = f"packed/{backend}"
            why = f"{why}; {reason}; {self.packed.layer_path}"
        else:
            self.attn_implementation = attn
            why = f"{why}; {reason}"
        self.forward_reason = why
        log.info("forward: %s (%s)", self.attn_implementation, why)

    def describe(self) -> str:
        """One line: dtype, quantization, forward, and the quality gate's verdict."""
        dtype = str(self.dtype).removeprefix("torch.")
        quant = f"+{self.quantization}" if self.quantization != "none" else ""
        line = f"{dtype}{quant} on {self.device}, {self.attn_implementation}"
        if self.note:
            line += f"; {self.note}"
        if self.quality is not None:
            q = self.quality
            line += (f"; quality gate: {q.candidate} {q.metric.replace('_', ' ')} "
                     f"{q.value:.4f} vs float32 on {q.rows_used()}, "
                     + ("passed" if q.passed else f"below {q.threshold}, fell back to float32"))
        return line

    def token_budget(self, requested: int | None) -> int:
        """``engine.max_tokens_per_batch``, or the default for this device."""
        return requested or (16_384 if self.device == "cuda" else 4096)

    def tokenize_chunk_rows(self, requested: int | None) -> int | None:
        """``engine.tokenize_chunk_rows``, or the default for this device: 8192 on CUDA (the
        GPU computes while the CPU tokenizes the next chunk), None on CPU (the whole shard
        at once: chunked, both share the same cores, measured no faster)."""
        return requested or (8192 if self.device == "cuda" else None)

    def tokenize(self, texts: list[str]) -> Tokenized:
        """Fast batched tokenization; rows over ``max_length`` are truncated and flagged."""
        max_len = self.config.max_length
        if not texts:
            return Tokenized.from_lists([], np.zeros(0, dtype=bool))
        if self._truncating is not None:
            return Tokenized.from_encodings(self._truncating.encode_batch_fast(texts))
        ids = self.tokenizer(texts, truncation=False, verbose=False)["input_ids"]
        truncated = np.fromiter((len(x) > max_len for x in ids), dtype=bool, count=len(ids))
        long_rows = np.flatnonzero(truncated)
        if len(long_rows):
            # Re-tokenize only the long rows, letting the tokenizer keep its special tokens.
            cut = self.tokenizer(
                [texts[i] for i in long_rows], truncation=True, max_length=max_len
            )["input_ids"]
            for i, row in zip(long_rows, cut, strict=True):
                ids[i] = row
        return Tokenized.from_lists(ids, truncated)

    def adopt(self, pre: Pretokenized | None) -> Tokenized | None:
        """``pre``'s ids when the tokenizer that made them serialises exactly as this
        engine's own (vocabulary, normaliser, special tokens, truncation side and length):
        then they are the ids :meth:`tokenize` would give. Else None, and the rows are
        tokenized again."""
        if pre is None or self._truncating is None:
            return None
        if self._tokenizer_json is None:
            self._tokenizer_json = self._truncating.to_str()
        if pre.tokenizer == self._tokenizer_json:
            return pre.tokens
        log.info("the model's tokenizer, as transformers loads it, differs from its "
                 "tokenizer.json alone; tokenizing the %d early-tokenized rows again", len(pre))
        return None

    def _collate(self, tok: Tokenized, idx: np.ndarray) -> Batch:
        return collate(tok, idx, self.pad_id, self.packed is not None, self.device)

    @torch.inference_mode()
    def run(self, tok: Tokenized, step: Step, width: int, max_tokens: int, max_rows: int,
            stats: BatchStats | None = None) -> torch.Tensor:
        """Apply ``step`` to every row in token-budget batches; return (n, width) float32.

        step(batch) -> (b, width) tensor, row j for ``batch.rows[j]``. Output row i belongs
        to input row i, whatever order the batches ran in.

        Out of memory: the batch is halved and retried, down to one row; the first size
        that then works caps the rows per batch for the rest of this call (the remaining
        batches are re-cut, still longest first). A row that cannot run even alone gets
        NaN and is listed in ``stats.failed_rows``; without ``stats`` to report it in,
        its error is raised instead, since a caller could not tell the row was lost.
        """
        report_failures = stats is not None
        stats = stats if stats is not None else BatchStats()
        packed = self.packed is not None
        out = torch.empty((len(tok), width), dtype=torch.float32, device=self.device)
        pending = deque(plan_batches(tok.lengths, max_tokens, max_rows, packed))
        ahead: tuple[np.ndarray, Future[Batch]] | None = None
        cap, split = max_rows, False  # split: a batch was halved and nothing ran since
        while pending:
            idx = pending.popleft()
            if ahead is not None and ahead[0] is idx:
                batch = ahead[1].result()
            else:
                batch = self._collate(tok, idx)
            ahead = None
            if pending:  # collate the next batch while this one computes
                ahead = (pending[0], self._prefetch.submit(self._collate, tok, pending[0]))
            stats.started()
            try:
                result = step(batch)
            except RuntimeError as exc:
                if not is_oom(exc) or (len(idx) == 1 and not report_failures):
                    raise
                result = None
            del batch
            if result is None:
                # Outside the except block, so the failed batch's tensors are already freed.
                if self.device == "cuda":
                    torch.cuda.empty_cache()
                if len(idx) == 1:
                    row = int(idx[0])
                    reason = (f"out of memory: a row of {int(tok.lengths[row])} tokens could "
                              "not run even alone; lower model.max_length or "
                              "engine.max_tokens_per_batch")
                    log.warning("row %d: %s", row, reason)
                    out[row] = float("nan")
                    stats.failed_rows.append(row)
                    stats.failed_reasons.append(reason)
                    continue
                half = (len(idx) + 1) // 2  # the larger half first: its size caps the rest
                stats.oom_splits += 1
                split = True
                pending.extendleft([idx[half:], idx[:half]])
                continue
            if split and len(idx) < cap:
                cap = stats.max_rows_cap = len(idx)
                log.warning("out of memory: batches of %d rows work; keeping that size for "
                            "the rest of this shard (engine.max_rows_per_batch starts "
                            "there)", cap)
                if pending:
                    rest = np.concatenate(list(pending))  # still longest first
                    pending = deque(rest[b] for b in
                                    plan_batches(tok.lengths[rest], max_tokens, cap, packed))
            split = False
            out[torch.from_numpy(idx).to(self.device, non_blocking=True)] = result.float()
            lengths = tok.lengths[idx]
            stats.batches += 1
            stats.sizes.append(len(idx))
            stats.tokens += int(lengths.sum())
            stats.padded_tokens += dense_rows(int(lengths.sum()), self.device) if packed \
                else len(idx) * int(lengths.max())
        return out.cpu()  # the one host sync of the call

    def hidden_states(self, batch: Batch) -> torch.Tensor:
        """Last hidden states as (b, L, hidden), right-padded to ``batch.mask``."""
        if self.packed is None:
            return self.model(input_ids=batch.ids, attention_mask=batch.mask).last_hidden_state
        flat = self.packed.hidden(batch)
        padded = flat.new_zeros(len(batch.rows), batch.max_len, flat.shape[-1])
        padded[batch.row_of, batch.positions] = flat
        return padded

    def embed(self, tok: Tokenized, pooling: str, normalize: bool, max_tokens: int,
              max_rows: int, stats: BatchStats | None = None, skip: int = 0) -> torch.Tensor:
        """Pooled sentence embeddings, (n, hidden_size) float32, in input order.

        skip: leading tokens of every row left out of pooling (a prompt's, see ``pool``).
        """

        def step(batch: Batch) -> torch.Tensor:
            pooled = pool(self.hidden_states(batch).float(), batch.mask, pooling, skip)
            return F.normalize(pooled, dim=-1) if normalize else pooled

        return self.run(tok, step, self.hidden_size, max_tokens, max_rows, stats)

    def logits(self, tok: Tokenized, max_tokens: int, max_rows: int,
               stats: BatchStats | None = None) -> torch.Tensor:
        """Sequence-classification logits, (n, num_labels) float32, in input order."""

        def step(batch: Batch) -> torch.Tensor:
            if self.packed is not None:
                return self.packed.logits(batch)
            return self.model(input_ids=batch.ids, attention_mask=batch.mask).logits

        return self.run(tok, step, int(self.model.config.num_labels), max_tokens, max_rows,
                        stats)


def truncating_backend(tokenizer: Any, max_length: int) -> Any | None:
    """A copy of a fast tokenizer's Rust backend that truncates at ``max_length`` (special
    tokens kept) in the same pass: the ids the Hugging Face call with ``truncation=True``
    gives, in under half its time on a 20,000-row shard (no Python-side encoding objects,
    no second pass over the long rows). None for a slow tokenizer."""
    backend = getattr(tokenizer, "_tokenizer", None) if tokenizer.is_fast else None
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        return None
    from tokenizers import Tokenizer

    # A copy, the engine's alone: never reconfigured by a caller of the HF tokenizer.
    return truncating(Tokenizer.from_str(backend.to_str()), max_length,
                      getattr(tokenizer, "truncation_side", "right"))
