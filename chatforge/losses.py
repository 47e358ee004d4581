"""The language-model loss, computed without materialising the full (tokens x vocabulary) logits.

    loss = -1/N · Σ_t log softmax(h_t · Wᵀ)[y_t]        over the N targets that are not `IGNORE_INDEX`

`linear_cross_entropy` fuses the output head with the cross-entropy: it walks over chunks of tokens,
and for each chunk computes the logits, the loss and the gradients (softmax - onehot) right away, so the
logits never exist for all tokens at once. This saves (tokens x vocab) floats of memory, and on a CPU it
keeps each chunk in cache instead of streaming several vocabulary-sized tensors through memory.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # targets with this value (prompt tokens in SFT, padding) carry no loss


def _chunk_tokens(vocab_size: int, device: torch.device) -> int:
    """Tokens per chunk: ~8 MB of fp32 logits on a CPU (cache-sized), ~128 MB on a GPU (few launches)."""
    budget = 2**21 if device.type == "cpu" else 2**25
    return max(16, budget // vocab_size)


def _chunked_cross_entropy(hidden, weight, targets, with_grads: bool):
    """Sum of the token losses, the target count, and (with_grads) d(sum)/d hidden and d(sum)/d weight."""
    valid = targets != IGNORE_INDEX
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if with_grads else None
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if with_grads else None
    step = _chunk_tokens(weight.shape[0], hidden.device)
    for start in range(0, hidden.shape[0], step):
        h, y, keep = hidden[start : start + step], targets[start : start + step], valid[start : start + step]
        y = y.clamp(min=0)
        logits = (h @ weight.t()).float()
        logsumexp = logits.logsumexp(dim=-1)
        total += ((logsumexp - logits.gather(1, y[:, None]).squeeze(1)) * keep).sum()
        if with_grads:  # d loss / d logits = softmax - onehot, built in place over the logits
            grad = logits.sub_(logsumexp[:, None]).exp_()
            grad[torch.arange(len(y), device=y.device), y] -= 1
            grad = grad.mul_(keep[:, None]).to(h.dtype)
            grad_hidden[start : start + step] = grad @ weight
            grad_weight += grad.t() @ h
    return total, valid.sum(), grad_hidden, grad_weight


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        total, count, grad_hidden, grad_weight = _chunked_cross_entropy(hidden, weight, targets, with_grads=True)
        count = count.clamp(min=1)
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype), count)
        return total / count

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight, count = ctx.saved_tensors
        scale = grad_output / count
        return grad_hidden * scale.to(grad_hidden.dtype), grad_weight * scale.to(grad_weight.dtype), None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets`; hidden (N, d), weight (V, d), targets (N,).

    Equal to `F.cross_entropy(hidden @ weight.T, targets, ignore_index=IGNORE_INDEX)`, in less memory.
    """
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets)
    total, count, _, _ = _chunked_cross_entropy(hidden, weight, targets, with_grads=False)
    return total / count.clamp(min=1)
