"""Rollouts, the experience PPO learns from: answers sampled from the policy (`rollout`), laid out as one
batch (`RolloutBatch`), scored by the policy, the reference, the value model and the reward (`score_rollout`,
in micro-batches), and turned into KL-penalised rewards and GAE advantages (`make_experience`). The
equations are in `chatforge/objectives.py`; the updates that consume the experience are in `ppo.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from chatforge.comparisons import reward_ids, text_ids
from chatforge.engine import SamplingParams, generate_batch
from chatforge.model import GPT
from chatforge.objectives import (
    RunningMoments, generalized_advantages, kl_penalized_rewards, masked_mean, token_logprobs, whiten,
)
from chatforge.reward import reward_head, score_sequences
from chatforge.runtime import Dist, all_gather_objects
from chatforge.tokenizer import Tokenizer


@dataclass
class RolloutBatch:
    """Prompts and their sampled answers as one (B, P + T) batch: prompts left-padded to width P (`pad`
    slots per row, never attended to), answers right-padded to T (`mask` 1 on real answer tokens). The
    models of PPO read it in micro-batches (`rows`), and each row computes what it would alone."""

    ids: torch.Tensor  # (B, P + T)
    pad: torch.Tensor  # (B,) left padding of each prompt
    mask: torch.Tensor  # (B, T) float, 1 on answer tokens
    prompt_width: int  # P

    @classmethod
    def build(cls, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], pad_id: int,
              device=None) -> "RolloutBatch":
        width = max((len(p) for p in prompts), default=0)
        answer_width = max(1, max((len(a) for a in answers), default=0))
        ids = torch.full((len(prompts), width + answer_width), pad_id, dtype=torch.long)
        mask = torch.zeros(len(prompts), answer_width)
        for row, (p, a) in enumerate(zip(prompts, answers)):
            ids[row, width - len(p) : width] = torch.tensor(p, dtype=torch.long)
            ids[row, width : width + len(a)] = torch.tensor(a, dtype=torch.long)
            mask[row, : len(a)] = 1
        pad = torch.tensor([width - len(p) for p in prompts])
        return cls(ids.to(device), pad.to(device), mask.to(device), width)

    @property
    def answer_tokens(self) -> torch.Tensor:
        return self.ids[:, self.prompt_width :]

    def answers(self) -> list[list[int]]:
        """Each row's answer, as sampled."""
        return [row[: int(n)].tolist() for row, n in zip(self.answer_tokens, self.mask.sum(1))]

    def prompt_tokens(self) -> int:
        return int((self.prompt_width - self.pad).sum())

    def rows(self, index: torch.Tensor | slice) -> "RolloutBatch":
        """The rows `index` as a batch of their own, cut to their own widths (the left padding all of them
        share and the answer columns none of them reaches are dropped): the same results in less work."""
        pad, mask = self.pad[index], self.mask[index]
        cut = int(pad.min())
        width = max(1, int(mask.sum(1).max()))
        return RolloutBatch(self.ids[index, cut : self.prompt_width + width], pad - cut, mask[:, :width],
                            self.prompt_width - cut)

    def answer_logits(self, model: torch.nn.Module) -> torch.Tensor:
        """(B, T, vocab): the logits that predicted each answer token (positions P − 1 ... P + T − 2)."""
        return model(self.ids[:, :-1], pad=self.pad, head_from=self.prompt_width - 1)

    def answer_values(self, model: torch.nn.Module) -> torch.Tensor:
        """(B, T): a scalar-head model's value of the state before each answer token, V(x, y_<t)."""
        return model(self.ids[:, :-1], pad=self.pad, head_from=self.prompt_width - 1) * self.mask


# --- experience: one rollout, scored --------------------------------------------------------------------

# (prompts' token ids, answers' token ids as sampled, finished) -> (B,) scores
Reward = Callable[[Sequence[Sequence[int]], Sequence[Sequence[int]], Sequence[bool]], torch.Tensor]


