"""Int8 ``nn.Linear`` swap: dynamic per-token activations x per-channel weights, int32 GEMM.

Scheme (W8A8, symmetric, no zero points):

* weights ``W (N, K)`` are quantized once, per output channel:
  ``s_w[n] = max_k |W[n, k]| / 127``, ``W_q = round(W / s_w[:, None])`` in int8;
* activations ``x (M, K)`` (tokens flattened) are quantized on every call, per token:
  ``s_x[m] = max_k |x[m, k]| / 127``, ``x_q = round(x / s_x[:, None])`` in int8;
* ``y = (x_q @ W_q.T) * s_x[:, None] * s_w[None, :] + b``, the product summed exactly in
  int32 by ``torch._int_mm``.

Why per token: transformer activation outliers sit in a few *channels* that are large for
every token, and their magnitude varies a lot from token to token (``[CLS]``, punctuation);
one scale per token adapts to each token's range. A per-tensor scale would spend the int8
range on the worst token of the batch. Why per channel for weights: output rows differ in
norm, and a per-row scale folds into the output rescale for free. The channel outliers are
what a per-token scale cannot absorb (a token's small channels lose resolution next to its
large ones), so some layers (in MiniLM: the attention value projections and some FFN
layers) can be too lossy: ``quantize_linears`` measures each layer on the job's own rows
and keeps those over ``max_error`` in their original precision. Calibration keeps no
activations: a hook compares each layer's int8 and float outputs as the rows go through.

The fast path is the custom op ``lepton_batch::int8_linear`` (with a fake function, so
``torch.compile`` traces it); ``int8_linear_reference`` is the same math dequantized to float
and the tests hold them equal to fp32 rounding. ``torch._int_mm`` shape rules: on CPU (torch
2.13, checked by experiment) any shape works, M = 0 included; on CUDA it needs M > 16 and K, N
multiples of 8. On CUDA M <= 16 is padded with zero rows (at most 16 rows: cheaper than a
float matmul on dequantized weights); K or N not a multiple of 8 takes the reference path.

Measured on this dev box (2-core Xeon with AMX, torch 2.13.0+cpu, 2 threads; medians of 40
interleaved calls, +-20% run to run because other jobs share the cores), ms per call for
M = 4096 tokens of a MiniLM FFN layer; "compiled" is the same math through ``torch.compile``
(inductor fuses the quantize and rescale passes; the custom op itself stays opaque to it):

=======================  ====  ====  ============  ============  =============
layer                    fp32  bf16  int8, x fp32  int8, x bf16  int8 compiled
=======================  ====  ====  ============  ============  =============
K=384  -> N=1536 (up)    19.6  7.1   19.1          18.0          11.2
K=1536 -> N=384  (down)  19.9  7.2   18.0          24.9          8.3
=======================  ====  ====  ============  ============  =============

Inside the int8 call (up / down): ``_int_mm`` 7.8 / 5.3 ms (~620 / ~900 GFLOP/s against
~250 fp32 and ~680 bf16), quantize 2.2 / 8.1 ms, rescale 4.4 / 1.2 ms. On this CPU
``torch._int_mm`` runs oneDNN's ``gemm_api`` s8s8s32 GEMM (AVX512-VNNI), not the AMX brgemm
kernel bf16 matmul gets (``ONEDNN_VERBOSE=1``), and the eager quantize / rescale passes are
memory-bound, so int8 here ties fp32 and loses to bf16: on CPU, run bf16. Int8 still cuts
weight memory to 1/4 of fp32, and it is the path that pays on CUDA, where ``_int_mm`` runs on
int8 tensor cores (about 2x the bf16 rate) and the elementwise passes are cheap.

Real model (all-MiniLM-L6-v2, the first 200 non-empty sample texts, 11,979 tokens,
max_length 256, batches of 32 sorted by length, mean-pooled + L2-normalised, calibrated on
64 of the rows): per-layer errors are 0.006-0.036, so ``max_error=0.02`` quantizes 24 of 37
layers and keeps in full precision all six ``attention.self.value``, three FFN
``output.dense``, three ``intermediate.dense`` and ``pooler.dense``. Cosine to fp32: int8 on
the fp32 model min 0.99907 / mean 0.99958; int8 on the bf16 model 0.99907 / 0.99954 (bf16
alone 0.99993 / 0.99996; all 37 layers int8 on bf16 0.99543 / 0.99770). Rows/s, medians of 4
interleaved passes: fp32 77, int8 on fp32 77, bf16 159, int8 on bf16 97, all-int8 on bf16 73.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

__all__ = [
    "Int8Linear",
    "QuantReport",
    "int8_linear",
    "int8_linear_reference",
    "quantize_linears",
    "quantize_per_channel",
    "quantize_per_token",
]

# Rows whose max is below this quantize to zeros instead of dividing by zero.
_EPS = 1e-12


def quantize_per_channel(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8 quantization of a Linear weight.

    ``weight``: (N, K) any float dtype. Returns ``(weight_int8 (N, K) int8 contiguous,
    weight_scale (N,) float32)`` with ``weight ~= weight_int8 * weight_scale[:, None]``.
    """
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=_EPS) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale


