"""The model's matrix products on a CPU: `linear(x, W)` = x @ Wᵀ (+ b), run by oneDNN in fp32 where it can.

PyTorch's CPU `F.linear` and `matmul` call MKL's sgemm, whose kernels MKL chooses by processor: on an AMD
EPYC with AVX-512 they reached less than half of what oneDNN (also inside PyTorch, as mkldnn) reaches on the
same matrices. `linear` sends products of at least `ONEDNN_MIN_ROWS` rows to oneDNN, forward and backward
(an autograd function: dX = dY·W and dW = dYᵀ·X are products of the same kind), and everything else to
`F.linear`: a GPU, bf16, autocast, a model being compiled (whose compiler chooses its own kernels), oneDNN
switched off (`torch.backends.mkldnn.enabled = False`), and products of a few rows, where oneDNN's fixed cost
per call outweighs its faster kernel. The results equal `F.linear`'s up to the order of fp32 additions.

No public PyTorch API runs an fp32 product on oneDNN; `torch.ops.mkldnn._linear_pointwise` is the op its own
compiler emits for CPU linear layers. It takes plain weights (transposed views too) as well as packed ones;
an input that is not contiguous it copies first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ONEDNN_MIN_ROWS = 32  # measured on an AMD EPYC: MKL is faster at 8 rows, oneDNN at 64 (1.3-1.6x) and beyond


def onednn_enabled() -> bool:
    """Whether fp32 CPU products may go to oneDNN here: a build of torch with it, not switched off, not under
    CPU autocast (which would hand it bf16 rows)."""
    return (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and not torch.is_autocast_enabled("cpu") and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def onednn_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weightᵀ (+ bias) by oneDNN; `weight` (out, in) may be a transposed view, or packed
    (`mkldnn._reorder_linear_weight`)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _on_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and weight.device.type == "cpu"
            and x.numel() >= ONEDNN_MIN_ROWS * x.shape[-1] and not torch.compiler.is_compiling() and onednn_enabled())


def weight_gradient(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dW = dYᵀ · X (out, in) from grad (N, out) and x (N, in); on oneDNN (as `linear` decides), which copies
    the transposed operand it reads as input, that operand is the smaller of the two, so that a wide layer (a
    head of 49,152 outputs) costs no copy of its output gradient."""
    if not _on_onednn(grad, x):
        return grad.t() @ x
    if grad.shape[1] > x.shape[1]:
        return onednn_product(x.t(), grad.t()).t()  # (Xᵀ · dY)ᵀ
    return onednn_product(grad.t(), x.t())


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return onednn_product(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1])
        grad_x = onednn_product(grad, weight.t()) if ctx.needs_input_grad[0] else None  # dY · W
        grad_weight = weight_gradient(rows, x.reshape(-1, x.shape[-1])) if ctx.needs_input_grad[1] else None
        grad_bias = rows.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, through oneDNN where it runs faster (see the module's docstring)."""
    if not _on_onednn(x, weight):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return _OneDNNLinear.apply(x, weight, bias)
    return onednn_product(x, weight, bias)


class Linear(nn.Linear):
    """`nn.Linear` whose product is `linear`'s. Its parameters, their names and everything that wraps a linear
    layer (peft's LoRA layers call it as their base layer) are `nn.Linear`'s."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