def model_reward(model: GPT, end_id: int, pad_id: int, batch_size: int = 16) -> Reward:
    """A reward model's score of each answer, read from `reward_ids` (the very tokens the policy sampled,
    closed by <|end|>, id `end_id`) as in its training and in `chatforge reward score`, `batch_size` answers
    at a time."""

    def score(prompts, answers, finished) -> torch.Tensor:
        sequences = [reward_ids(p, a, f, end_id) for p, a, f in zip(prompts, answers, finished)]
        return torch.tensor(score_sequences(model, sequences, pad_id, batch_size))

    return score


@dataclass
class Experience:
    """A rollout with everything the PPO epochs need; (B, T) tensors over answer tokens, 0 where masked."""

    batch: RolloutBatch
    logprobs: torch.Tensor  # log π_old(y_t): the policy that sampled
    ref_logprobs: torch.Tensor  # log π_SFT(y_t)
    values: torch.Tensor  # V_old(x, y_<t)
    raw_scores: torch.Tensor  # (B,) the reward model's score
    scores: torch.Tensor  # (B,) the score as rewarded: penalised when unfinished, normalised, clipped
    finished: torch.Tensor  # (B,) bool: the answer ended with a stop token
    rewards: torch.Tensor
    kl: torch.Tensor
    advantages: torch.Tensor  # whitened over the rollout when asked
    returns: torch.Tensor

    @property
    def finite(self) -> bool:
        """False when a score, log-prob or value is NaN or infinite (the step must then be skipped)."""
        return all(bool(torch.isfinite(t).all()) for t in (self.scores, self.logprobs, self.ref_logprobs, self.values))


@dataclass
class ScoredRollout:
    """A rollout's batch, the token log-probs of its answers under the policy and the reference, the value
    model's values (None without one) and the reward's score of each answer; (B, T), 0 where masked."""

    batch: RolloutBatch
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor | None
    scores: torch.Tensor  # (B,)


@torch.no_grad()
def score_rollout(policy: torch.nn.Module, reference: torch.nn.Module, value_model: torch.nn.Module | None,
                  reward: Reward, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
                  finished: Sequence[bool], pad_id: int, micro_batch_size: int) -> ScoredRollout:
    """Every model's reading of the rollout, `micro_batch_size` answers at a time: the peak memory is that of
    one micro-batch (whatever the rollout's size) plus the rollout's ids and per-token scalars."""
    batch = RolloutBatch.build(prompts, answers, pad_id, next(policy.parameters()).device)
    logprobs, ref_logprobs = torch.zeros_like(batch.mask), torch.zeros_like(batch.mask)
    values = torch.zeros_like(batch.mask) if value_model is not None else None
    for start in range(0, len(answers), micro_batch_size):
        rows = slice(start, start + micro_batch_size)
        part = batch.rows(rows)
        width = part.mask.shape[1]
        logprobs[rows, :width] = token_logprobs(part.answer_logits(policy), part.answer_tokens) * part.mask
        ref_logprobs[rows, :width] = token_logprobs(part.answer_logits(reference), part.answer_tokens) * part.mask
        if value_model is not None:
            values[rows, :width] = part.answer_values(value_model).float()
    # a process of a distributed rollout may have sampled nothing (fewer chunks than processes)
    scores = reward(prompts, answers, finished).float() if answers else torch.zeros(0)
    return ScoredRollout(batch, logprobs, ref_logprobs, values, scores.to(batch.mask.device))


