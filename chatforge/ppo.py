"""Stage 4, RLHF with PPO-ptx: the objective of InstructGPT (Ouyang et al. 2022, equation 2),

    objective(φ) = E_{(x,y) ~ π_φ} [ r_θ(x, y) − β · log(π_φ(y|x) / π_SFT(y|x)) ] + γ_ptx · E_{x ~ D_pretrain} [ log π_φ(x) ]

maximised with PPO (Schulman et al. 2017): answers are sampled, each answer token gets the KL penalty and
the last one also the reward model's score, GAE turns rewards and values into advantages, and several
epochs of minibatch updates follow the clipped objective, a clipped value loss and an entropy bonus, with
the pretraining loss mixed into the same step. Each term below is a small function whose docstring shows
its formula. Tensors are (B, T) over answer tokens, right-padded, with `mask` 1 on real answer tokens.

This module holds the objective's terms, the layout of a rollout batch, `make_experience` (a scored
rollout with advantages) and `ppo_epochs` (the minibatch updates); the stage around them (models from
checkpoints, the command, checkpoints and resume, diagnostics and alarms) comes next.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class RolloutBatch:
    """Prompts and their sampled answers as one (B, P + T) batch: prompts left-padded to width P (`pad`
    slots per row, never attended to), answers right-padded to T (`mask` 1 on real answer tokens). Every
    model of PPO reads it with one forward pass, and each row computes what it would alone."""

    ids: torch.Tensor  # (B, P + T)
    pad: torch.Tensor  # (B,) left padding of each prompt
    mask: torch.Tensor  # (B, T) float, 1 on answer tokens
    prompt_width: int  # P

    @classmethod
    def build(cls, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], pad_id: int,
              device=None) -> "RolloutBatch":
        width = max(len(p) for p in prompts)
        answer_width = max(1, max(len(a) for a in answers))
        ids = torch.full((len(prompts), width + answer_width), pad_id, dtype=torch.long)
        mask = torch.zeros(len(prompts), answer_width)
        for row, (p, a) in enumerate(zip(prompts, answers)):
            ids[row, width - len(p) : width] = torch.tensor(p, dtype=torch.long)
            ids[row, width : width + len(a)] = torch.tensor(a, dtype=torch.long)
            mask[row, : len(a)] = 1
        pad = torch.tensor([width - len(p) for p in prompts])
        return cls(ids.to(device), pad.to(device), mask.to(device), width)

    def answer_logits(self, model: torch.nn.Module) -> torch.Tensor:
        """(B, T, vocab): the logits that predicted each answer token (positions P − 1 ... P + T − 2)."""
        return model(self.ids[:, :-1], pad=self.pad)[:, self.prompt_width - 1 :]

    def answer_values(self, model: torch.nn.Module) -> torch.Tensor:
        """(B, T): a scalar-head model's value of the state before each answer token, V(x, y_<t)."""
        return model(self.ids[:, :-1], pad=self.pad)[:, self.prompt_width - 1 :] * self.mask

    def answer_scores(self, model: torch.nn.Module) -> torch.Tensor:
        """(B,): a scalar-head model's output at each answer's last token (the reward model's score)."""
        values = model(self.ids, pad=self.pad)[:, self.prompt_width :]
        last = (self.mask.sum(1).long() - 1).clamp(min=0)
        return values.gather(1, last[:, None]).squeeze(1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log π(y_t | ...) of the given tokens: logits (B, T, V), tokens (B, T) -> (B, T), in fp32."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), 2, tokens[..., None]).squeeze(-1)


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


def entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the policy over answer tokens, H = −Σ_v p_v log p_v (the bonus's quantity)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return masked_mean(-(logp.exp() * logp).sum(-1), mask)


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


# --- experience: one rollout, scored --------------------------------------------------------------------

@dataclass
class Experience:
    """A rollout with everything the PPO epochs need; (B, T) tensors over answer tokens, 0 where masked."""

    batch: RolloutBatch
    logprobs: torch.Tensor  # log π_old(y_t): the policy that sampled
    ref_logprobs: torch.Tensor  # log π_SFT(y_t)
    values: torch.Tensor  # V_old(x, y_<t)
    scores: torch.Tensor  # (B,) the reward model's score, after the penalty for answers that never end
    finished: torch.Tensor  # (B,) bool: the answer ended with a stop token
    rewards: torch.Tensor
    kl: torch.Tensor
    advantages: torch.Tensor  # whitened over the rollout when asked
    returns: torch.Tensor

    @property
    def answer_tokens(self) -> torch.Tensor:
        return self.batch.ids[:, self.batch.prompt_width :]


@torch.no_grad()
def make_experience(policy: torch.nn.Module, reference: torch.nn.Module, value_model: torch.nn.Module,
                    reward_model: torch.nn.Module, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
                    finished: Sequence[bool], pad_id: int, *, beta: float, gamma: float = 1.0, lam: float = 0.95,
                    unfinished_penalty: float = 0.0, reward_clip: float = 0.0,
                    whiten_advantages: bool = True) -> Experience:
    """Score sampled answers and turn them into advantages:

    log-probs under the sampling policy and the reference, values, the reward model's score (minus
    `unfinished_penalty` for an answer cut off by the length limit; clipped to ±`reward_clip` when > 0),
    per-token rewards (`kl_penalized_rewards`), then GAE advantages and returns.
    """
    device = next(policy.parameters()).device
    batch = RolloutBatch.build(prompts, answers, pad_id, device)
    tokens = batch.ids[:, batch.prompt_width :]
    logprobs = token_logprobs(batch.answer_logits(policy), tokens) * batch.mask
    ref_logprobs = token_logprobs(batch.answer_logits(reference), tokens) * batch.mask
    values = batch.answer_values(value_model).float()
    scores = batch.answer_scores(reward_model).float()
    done = torch.tensor(list(finished), dtype=torch.bool, device=device)
    scores = torch.where(done, scores, scores - unfinished_penalty)
    if reward_clip > 0:
        scores = scores.clamp(-reward_clip, reward_clip)
    rewards, kl = kl_penalized_rewards(scores, logprobs, ref_logprobs, batch.mask, beta)
    advantages, returns = generalized_advantages(rewards, values, batch.mask, gamma, lam)
    if whiten_advantages:
        advantages = whiten(advantages, batch.mask)
    return Experience(batch, logprobs, ref_logprobs, values, scores, done, rewards, kl, advantages, returns)


# --- the update ---------------------------------------------------------------------------------------

def approx_kl(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """How far an epoch moved the policy from the one that sampled: E_t[½ (log π − log π_old)²]
    (Schulman's k2 estimator: ≥ 0, unbiased to second order)."""
    return 0.5 * masked_mean((logprobs - old_logprobs) ** 2, mask)


def ppo_epochs(policy: torch.nn.Module, value_model: torch.nn.Module, experience: Experience,
               optimizers: Sequence[torch.optim.Optimizer], *, epochs: int, minibatch_size: int, clip: float = 0.2,
               value_clip: float = 0.2, vf_coef: float = 0.1, entropy_coef: float = 0.0, ptx_coef: float = 0.0,
               ptx_batches=None, grad_clip: float = 1.0, generator: torch.Generator | None = None) -> dict[str, float]:
    """Several epochs of minibatch updates over one rollout, each minimising `ppo_ptx_loss`; `ptx_batches`
    yields (inputs, targets) of pretraining text, one per minibatch. Returns the means of the diagnostics:
    policy and value loss, entropy, clip fraction, approx KL to the sampling policy, ptx loss.

    Run the models without dropout (`GPT.set_dropout(0)`): with it, log π differs from log π_old before
    any update and the first epoch's ratios are not 1.
    """
    b = experience.batch
    rows = len(b.ids)
    params = [p for m in (policy, value_model) for p in m.parameters() if p.requires_grad]
    sums: dict[str, float] = {}
    updates = 0
    for _ in range(epochs):
        order = torch.randperm(rows, generator=generator)
        for start in range(0, rows, minibatch_size):
            idx = order[start : start + minibatch_size].to(b.ids.device)
            part = RolloutBatch(b.ids[idx], b.pad[idx], b.mask[idx], b.prompt_width)
            tokens = part.ids[:, part.prompt_width :]
            logits = part.answer_logits(policy)
            logprobs = token_logprobs(logits, tokens)
            policy_loss, clip_fraction = clipped_policy_loss(logprobs, experience.logprobs[idx],
                                                             experience.advantages[idx], part.mask, clip)
            value_loss = clipped_value_loss(part.answer_values(value_model).float(), experience.values[idx],
                                            experience.returns[idx], part.mask, value_clip)
            entropy_value = entropy(logits, part.mask)
            ptx = None
            if ptx_batches is not None and ptx_coef:
                inputs, targets = next(ptx_batches)
                ptx = policy(inputs, targets=targets)
            loss = ppo_ptx_loss(policy_loss, value_loss, entropy_value, ptx, vf_coef, entropy_coef, ptx_coef)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
            for optimizer in optimizers:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            stats = {"policy_loss": policy_loss, "value_loss": value_loss, "entropy": entropy_value,
                     "clip_fraction": clip_fraction,
                     "approx_kl": approx_kl(logprobs.detach(), experience.logprobs[idx], part.mask)}
            if ptx is not None:
                stats["ptx_loss"] = ptx
            for key, value in stats.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach())
            updates += 1
    return {key: value / updates for key, value in sums.items()}
