"""The recipe's equations, each a small function with its formula in the docstring: the whole of
InstructGPT's method (Ouyang et al. 2022) in one file.

- Pretraining and SFT: the next-token loss, with the output head fused into the cross-entropy
  (`linear_cross_entropy`).
- The reward model: the K-wise ranking loss (`ranking_loss`) and an optional centering term.
- RLHF with PPO-ptx: log-probabilities and entropy (`policy_terms`), the KL-penalised reward
  (`kl_penalized_rewards`), GAE (`generalized_advantages`), whitening, the clipped policy and value losses,
  the PPO-ptx total (`ppo_ptx_loss`), the adaptive KL controller and running reward statistics.

Tensors of the PPO terms are (B, T) over answer tokens, right-padded, with `mask` 1 on real answer tokens.

The next-token loss is computed without materialising the full (tokens x vocabulary) logits:

    loss = -1/N · Σ_t log softmax(h_t · Wᵀ)[y_t]        over the N targets that are not `IGNORE_INDEX`

`linear_cross_entropy` fuses the output head with the cross-entropy: it walks over chunks of tokens,
and for each chunk computes the logits, the loss and the gradients (softmax - onehot) right away, so the
logits never exist for all tokens at once. This saves (tokens x vocab) floats of memory, and on a CPU it
keeps each chunk in cache instead of streaming several vocabulary-sized tensors through memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from chatforge.linear import linear, weight_gradient

# --- the next-token loss (pretraining, SFT, PPO's ptx term) ------------------------------------------------

IGNORE_INDEX = -100  # targets with this value (prompt tokens in SFT, padding) carry no loss


def _chunk_tokens(vocab_size: int, device: torch.device) -> int:
    """Tokens per chunk: ~8 MB of fp32 logits on a CPU (cache-sized), ~128 MB on a GPU (few launches)."""
    budget = 2**21 if device.type == "cpu" else 2**25
    return max(16, budget // vocab_size)


def _chunked_cross_entropy(hidden, weight, targets, with_grads: bool, weight_grad: bool = True):
    """Sum of the token losses, the target count, and (with_grads) d(sum)/d hidden and, with weight_grad too,
    d(sum)/d weight (None for a frozen head: LoRA's, or a tied embedding that is not trained). Only the
    positions with a target go through the head: in SFT most tokens are the prompt's, which carry no loss."""
    rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.zeros_like(hidden) if with_grads else None
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if with_grads and weight_grad else None
    step = _chunk_tokens(weight.shape[0], hidden.device)
    for start in range(0, len(rows), step):
        chunk = rows[start : start + step]
        h, y = hidden[chunk], targets[chunk]
        logits = linear(h, weight).float()
        logsumexp = logits.logsumexp(dim=-1)
        total += (logsumexp - logits.gather(1, y[:, None]).squeeze(1)).sum()
        if with_grads:  # d loss / d logits = softmax - onehot, built in place over the logits
            grad = logits.sub_(logsumexp[:, None]).exp_()
            grad[torch.arange(len(y), device=y.device), y] -= 1
            grad = grad.to(h.dtype)
            # under autocast the products come out in bf16, the gradients are kept in their tensors' dtypes
            grad_hidden[chunk] = linear(grad, weight.t()).to(grad_hidden.dtype)
            if grad_weight is not None:
                grad_weight += weight_gradient(grad, h).float()
    return total, rows.new_tensor(len(rows)), grad_hidden, grad_weight


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        total, count, grad_hidden, grad_weight = _chunked_cross_entropy(
            hidden, weight, targets, with_grads=True, weight_grad=ctx.needs_input_grad[1])
        count = count.clamp(min=1)
        ctx.save_for_backward(grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), count)
        return total / count

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight, count = ctx.saved_tensors
        scale = grad_output / count
        return (grad_hidden * scale.to(grad_hidden.dtype),
                None if grad_weight is None else grad_weight * scale.to(grad_weight.dtype), None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets`; hidden (N, d), weight (V, d), targets (N,).

    Equal to `F.cross_entropy(hidden @ weight.T, targets, ignore_index=IGNORE_INDEX)`, in less memory.
    """
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets)
    total, count, _, _ = _chunked_cross_entropy(hidden, weight, targets, with_grads=False)
    return total / count.clamp(min=1)


# --- the reward model ---------------------------------------------------------------------------------

def ranking_loss(scores: torch.Tensor, ranking: Sequence[int], margin: float = 0.0) -> torch.Tensor:
    """InstructGPT's loss for one prompt's K answers, from their K scores:

        -1/C(K,2) · Σ_{y_w ranked above y_l} log σ(r(x, y_w) − r(x, y_l) − margin)
    """
    ordered = scores[torch.as_tensor(ranking, device=scores.device)]  # best first
    diff = ordered[:, None] - ordered[None, :]  # diff[i, j] = r_i − r_j
    above = torch.ones_like(diff, dtype=torch.bool).triu(diagonal=1)  # i ranked above j
    return -F.logsigmoid(diff[above] - margin).mean()


def centering_penalty(scores: torch.Tensor) -> torch.Tensor:
    """E[r²]: keeps the scores near 0, which the loss alone (shift-invariant) leaves free."""
    return scores.pow(2).mean()


# --- RLHF with PPO-ptx --------------------------------------------------------------------------------

def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, logsumexp: torch.Tensor | None = None) -> torch.Tensor:
    """log π(y_t | ...) of the given tokens, as the gathered logit minus the log-partition function:

        log π(y_t) = z_{y_t} − log Σ_v exp(z_v)

    logits (B, T, V), tokens (B, T) -> (B, T), in fp32; `logsumexp` (B, T) when already computed (shared with
    `entropy`), so that no (B, T, V) log-softmax is kept."""
    logits = logits.float()
    if logsumexp is None:
        logsumexp = logits.logsumexp(-1)
    return logits.gather(-1, tokens[..., None]).squeeze(-1) - logsumexp


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ x·mask / Σ mask (over `dim`, or everything)."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x − mean) / std over the masked entries (the mean kept when not `shift_mean`); 0 where masked."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


def kl_penalized_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards and the per-token KL estimate:

        kl_t = log π_RL(y_t | x, y_<t) − log π_SFT(y_t | x, y_<t)
        r_t  = −β · kl_t  +  [t is the answer's last token] · r_θ(x, y)

    scores (B,), the others (B, T) -> rewards (B, T), kl (B, T); both 0 where masked.
    """
    kl = (logprobs - ref_logprobs) * mask
    rewards = -beta * kl
    last = mask.sum(1).long() - 1  # the answer's last token (an empty answer has no token to reward)
    has_tokens = last >= 0
    rows = torch.arange(len(scores), device=scores.device)[has_tokens]
    rewards[rows, last[has_tokens]] += scores[has_tokens].to(rewards.dtype)
    return rewards, kl


def generalized_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                           gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE (Schulman et al. 2016) backwards over the answer tokens:

        δ_t = r_t + γ·V_{t+1} − V_t        (V after the last token is 0)
        A_t = δ_t + γλ·A_{t+1}
        R_t = A_t + V_t                     (the value target)

    -> advantages (B, T), returns (B, T); 0 where masked.
    """
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, as a loss to minimise:

        ρ_t = π_φ(y_t) / π_φ_old(y_t)
        L   = −E_t [ min(ρ_t·A_t, clip(ρ_t, 1 − ε, 1 + ε)·A_t) ]

    -> (loss, the share of tokens where the clipped term was the smaller one).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip, 1 + clip) * advantages
    loss = -masked_mean(torch.minimum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped < unclipped).float(), mask)
    return loss, clip_fraction


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor, clip: float) -> torch.Tensor:
    """The value loss with the new values kept near the rollout's (as in PPO's reference code):

        L_V = ½ · E_t [ max((V_t − R_t)², (clip(V_t, V_old − ε, V_old + ε) − R_t)²) ]
    """
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def entropy(logits: torch.Tensor, mask: torch.Tensor, logsumexp: torch.Tensor | None = None) -> torch.Tensor:
    """Mean entropy of the policy over answer tokens (the bonus's quantity), from the same log-partition
    function as `token_logprobs`:

        H = −Σ_v p_v log p_v = log Σ_v exp(z_v) − Σ_v p_v z_v,     p = softmax(z)
    """
    logits = logits.float()
    if logsumexp is None:
        logsumexp = logits.logsumexp(-1)
    probs = torch.exp(logits - logsumexp[..., None])
    return masked_mean(logsumexp - (probs * logits).sum(-1), mask)


def policy_terms(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                 entropy_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π of `tokens`, mean entropy) of one minibatch, sharing one logsumexp. The entropy carries a
    gradient only when `entropy_grad` (its coefficient is not 0): otherwise it is a diagnostic, and keeping
    its (B, T, V) softmax for the backward pass would cost memory for nothing."""
    logits = logits.float()
    logsumexp = logits.logsumexp(-1)
    logprobs = token_logprobs(logits, tokens, logsumexp)
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy_value = entropy(logits, mask, logsumexp)
    return logprobs, entropy_value


def ppo_ptx_loss(policy: torch.Tensor, value: torch.Tensor, entropy_value: torch.Tensor, ptx: torch.Tensor | None,
                 vf_coef: float, entropy_coef: float, ptx_coef: float) -> torch.Tensor:
    """The loss of one update: L = L^CLIP + c_vf·L_V − c_H·H + γ_ptx·L_LM(pretraining batch).

    With c_H = 0 and the pretraining term weighted by γ_ptx this is InstructGPT's PPO-ptx objective
    (negated, as a loss); L_LM is the mean next-token loss, so −γ_ptx·L_LM = γ_ptx·E[log π(x)] per token.
    """
    loss = policy + vf_coef * value - entropy_coef * entropy_value
    if ptx is not None and ptx_coef:
        loss = loss + ptx_coef * ptx
    return loss


def approx_kl(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """How far an epoch moved the policy from the one that sampled: E_t[½ (log π − log π_old)²]
    (Schulman's k2 estimator: ≥ 0, unbiased to second order)."""
    return 0.5 * masked_mean((logprobs - old_logprobs) ** 2, mask)


class AdaptiveKLController:
    """β adapted toward a target KL (Ziegler et al. 2019):

        e = clip(KL / KL_target − 1, −0.2, 0.2)
        β ← β · (1 + e · n / horizon)           n: samples in the rollout
    """

    def __init__(self, beta: float, target: float, horizon: int):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, samples: int) -> float:
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.beta *= 1 + error * samples / self.horizon
        return self.beta

    def state_dict(self) -> dict:
        return {"beta": self.beta, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.beta, self.target, self.horizon = state["beta"], state["target"], state["horizon"]


class RunningMoments:
    """Running mean and standard deviation of the reward model's scores over all rollouts so far (Chan et
    al.'s parallel update), for reward normalisation: r ← (r − mean) / std. Non-finite scores are left out."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x: torch.Tensor) -> None:
        x = x[torch.isfinite(x)].double()
        if not len(x):
            return
        n, mean = len(x), float(x.mean())
        delta, total = mean - self.mean, self.count + n
        self.m2 += float(((x - mean) ** 2).sum()) + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count > 1 else 1.0

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / max(self.std, 1e-6)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = state["count"], state["mean"], state["m2"]