@torch.no_grad()
def make_experience(policy: torch.nn.Module, reference: torch.nn.Module, value_model: torch.nn.Module,
                    reward: Reward, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
                    finished: Sequence[bool], pad_id: int, *, beta: float, gamma: float = 1.0, lam: float = 0.95,
                    unfinished_penalty: float = 0.0, reward_stats: RunningMoments | None = None,
                    reward_clip: float = 0.0, whiten_advantages: bool = True, micro_batch_size: int = 8,
                    d: Dist = Dist()) -> Experience:
    """Score sampled answers and turn them into advantages:

    log-probs under the sampling policy and the reference, and values (`score_rollout`, in micro-batches,
    no activations kept), the reward's score, minus `unfinished_penalty` for an answer cut off by the
    length limit, normalised by the running statistics `reward_stats` when given (updated with this
    rollout first), clipped to ±`reward_clip` when > 0; then per-token rewards (`kl_penalized_rewards`),
    GAE advantages and returns.

    Under several processes (`d`) each scores the answers it sampled, and the experience is then the
    whole rollout's on every process (`gather_scored`): the reward statistics, the whitening and the
    diagnostics are those of the global batch, and every process holds the same numbers.
    """
    scored = score_rollout(policy, reference, value_model, reward, prompts, answers, finished, pad_id, micro_batch_size)
    if d.enabled:
        scored, finished = gather_scored(scored, prompts, answers, finished, pad_id, d)
    batch, logprobs, ref_logprobs, values, raw_scores = (scored.batch, scored.logprobs, scored.ref_logprobs,
                                                         scored.values, scored.scores)
    done = torch.tensor(list(finished), dtype=torch.bool, device=batch.ids.device)
    scores = torch.where(done, raw_scores, raw_scores - unfinished_penalty)
    if reward_stats is not None:
        reward_stats.update(scores)
        scores = reward_stats.normalize(scores)
    if reward_clip > 0:
        scores = scores.clamp(-reward_clip, reward_clip)
    rewards, kl = kl_penalized_rewards(scores, logprobs, ref_logprobs, batch.mask, beta)
    advantages, returns = generalized_advantages(rewards, values, batch.mask, gamma, lam)
    if whiten_advantages:
        advantages = whiten(advantages, batch.mask)
    return Experience(batch, logprobs, ref_logprobs, values, raw_scores, scores, done, rewards, kl, advantages, returns)