def quantize_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8 quantization of activations, computed in float32.

    ``x``: (M, K) float32/bfloat16/float16. Returns ``(x_int8 (M, K) int8 contiguous,
    x_scale (M, 1) float32)`` with ``x ~= x_int8 * x_scale``.
    """
    x = x.float()
    # max |x| as max(amax, -amin): two reductions but no (M, K) temporary for abs(). Each
    # full-size temporary or mixed-dtype op measured as a whole extra pass on CPU.
    amax = torch.maximum(x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True).neg_())
    scale = amax.clamp_(min=_EPS).div_(127.0)
    # |x / scale| <= 127 up to one rounding, so no clamp is needed before the cast.
    return torch.div(x, scale).round_().to(torch.int8), scale


def int8_linear_reference(
    x: Tensor, weight_int8: Tensor, weight_scale: Tensor, bias: Tensor | None = None
) -> Tensor:
    """Reference for ``int8_linear``: quantize ``x`` per token, dequantize, float32 matmul.

    ``x``: (..., K) float; ``weight_int8``: (N, K) int8; ``weight_scale``: (N,) float32;
    ``bias``: (N,) or None. Returns (..., N) in ``x.dtype``. Same math as the fast path; the
    two differ only by float32 rounding of the (exact, in int32) dot products.
    """
    x2 = x.reshape(-1, x.shape[-1])
    x_q, x_scale = quantize_per_token(x2)
    w = weight_int8.float() * weight_scale.float()[:, None]
    y = (x_q.float() * x_scale) @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], weight_int8.shape[0])


def _int_mm_ok(device: torch.device, k: int, n: int) -> bool:
    """Whether ``torch._int_mm`` takes (M, k) x (k, n) here, once M is padded past 16."""
    return device.type == "cpu" or (k % 8 == 0 and n % 8 == 0)


@torch.library.custom_op("lepton_batch::int8_linear", mutates_args=())
def int8_linear(
    x: Tensor, weight_int8: Tensor, weight_scale: Tensor, bias: Tensor | None
) -> Tensor:
    """``x @ W.T + b`` with int8 x int8 -> int32 products (``torch._int_mm``).

    ``x``: (..., K) float32/bfloat16/float16; ``weight_int8``: (N, K) int8 contiguous;
    ``weight_scale``: (N,) float32; ``bias``: (N,) any float dtype or None. Returns (..., N)
    in ``x.dtype``. Falls back to ``int8_linear_reference`` where ``_int_mm`` cannot take
    the shape (CUDA with K or N not a multiple of 8).
    """
    n, k = weight_int8.shape
    if not _int_mm_ok(x.device, k, n):
        return int8_linear_reference(x, weight_int8, weight_scale, bias)
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    x_q, x_scale = quantize_per_token(x2)
    if x.device.type == "cuda" and m <= 16:
        x_q = torch.nn.functional.pad(x_q, (0, 0, 0, 17 - m))
    # weight_int8.t() is a column-major (K, N) view: what cuBLASLt wants, and on CPU it
    # measured as fast as or faster than a row-major copy.
    acc = torch._int_mm(x_q, weight_int8.t())[:m]
    y = acc.float().mul_(weight_scale.float()).mul_(x_scale)
    if bias is not None:
        y.add_(bias.float())
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


@int8_linear.register_fake
def _(x: Tensor, weight_int8: Tensor, weight_scale: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight_int8.shape[0]))


class Int8Linear(nn.Module):
    """Drop-in for ``nn.Linear`` (inference only) running ``int8_linear``.

    Buffers: ``weight_int8`` (out, in) int8, ``weight_scale`` (out,) float32, ``bias``
    (out,) in the source Linear's dtype or None. Input (..., in) float; output (..., out) in
    the input's dtype. Quantize after the model has its final dtype: a later
    ``model.to(dtype)`` would also cast ``weight_scale`` (forward reads it as float32).
    """

    def __init__(self, weight_int8: Tensor, weight_scale: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        assert weight_int8.dtype == torch.int8 and weight_int8.dim() == 2, "weight: (out, in) int8"
        assert weight_scale.shape == weight_int8.shape[:1], "weight_scale: (out,)"
        self.in_features = weight_int8.shape[1]
        self.out_features = weight_int8.shape[0]
        self.register_buffer("weight_int8", weight_int8.contiguous())
        self.register_buffer("weight_scale", weight_scale.float())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """Quantize ``linear.weight`` per output channel; the bias keeps its dtype."""
        w_q, w_scale = quantize_per_channel(linear.weight)
        return cls(w_q, w_scale, linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return int8_linear(x, self.weight_int8, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


@dataclass(frozen=True)
class QuantReport:
    """What ``quantize_linears`` did. Errors are ``||y_int8 - y||_F / ||y||_F`` per layer on
    the calibration inputs (NaN for a layer ``calibrate`` never ran)."""

    quantized: list[str]
    kept: dict[str, float]
    errors: dict[str, float]
    skipped: list[str] = field(default_factory=list)
    precision: str = "float32"

    def summary(self) -> str:
        """One line, e.g. ``int8: 36 of 37 linear layers; kept in bfloat16: x.dense (error
        0.031)``."""
        total = len(self.quantized) + len(self.kept) + len(self.skipped)
        parts = [f"int8: {len(self.quantized)} of {total} linear layers"]
        if self.kept:
            kept = ", ".join(f"{n} (error {e:.3f})" for n, e in self.kept.items())
            parts.append(f"kept in {self.precision}: {kept}")
        if self.skipped:
            parts.append(f"skipped: {', '.join(self.skipped)}")
        return "; ".join(parts)


def quantize_linears(
    model: nn.Module,
    calibrate: Callable[[], None],
    *,
    max_error: float = 0.02,
    skip: Callable[[str, nn.Linear], bool] | None = None,
) -> QuantReport:
    """Swap each ``nn.Linear`` of ``model`` for an ``Int8Linear`` where int8 is accurate enough.

    ``calibrate()`` runs ``model`` (in its own precision) on a sample of the job's rows.
    Meanwhile a forward hook on each Linear compares the int8 output with the layer's own
    output on the same input and accumulates ``||y_int8 - y||_F^2`` and ``||y||_F^2``, so
    every calibration token counts and nothing is stored per layer beyond two scalars and
    the candidate int8 weights. Layers with error <= ``max_error`` are swapped in place;
    the others keep their precision; ``skip(name, linear) -> True`` excludes a layer (e.g.
    a classifier head) from both. Errors are per layer with full-precision inputs: they do
    not compound, so check the end-to-end output as well.
    """
    if max_error < 0:
        raise ValueError(f"max_error must be >= 0, got {max_error}")
    if isinstance(model, nn.Linear):
        raise ValueError("quantize_linears swaps submodules: pass the model that holds the "
                         "Linear, or use Int8Linear.from_linear(linear)")
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    skipped = [n for n, m in linears if skip is not None and skip(n, m)]
    todo = [(n, m) for n, m in linears if n not in skipped]
    candidates = {n: Int8Linear.from_linear(m) for n, m in todo}
    sums: dict[str, list[float]] = {n: [0.0, 0.0, 0] for n, _ in todo}  # err^2, ref^2, calls

    def hook(name: str) -> Callable:
        def fn(module: nn.Linear, args: tuple, output: Tensor) -> None:
            assert args, f"{name}: Linear called without a positional input"
            with torch.no_grad():
                y = output.detach().float()
                y_q = candidates[name](args[0].detach()).float()
                sums[name][0] += (y_q - y).pow(2).sum().item()
                sums[name][1] += y.pow(2).sum().item()
                sums[name][2] += 1
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in todo]
    try:
        with torch.no_grad():
            calibrate()
    finally:
        for h in handles:
            h.remove()

    errors: dict[str, float] = {}
    for n, (err2, ref2, calls) in sums.items():
        if not calls:
            log.warning("int8: %s never ran during calibration; keeping it", n)
            errors[n] = math.nan
        elif ref2 > 0:
            errors[n] = math.sqrt(err2 / ref2)
        else:  # the layer's output was all zeros
            errors[n] = 0.0 if err2 == 0 else math.inf
    quantized = [n for n in errors if errors[n] <= max_error]  # NaN (never called) is kept
    kept = {n: e for n, e in errors.items() if not e <= max_error}
    for n in quantized:
        parent, _, child = n.rpartition(".")
        setattr(model.get_submodule(parent), child, candidates[n])
    precision = str(todo[0][1].weight.dtype).removeprefix("torch.") if todo else "float32"
    report = QuantReport(quantized, kept, errors, skipped, precision)
    log.info(report.summary())
    return report
