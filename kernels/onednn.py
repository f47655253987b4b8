"""oneDNN linear layers for the CPU packed forward: weights reordered once, epilogues fused.

``nn.Linear`` on CPU hands oneDNN a plain (out, in) weight on every call, which oneDNN
reorders into its blocked layout each time, and runs bias and activation as separate
passes over memory. ``torch.ops.mkldnn._linear_pointwise`` with a weight reordered once by
``torch.ops.mkldnn._reorder_linear_weight`` (the ops torch.compile's CPU backend emits for
a frozen linear) does neither: on the 2-core AMX dev box MiniLM's feed-forward
up-projection + GELU ran in about half the time, in fp32 and bf16. The reference is
``F.linear`` followed by the activation; tests hold the two equal.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

Linear = Callable[[torch.Tensor], torch.Tensor]

# transformers' hidden_act name -> (oneDNN post-op, its algorithm): GELU exact or tanh.
ACTIVATIONS = {"gelu": ("gelu", "none"), "gelu_new": ("gelu", "tanh"),
               "gelu_pytorch_tanh": ("gelu", "tanh"), "relu": ("relu", "")}


def onednn_ok(device: str, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether :class:`OneDnnLinear` can run here, and why (not)."""
    if device != "cpu":
        return False, "not CPU"
    if dtype not in (torch.float32, torch.bfloat16):
        return False, f"{dtype} on CPU"
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn,
                                                                "_linear_pointwise"):
        return False, "this torch has no oneDNN linear"
    try:  # a build can list the op and still lack the kernel for this CPU and dtype
        x, w = torch.ones(2, 8, dtype=dtype), torch.ones(4, 8, dtype=dtype)
        y = OneDnnLinear(w, None, "gelu")(x)
        if not torch.allclose(y.float(), F.gelu(F.linear(x, w)).float(), rtol=1e-2):
            return False, "oneDNN linear disagrees with F.linear on a probe"
    except RuntimeError as exc:
        return False, f"oneDNN linear failed a probe: {exc}"
    return True, "oneDNN linears with weights reordered once, bias and activation fused"


class OneDnnLinear:
    """``act(x @ weight.T + bias)`` through oneDNN with a pre-reordered weight.

    weight: (out, in), bias: (out,) or None, both in the dtype x will have (fp32 or bf16);
    act: a key of :data:`ACTIVATIONS` or None. x: (T, in) -> (T, out), x's dtype.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None,
                 act: str | None = None) -> None:
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
        self.bias = None if bias is None else bias.detach()
        self.attr, self.algorithm = ACTIVATIONS[act] if act else ("none", "")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, self.attr, [],
                                                  self.algorithm)

    @classmethod
    def of(cls, linear: nn.Module, act: str | None = None) -> OneDnnLinear | None:
        """A oneDNN copy of a plain ``nn.Linear`` or of transformers' ``Conv1D`` (GPT-2's
        linear, weight stored (in, out)); None for anything else (an int8 swap)."""
        if type(linear) is nn.Linear:
            return cls(linear.weight, linear.bias, act)
        if type(linear).__name__ == "Conv1D" and linear.weight.dim() == 2:
            return cls(linear.weight.t().contiguous(), linear.bias, act)
        return None


def fast_linear(linear: nn.Module) -> Linear:
    """``linear`` as a oneDNN linear, or the module itself when it cannot be copied."""
    return OneDnnLinear.of(linear) or linear


def with_activation(linear: nn.Module, act: str | None, act_fn: Linear) -> Linear:
    """``act_fn(linear(x))``: one oneDNN GEMM with the activation fused when ``act`` names
    one oneDNN has (see :data:`ACTIVATIONS`), else the linear (oneDNN where it can) and
    then ``act_fn``."""
    fused = OneDnnLinear.of(linear, act) if act in ACTIVATIONS else None
    if fused is not None:
        return fused
    plain = fast_linear(linear)
    return lambda x: act_fn(plain(x))


def reference_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     act: str | None = None) -> torch.Tensor:
    """What :class:`OneDnnLinear` computes, in plain torch: x (T, in) -> (T, out)."""
    y = F.linear(x, weight, bias)
    if act is None:
        return y
    name, algorithm = ACTIVATIONS[act]
    return F.relu(y) if name == "relu" else F.gelu(y, approximate=algorithm)