def gather_scored(scored: ScoredRollout, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
                  finished: Sequence[bool], pad_id: int, d: Dist) -> tuple[ScoredRollout, list[bool]]:
    """Every process's scored answers joined in rank order into the whole rollout, on every process. Only
    the ragged per-answer numbers travel (ids and a few floats per token: small next to the forward passes
    that made them)."""
    lengths = scored.batch.mask.sum(1).long().tolist()
    per_token = {"logprobs": scored.logprobs, "ref_logprobs": scored.ref_logprobs, "values": scored.values}
    mine = {"prompts": list(map(list, prompts)), "answers": list(map(list, answers)), "finished": list(finished),
            "scores": scored.scores.float().cpu(),
            **{k: None if t is None else [row[:n] for row, n in zip(t.float().cpu(), lengths)]
               for k, t in per_token.items()}}
    parts = all_gather_objects(mine, d)

    def joined(key: str) -> list:
        return [x for part in parts for x in part[key]]

    device = scored.batch.ids.device
    batch = RolloutBatch.build(joined("prompts"), joined("answers"), pad_id, device)

    def padded(key: str) -> torch.Tensor | None:
        if mine[key] is None:
            return None
        out = torch.zeros_like(batch.mask)
        for row, values in enumerate(joined(key)):
            out[row, : len(values)] = values.to(device)
        return out

    scores = torch.cat([part["scores"] for part in parts]).to(device)
    return (ScoredRollout(batch, padded("logprobs"), padded("ref_logprobs"), padded("values"), scores),
            joined("finished"))


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 − Var[R − V] / Var[R] over answer tokens: 1 when the value model predicts the returns, ≤ 0 when it
    does no better than their mean."""
    variance = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    error = returns - values
    residual = masked_mean((error - masked_mean(error, mask)) ** 2, mask)
    return float(1 - residual / variance) if variance > 0 else 0.0



def classifier_reward(model: GPT, tokenizer: Tokenizer, label: str, kind: str, batch_size: int = 16) -> Reward:
    """A classifier's log-probability (or logit) of class `label` for each answer's text, read the way the
    classifier was trained (<|bos|> text <|eos|>)."""
    to_reward = reward_head(model, label, kind)

    def score(prompts, answers, finished) -> torch.Tensor:
        sequences = [text_ids(t, tokenizer) for t in answer_texts(tokenizer, answers)]
        # cut to the context, keeping the <|eos|> it reads
        sequences = [s if len(s) <= model.config.max_seq_len else [*s[: model.config.max_seq_len - 1], s[-1]]
                     for s in sequences]
        return torch.tensor(score_sequences(model, sequences, tokenizer.pad_id, batch_size, to_reward))

    return score


def rollout(policy: GPT, prompts: Sequence[Sequence[int]], n: int, max_new_tokens: int, stop_id: int, seed: int,
            temperature: float = 1.0, rows: int = 0, d: Dist = Dist()) -> tuple[list[list[int]], list[list[int]], list[bool]]:
    """`n` answers to each prompt from the policy's own distribution (temperature 1: PPO's ratios and KL
    are of that distribution), with the engine, `rows` answers at a time (0: all at once; each later chunk
    draws from a seed of its own): (prompt of each answer, answers, finished).

    Under several processes each generates its run of consecutive chunks (`d`), and returns its answers
    only: a chunk's answers depend on the chunk alone (its prompts, its seed), so the rollout, joined in
    rank order, is the one a single process would sample with the same `rows`."""
    per_chunk = max(1, rows // n) if rows else len(prompts)
    starts = range(0, len(prompts), per_chunk)
    answers = []
    for i in np.array_split(np.arange(len(starts)), d.world_size)[d.rank].tolist():
        start = starts[i]
        chunk_seed = seed if i == 0 else int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=chunk_seed)
        part = prompts[start : start + per_chunk]
        completions = generate_batch(policy, part, params, n=n, stop_ids=(stop_id,))
        answers += [(p, c) for p, samples in zip(part, completions) for c in samples]
    return [list(p) for p, _ in answers], [c.tokens for _, c in answers], [c.finish_reason == "stop" for _, c in answers]


def answer_texts(tokenizer: Tokenizer, answers: Sequence[Sequence[int]]) -> list[str]:
    return [tokenizer.decode(a, skip_special=True).strip() for a in answers]


# --- diagnostics: what a rollout says about the policy ---------------------------------------------------

# A rollout "collapsed" when every answer is the same, or when most are empty.
EMPTY_SHARE_ALARM = 0.9


def correlation(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's r; 0 when either side is constant."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    return float(np.corrcoef(x, y)[0, 1]) if len(x) > 1 and x.std() > 0 and y.std() > 0 else 0.0


def collapse_alarm(texts: list[str]) -> str | None:
    """A message when the answers collapsed: all the same, or mostly empty."""
    empty = sum(not t for t in texts) / len(texts)
    if empty >= EMPTY_SHARE_ALARM:
        return f"answers collapsed: {empty:.0%} of them are empty"
    if len(texts) > 1 and len(set(texts)) == 1:
        return f"answers collapsed: all {len(texts)} are the same ({texts[0][:40]!r})"
    return None


def rollout_diagnostics(experience: Experience, texts: list[str]) -> dict[str, float]:
    """What a PPO user watches in each rollout: reward, KL (per token and per answer), answer length, how
    far the value model explains the returns, and whether the reward follows length (reward hacking)."""
    mask = experience.batch.mask
    lengths = mask.sum(1)
    kl_per_answer = experience.kl.sum(1)
    return {
        "reward": float(experience.raw_scores.mean()), "reward_std": float(experience.raw_scores.std(correction=0)),
        "score": float(experience.scores.mean()),
        "kl": float(masked_mean(experience.kl, mask)), "kl_per_answer": float(kl_per_answer.mean()),
        "answer_length": float(lengths.mean()), "finished": float(experience.finished.float().mean()),
        "reward_length_corr": correlation(experience.raw_scores.tolist(), lengths.tolist()),
        "explained_variance": explained_variance(experience.values, experience.returns, mask),
        "distinct_answers": len(set(texts)) / len(texts), "empty_answers": sum(not t for t in texts) / len(texts),
    }
