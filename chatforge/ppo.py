"""Stage 4, RLHF with PPO-ptx: the objective of InstructGPT (Ouyang et al. 2022, equation 2),

    objective(φ) = E_{(x,y) ~ π_φ} [ r_θ(x, y) − β · log(π_φ(y|x) / π_SFT(y|x)) ] + γ_ptx · E_{x ~ D_pretrain} [ log π_φ(x) ]

maximised with PPO (Schulman et al. 2017): answers are sampled, each answer token gets the KL penalty and
the last one also the reward model's score, GAE turns rewards and values into advantages, and several
epochs of minibatch updates follow the clipped objective, a clipped value loss and an entropy bonus, with
the pretraining loss mixed into the same step. Each term is a small function in `chatforge/objectives.py`
whose docstring shows its formula. Tensors are (B, T) over answer tokens, right-padded, with `mask` 1 on
real answer tokens.

This module holds `ppo_epochs` (the minibatch updates) and the stage around them: models from checkpoints,
the command, checkpoints and resume, diagnostics and alarms, and the comparison of two policies. The
experience the updates learn from (rollouts, their scores, advantages) is made in `rollout.py`.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.distributed.tensor import DTensor

from chatforge import sharding
from chatforge.chat_format import Message, render
from chatforge.checkpoint import load_model
from chatforge.config import DEVICE_HELP, require_positive, save_json
from chatforge.data import TokenWindows, load_data_tokenizer, load_splits
from chatforge.errors import UserError
from chatforge.evaluate import compare_policies
from chatforge.files import atomic_write_jsonl
from chatforge.lora import LoRAOptions, WithoutAdapters, add_adapters, has_adapters, merge_adapters
from chatforge.model import GPT, with_head
from chatforge.objectives import (
    AdaptiveKLController, RunningMoments, approx_kl, clipped_policy_loss, clipped_value_loss, policy_terms,
    ppo_ptx_loss,
)
from chatforge.plots import PPO_CURVES_FILE, plot_ppo_curves
from chatforge.rollout import (
    Experience, Reward, answer_texts, classifier_reward, collapse_alarm, make_experience, model_reward, rollout,
    rollout_diagnostics,
)
from chatforge.runtime import Dist, broadcast_parameters, pick_device, sum_gradients
from chatforge.sample import read_prompts
from chatforge.tokenizer import Tokenizer
from chatforge.train import Task, TrainConfig, Trainer, make_optimizer, merged_start, resolve_run_config, run_stage

# --- the update ---------------------------------------------------------------------------------------

def ppo_epochs(policy: torch.nn.Module, value_model: torch.nn.Module, experience: Experience,
               optimizers: Sequence[torch.optim.Optimizer], *, epochs: int, minibatch_size: int, clip: float = 0.2,
               value_clip: float = 0.2, vf_coef: float = 0.1, entropy_coef: float = 0.0, ptx_coef: float = 0.0,
               ptx_batches=None, grad_clip: float = 1.0, generator: torch.Generator | None = None,
               d: Dist = Dist()) -> dict[str, float]:
    """Several epochs of minibatch updates over one rollout, each minimising `ppo_ptx_loss`; `ptx_batches`
    yields (inputs, targets) of pretraining text, one per minibatch. Returns the means of the diagnostics
    over the applied updates (total, policy, value and ptx loss, entropy, clip fraction, approx KL to the
    sampling policy, gradient norm) and how many updates were skipped for a non-finite loss or gradient.

    Under several processes (`d`) every process holds the whole experience and draws the same minibatches;
    each computes every world_size-th row of a minibatch (and of its pretraining batch), weighted by its
    share of the minibatch's tokens, and the gradients are summed (`sum_gradients`): the update is the one a
    single process makes on the whole minibatch. A model sharded with FSDP2 (`sharding.shard(average=False)`)
    sums its gradients in its own reduce-scatter, and each of its forward passes is a collective, so then a
    process without rows computes one row weighted 0.

    Run the models without dropout (`GPT.set_dropout(0)`): with it, log π differs from log π_old before
    any update and the first epoch's ratios are not 1.
    """
    b = experience.batch
    rows = len(b.ids)
    policy_params, value_params = ([p for p in m.parameters() if p.requires_grad] for m in (policy, value_model))
    summed_by_hand = [p for m, params in ((policy, policy_params), (value_model, value_params))
                      if not sharding.is_sharded(m) for p in params]
    sharded = sharding.is_sharded(policy) or sharding.is_sharded(value_model)
    keys = ("loss", "policy_loss", "value_loss", "entropy", "clip_fraction", "approx_kl", "ptx_loss")
    sums: dict[str, float] = {}
    updates = skipped = 0
    for _ in range(epochs):
        order = torch.randperm(rows, generator=generator)
        for start in range(0, rows, minibatch_size):
            minibatch = order[start : start + minibatch_size].to(b.ids.device)
            idx = minibatch[d.rank :: d.world_size]
            share = b.mask[idx].sum() / b.mask[minibatch].sum().clamp(min=1)  # of the minibatch's tokens
            if sharded and not len(idx):
                idx = minibatch[:1]  # weighted by share 0
            zero = torch.zeros((), device=b.ids.device)
            policy_loss = value_loss = entropy_value = clip_fraction = kl_to_old = zero  # a process with no rows
            if len(idx):
                part = b.rows(idx)
                width = part.mask.shape[1]
                old_logprobs, advantages, old_values, returns = (
                    t[idx, :width] for t in (experience.logprobs, experience.advantages, experience.values, experience.returns))
                logprobs, entropy_value = policy_terms(part.answer_logits(policy), part.answer_tokens, part.mask,
                                                       entropy_grad=entropy_coef != 0)
                policy_loss, clip_fraction = clipped_policy_loss(logprobs, old_logprobs, advantages, part.mask, clip)
                value_loss = clipped_value_loss(part.answer_values(value_model).float(), old_values, returns,
                                                part.mask, value_clip)
                kl_to_old = approx_kl(logprobs.detach(), old_logprobs, part.mask)
            ptx = zero
            with_ptx = ptx_batches is not None and ptx_coef
            if with_ptx:
                inputs, targets = next(ptx_batches)
                windows = len(inputs)
                own = slice(d.rank, None, d.world_size)
                weight = len(inputs[own]) / windows
                if sharded and not weight:
                    own = slice(0, 1)  # weighted 0
                inputs, targets = inputs[own], targets[own]
                if len(inputs):
                    ptx = policy(inputs, targets=targets) * weight
            loss = ppo_ptx_loss(share * policy_loss, share * value_loss, share * entropy_value, ptx, vf_coef,
                                entropy_coef, ptx_coef if with_ptx else 0.0)
            stats = {"loss": loss, "policy_loss": share * policy_loss, "value_loss": share * value_loss,
                     "entropy": share * entropy_value, "clip_fraction": share * clip_fraction,
                     "approx_kl": share * kl_to_old, "ptx_loss": ptx}
            if loss.requires_grad:
                loss.backward()
            scalars = torch.stack([stats[k].detach().float() for k in keys])
            totals = dict(zip(keys, sum_gradients(summed_by_hand, scalars, d).tolist()))
            grad_norm = clip_gradients([policy_params, value_params], grad_clip if grad_clip > 0 else float("inf"))
            applied = math.isfinite(totals["loss"]) and bool(torch.isfinite(grad_norm))
            for optimizer in optimizers:
                if applied:  # a non-finite loss or gradient never reaches the weights
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if not applied:
                skipped += 1
                continue
            totals["grad_norm"] = float(grad_norm)
            if not with_ptx:
                del totals["ptx_loss"]
            for key, value in totals.items():
                sums[key] = sums.get(key, 0.0) + value
            updates += 1
    return {**{key: value / max(updates, 1) for key, value in sums.items()}, "skipped_updates": skipped}


def clip_gradients(groups: Sequence[Sequence[torch.Tensor]], max_norm: float) -> torch.Tensor:
    """`clip_grad_norm_` over several groups of parameters, one of which may be sharded (FSDP2's DTensors,
    whose norm is reduced over processes), which `clip_grad_norm_` cannot mix with plain tensors; returns
    the total norm before clipping."""
    norms = []
    for grads in ([p.grad for p in group if p.grad is not None] for group in groups):
        if grads:
            norm = torch.nn.utils.get_total_norm(grads)
            norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if not norms:
        return torch.zeros(())
    total = torch.linalg.vector_norm(torch.stack(norms))
    for group in groups:
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


# --- the stage: models, rollouts, diagnostics, checkpoints -----------------------------------------------

@dataclass
class PPOConfig(TrainConfig, LoRAOptions):
    policy: str = field(default="", metadata={"help": "SFT checkpoint (or run folder): the policy starts from it, and a frozen copy is the reference"})
    reward: str = field(default="", metadata={"help": "reward model checkpoint (`reward train`), or a classifier with --reward-label"})
    reward_label: str = field(default="", metadata={"help": "with a classifier as the reward: the class whose score is the reward"})
    reward_kind: str = field(default="logprob", metadata={"help": "with a classifier: reward = logprob or logit of --reward-label"})
    prompts: list[str] = field(default_factory=list, metadata={
        "help": "prompt files: .txt (one user message per line), .jsonl/.parquet with 'prompt' (text or messages)"})
    val_prompts: list[str] = field(default_factory=list, metadata={"help": "held-out prompt files (default: val_fraction of --prompts)"})
    val_fraction: float = field(default=0.1, metadata={"help": "share of --prompts held out when no --val-prompts"})
    ptx_data: str = field(default="", metadata={"help": "pretraining token shards (`chatforge data prepare`) for the ptx term"})
    ptx_coef: float = field(default=1.0, metadata={"help": "γ_ptx, weight of the pretraining LM loss (with --ptx-data); InstructGPT: 27.8 on its own loss scale"})
    ptx_batch_size: int = field(default=4, metadata={"help": "pretraining windows per minibatch update"})
    ptx_seq_len: int = field(default=0, metadata={"help": "tokens per pretraining window (0: the policy's context; "
                                                          "an imported model's context can be thousands)"})
    value_init: str = field(default="reward", metadata={
        "help": "value model: 'reward' (a trainable copy of the reward model, as InstructGPT), 'sft' (the SFT body "
                "with a fresh head), or 'reward-head' (a head trained on the reward model's frozen body: no extra copy)"})
    value_lr: float = field(default=0.0, metadata={"help": "value model's peak learning rate (0: --lr)"})
    batch_size: int = field(default=32, metadata={"help": "answers sampled per PPO iteration (prompts x samples_per_prompt)"})
    micro_batch_size: int = field(default=8, metadata={"help": "answers per minibatch update"})
    score_batch_size: int = field(default=0, metadata={
        "help": "answers per forward pass when scoring a rollout and evaluating (no gradients; 0: micro_batch_size); "
                "peak memory follows it, not batch_size"})
    rollout_batch_size: int = field(default=64, metadata={
        "help": "answers generated together in a rollout (0: all of batch_size at once); the generation's KV cache "
                "grows with it, so that a larger batch_size needs no more memory"})
    max_steps: int = field(default=100, metadata={"help": "PPO iterations (rollout, scoring, update epochs)"})
    samples_per_prompt: int = field(default=1, metadata={"help": "answers sampled per prompt in a rollout (sharing its prefill)"})
    max_new_tokens: int = field(default=64, metadata={"help": "longest answer; an answer cut off here is 'unfinished'"})
    ppo_epochs: int = field(default=4, metadata={"help": "passes over each rollout's minibatches"})
    clip: float = field(default=0.2, metadata={"help": "ε of the clipped ratio objective"})
    value_clip: float = field(default=0.2, metadata={"help": "how far the value model may move from the rollout's values"})
    vf_coef: float = field(default=0.1, metadata={"help": "weight of the value loss"})
    entropy_coef: float = field(default=0.0, metadata={"help": "weight of the entropy bonus (InstructGPT: 0)"})
    gamma: float = field(default=1.0, metadata={"help": "GAE discount γ"})
    lam: float = field(default=0.95, metadata={"help": "GAE λ"})
    kl_coef: float = field(default=0.02, metadata={"help": "β of the per-token KL penalty (InstructGPT: 0.02); the start value when adaptive"})
    kl_target: float = field(default=0.0, metadata={"help": "adapt β toward this KL per answer in nats (Ziegler et al.; 0: β fixed)"})
    kl_horizon: int = field(default=10000, metadata={"help": "the adaptive controller's horizon in answers"})
    kl_bound: float = field(default=10.0, metadata={"help": "alarm when the KL to the reference per answer exceeds this (nats)"})
    unfinished_penalty: float = field(default=0.0, metadata={"help": "subtracted from the score of an answer that never ends"})
    reward_clip: float = field(default=0.0, metadata={"help": "clip scores to ±this (0: off)"})
    normalize_reward: bool = field(default=False, metadata={"help": "normalise scores by their running mean and std"})
    whiten_advantages: bool = field(default=True, metadata={"help": "whiten advantages over each rollout"})
    sample_answers: int = field(default=2, metadata={"help": "held-out answers shown at each evaluation"})
    lr: float = field(default=1e-5, metadata={"help": "policy's peak learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay on matrices"})
    warmup_steps: int = field(default=0, metadata={"help": "iterations of linear warmup"})
    min_lr_ratio: float = field(default=1.0, metadata={"help": "final learning rate as a fraction of lr (1: constant)"})

    def __post_init__(self):
        super().__post_init__()
        self.check_lora()
        if self.lora_dropout:
            raise ValueError("lora_dropout must be 0 for PPO: its ratios must be 1 before any update")
        if self.value_init not in ("reward", "sft", "reward-head"):
            raise ValueError(f"value_init must be 'reward', 'sft' or 'reward-head', got {self.value_init!r}")
        require_positive(self, "samples_per_prompt", "max_new_tokens", "ppo_epochs", "ptx_batch_size", "kl_horizon")
        if self.score_batch_size < 0 or self.rollout_batch_size < 0 or self.ptx_seq_len < 0:
            raise ValueError("score_batch_size, rollout_batch_size and ptx_seq_len must be >= 0 (0: the default)")
        if self.batch_size % self.samples_per_prompt:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of samples_per_prompt ({self.samples_per_prompt})")
        if not 0 < self.clip < 1 or self.value_clip <= 0 or not 0 <= self.lam <= 1 or not 0 <= self.gamma <= 1:
            raise ValueError("need 0 < clip < 1, value_clip > 0, 0 <= lam <= 1 and 0 <= gamma <= 1")

    @property
    def scoring_rows(self) -> int:
        """Answers per forward pass when scoring."""
        return self.score_batch_size or self.micro_batch_size

    @property
    def generating_rows(self) -> int:
        """Answers generated together in a rollout."""
        return self.rollout_batch_size or self.batch_size


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    return a.fingerprint == b.fingerprint


def frozen(model: GPT) -> GPT:
    return model.eval().requires_grad_(False)


def value_model_from(init: str, sft: GPT, reward_model: GPT) -> GPT:
    """The value model V(x, y_<t): from the reward model (InstructGPT: it already judges answers), from the
    SFT model with a zero head, or a trainable head on the reward model's own frozen body (shared, not
    copied: the memory of three models instead of four)."""
    if init == "sft":
        return with_head(sft, "scalar")
    if reward_model.config.head != "scalar":  # a classifier's body, a fresh scalar head
        value = with_head(reward_model, "scalar")
    else:
        value = copy.deepcopy(reward_model)
        value.config = dataclasses.replace(value.config, score_offset=0.0)
    value.train().requires_grad_(True)
    if init == "reward-head":
        value.embed_tokens, value.layers, value.norm = reward_model.embed_tokens, reward_model.layers, reward_model.norm
    return value


def load_reward(config: PPOConfig, tokenizer: Tokenizer, device: torch.device) -> tuple[GPT, Reward]:
    return reward_from_checkpoint(config.reward, tokenizer, device, config.reward_label, config.reward_kind,
                                  config.scoring_rows)


def reward_from_checkpoint(checkpoint: str, tokenizer: Tokenizer, device: torch.device, label: str = "",
                           kind: str = "logprob", batch_size: int = 16) -> tuple[GPT, Reward]:
    """The frozen reward model (or classifier, whose class `label` is the reward) at `checkpoint`, and the
    reward function PPO calls; its tokenizer must be the policy's (`tokenizer`)."""
    model, reward_tokenizer, path = load_model(checkpoint, device)
    if model.config.head == "lm":
        raise UserError(f"{path}: a language model, not a reward model (`reward train`) or a classifier")
    if not same_tokenizer(tokenizer, reward_tokenizer):
        raise UserError(f"{path}: the reward model's tokenizer differs from the policy's; train it from the same SFT model")
    model = frozen(merge_adapters(model) if has_adapters(model) else model)  # a LoRA run's: one set of weights
    if model.config.head == "classifier":
        return model, classifier_reward(model, tokenizer, label, kind, batch_size)
    return model, model_reward(model, tokenizer.end_id, tokenizer.pad_id, batch_size)


def prompt_ids(prompts: list[tuple[str, list[Message]]], tokenizer: Tokenizer, context: int, room: int) -> list[list[int]]:
    """Each prompt rendered for the assistant to answer. A prompt must leave `room` tokens (the longest
    answer) and one more (the <|end|> the reward model reads after a cut-off answer) in the context: a batch
    is as wide as its longest prompt plus its longest answer, and every model reads it whole. One that does
    not is an error naming its file and line."""
    out = []
    for where, messages in prompts:
        ids = render(messages, tokenizer, add_generation_prompt=True)
        if len(ids) + room + 1 > context:
            raise UserError(f"{where}: the prompt is {len(ids)} tokens, leaving less than max_new_tokens ({room}) + 1 "
                            f"for an answer and its <|end|> in the model's context ({context}): shorten it or lower "
                            "--max-new-tokens")
        out.append(ids)
    return out


def load_prompts(paths: list[str]) -> tuple[list[tuple[str, list[Message]]], int]:
    return [p for path in paths for p in read_prompts(path)], 0


class PPOTask(Task):
    """PPO-ptx as the shared trainer's task: each step is one iteration (rollout, scoring, epochs of
    minibatch updates). The step is the prompt position (prompts are drawn in a seeded order per pass) and
    every random draw is seeded by (seed, step), so a resumed run continues exactly."""

    progress_keys = ("reward", "kl_per_answer")

    # the minibatch updates sum every process's gradients themselves (`ppo_epochs`): no DDP wrapper, and
    # under --fsdp the policy's reduce-scatter sums rather than averages
    syncs_own_gradients = True
    # the updates' log-probs and values are compared with those of the gathered fp32 copies that scored the
    # rollout (ratios π/π_old): gathered in bf16 the sharded models would compute otherwise under autocast
    fsdp_gathers_fp32 = True

    def __init__(self, config: PPOConfig, policy: GPT, reference: GPT, value_model: GPT, reward: Reward,
                 tokenizer: Tokenizer, train: list[list[int]], val: list[list[int]], device: torch.device,
                 questions: dict[tuple[int, ...], str] | None = None, d: Dist = Dist()):
        self.config, self.policy, self.reference, self.value_model, self.reward = config, policy, reference, value_model, reward
        self.tokenizer, self.train, self.val, self.device, self.d = tokenizer, train, val, device, d
        self.sharded = config.fsdp and d.enabled  # the trainer shards the policy
        # every process starts from rank 0's weights (as DDP would make them)
        broadcast_parameters([p for m in (policy, value_model) for p in m.parameters() if p.requires_grad], d)
        # and the value model here, unless its body is the frozen reward model's (--value-init reward-head)
        self.value_sharded = self.sharded and config.value_init != "reward-head"
        if self.value_sharded:
            sharding.shard(value_model, average=False)  # fp32 gathers: see fsdp_gathers_fp32
        # with --compile, the minibatch updates' forward passes (the trainer compiles the policy's); rollouts
        # and scoring stay eager: their shapes change with every generated token and every rollout
        self.value_model_in_training = torch.compile(value_model) if config.compile else value_model
        value_model.activation_checkpointing = config.activation_checkpointing
        self.stop_id = tokenizer.end_id
        self.value_optimizer = make_optimizer(value_model, config, device)
        self.kl_controller = AdaptiveKLController(config.kl_coef, config.kl_target or 1.0, config.kl_horizon)
        self.reward_stats = RunningMoments()
        self.ptx_seq_len = min(config.ptx_seq_len or policy.config.max_seq_len, policy.config.max_seq_len)
        self.ptx = TokenWindows(config.ptx_data, "train", self.ptx_seq_len, seed=config.seed) if config.ptx_data else None
        mean_prompt = float(np.mean([len(p) for p in train]))
        self.seq_len = round(mean_prompt + config.max_new_tokens / 2)
        self.tokens_per_step = round(self.seq_len * config.batch_size)
        self.last_eval: list[str] = []
        self.questions = questions or {}  # prompt ids -> the user's message, for the samples in the log

    # --- data -----------------------------------------------------------------------------------------

    def prompts(self, step: int) -> list[list[int]]:
        """The prompts of iteration `step`: positions step·P ... of a seeded permutation per pass."""
        count = self.config.batch_size // self.config.samples_per_prompt
        out = []
        for position in range(step * count, (step + 1) * count):
            epoch, index = divmod(position, len(self.train))
            order = np.random.default_rng([self.config.seed, epoch]).permutation(len(self.train))
            out.append(self.train[order[index]])
        return out

    @property
    def updates_per_step(self) -> int:
        """Minibatch updates in one iteration (each takes one ptx batch)."""
        return self.config.ppo_epochs * math.ceil(self.config.batch_size / self.config.micro_batch_size)

    @property
    def rollout_rows(self) -> int:
        """Answers generated together: `generating_rows`, but no more than one process's share of the batch,
        so that every process has a chunk to sample (the answers, seeded per chunk, are the same for any
        number of processes whose share is at least `rollout_batch_size`)."""
        return min(self.config.generating_rows, math.ceil(self.config.batch_size / self.d.world_size))

    def ptx_batches(self, step: int):
        for k in itertools.count():
            inputs, targets = self.ptx.batch(step * self.updates_per_step + k, self.config.ptx_batch_size)
            yield inputs.to(self.device), targets.to(self.device)

    # --- one iteration --------------------------------------------------------------------------------

    def train_step(self, trainer: Trainer) -> dict:
        with trainer.autocast():
            return self.iteration(trainer.model, trainer.optimizer, trainer.step, trainer.learning_rate())

    def sampling_models(self, policy: GPT | None = None) -> tuple[GPT, torch.nn.Module]:
        """The policy that samples and scores rollouts, and the reference: `policy` if given (a gathered copy),
        else under --fsdp a copy gathered from the shards (a collective: every process calls it) and else
        the policy itself. With LoRA the reference is that model with its adapters off."""
        if policy is None:
            policy = sharding.consolidated(self.policy, self.device).eval() if self.sharded else self.policy
        return policy, WithoutAdapters(policy) if has_adapters(policy) else self.reference

    def scoring_value_model(self) -> GPT:
        """The value model, or under --fsdp a copy gathered from its shards (a collective)."""
        return sharding.consolidated(self.value_model, self.device).eval() if self.value_sharded else self.value_model

    def iteration(self, model, optimizer, step: int, lr: float) -> dict:
        """Rollout, scoring, and `ppo_epochs` passes of minibatch updates of the policy and value model."""
        c = self.config
        t0 = time.perf_counter()
        policy, reference = self.sampling_models()
        value_model = self.scoring_value_model()
        prompts, answers, finished = rollout(policy, self.prompts(step), c.samples_per_prompt, c.max_new_tokens,
                                             self.stop_id, seed=c.seed * 100_003 + step, rows=self.rollout_rows, d=self.d)
        t1 = time.perf_counter()
        experience = make_experience(
            policy, reference, value_model, self.reward, prompts, answers, finished,
            self.tokenizer.pad_id, beta=self.kl_controller.beta, gamma=c.gamma, lam=c.lam,
            unfinished_penalty=c.unfinished_penalty, reward_stats=self.reward_stats if c.normalize_reward else None,
            reward_clip=c.reward_clip, whiten_advantages=c.whiten_advantages, micro_batch_size=c.scoring_rows,
            d=self.d)
        del policy, reference, value_model  # under --fsdp gathered copies: gone before the updates
        t2 = time.perf_counter()
        # the whole rollout's, on every process (so that every process raises the same alarms)
        texts = answer_texts(self.tokenizer, experience.batch.answers())
        tokens = int(experience.batch.mask.sum()) + experience.batch.prompt_tokens()
        first_prompt = experience.batch.ids[0, int(experience.batch.pad[0]) : experience.batch.prompt_width].tolist()
        record = {"lr": lr, "beta": self.kl_controller.beta, **rollout_diagnostics(experience, texts),
                  "sample": f"{self.question(first_prompt)} -> {texts[0]}"}
        alarms = [a for a in [collapse_alarm(texts)] if a]
        if not experience.finite:
            alarms.append("non-finite rewards, log-probs or values in the rollout: step skipped, nothing applied")
            return {**record, "skipped": True, "alarms": alarms, "tokens": tokens}
        for group in optimizer.param_groups:
            group["lr"] = lr
        for group in self.value_optimizer.param_groups:
            group["lr"] = (c.value_lr or c.lr) * lr / c.lr
        stats = ppo_epochs(
            model, self.value_model_in_training, experience, [optimizer, self.value_optimizer], epochs=c.ppo_epochs,
            minibatch_size=c.micro_batch_size, clip=c.clip, value_clip=c.value_clip, vf_coef=c.vf_coef,
            entropy_coef=c.entropy_coef, ptx_coef=c.ptx_coef if self.ptx else 0.0,
            ptx_batches=self.ptx_batches(step) if self.ptx else None, grad_clip=c.grad_clip,
            generator=torch.Generator().manual_seed(c.seed * 100_003 + step), d=self.d)
        t3 = time.perf_counter()
        if stats["skipped_updates"]:
            alarms.append(f"{stats['skipped_updates']} minibatch update(s) with a non-finite loss or gradient skipped")
        if record["kl_per_answer"] > c.kl_bound:
            alarms.append(f"KL to the reference {record['kl_per_answer']:.2f} nats per answer, past the bound {c.kl_bound:g}")
        if c.kl_target:
            self.kl_controller.update(record["kl_per_answer"], len(texts))
        forward = self.policy.flops_per_token(self.seq_len) / 3  # one forward pass of one token
        ptx_tokens = ("ptx_loss" in stats) * self.updates_per_step * c.ptx_batch_size * self.ptx_seq_len
        flops = forward * (tokens * (1 + 4 + 6 * c.ppo_epochs) + 3 * ptx_tokens)
        return {**record, **stats, "generate_s": t1 - t0, "score_s": t2 - t1, "train_s": t3 - t2,
                "samples_per_s": len(texts) / (t3 - t0), "tokens": tokens, "flops": flops,
                **({"alarms": alarms} if alarms else {})}

    # --- evaluation -----------------------------------------------------------------------------------

    def evaluate(self, model) -> dict[str, float]:
        """The policy on held-out prompts (the same seed each time, so evaluations compare): mean reward,
        KL to the reference per answer, answer length, and the share of answers that end. On the main
        process only (it logs them): the others go on to the next rollout and wait for it there."""
        prompts = self.val[: self.config.eval_batches * self.config.batch_size]
        if not prompts or not self.d.is_main:
            return {}
        policy, reference = self.sampling_models(model if self.sharded else self.policy)  # sharded: a gathered copy
        report = compare_policies(policy, reference, self.reward, self.tokenizer, prompts,
                                  self.config.max_new_tokens, self.config.seed, self.config.generating_rows,
                                  self.config.scoring_rows, reference_too=False)
        self.last_eval = [f"{self.question(p)} -> {a['policy']}"
                          for p, a in zip(prompts, report["answers"][: self.config.sample_answers])]
        policy = report["policy"]
        return {"val_reward": policy["reward"], "val_kl_per_answer": report["kl_per_answer"],
                "val_answer_length": policy["length"], "val_finished": policy["finished"]}

    def samples(self, model: GPT) -> list[str]:
        return self.last_eval

    def question(self, prompt: list[int]) -> str:
        """What the user asked in a prompt (its rendering holds a chat template's system prompt and markup)."""
        return self.questions.get(tuple(prompt)) or self.tokenizer.decode(prompt, skip_special=True).strip()

    def plot(self, metrics: list[dict], run_dir: Path) -> None:
        plot_ppo_curves(metrics, run_dir / PPO_CURVES_FILE, f"ppo: {run_dir}", self.config.kl_bound)

    # --- resume ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        # the value model's trained weights only: with --value-init reward-head its body is the frozen reward model's
        weights = sharding.full_state_dict(self.value_model, on_main_only=True) if self.value_sharded else self.value_model.state_dict()
        trained = self.value_trained()
        state = {"value_model": {name: t for name, t in weights.items() if name in trained},
                 "kl_controller": self.kl_controller.state_dict(), "reward_stats": self.reward_stats.state_dict(),
                 "rollout_rows": self.rollout_rows}
        if not self.config.fsdp:  # with --fsdp, checkpointed sharded with the policy's (`optimizers`)
            state["value_optimizer"] = self.value_optimizer.state_dict()
        return state

    def optimizers(self) -> dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]:
        return {"value_optimizer": (self.value_model, self.value_optimizer)}

    def value_trained(self) -> set[str]:
        return {name for name, p in self.value_model.named_parameters() if p.requires_grad}

    def load_state_dict(self, state: dict) -> None:
        if set(state["value_model"]) != self.value_trained():
            raise UserError("the checkpoint's value model does not match this run's --value-init")
        if self.value_sharded:
            sharding.load_full_state_dict(self.value_model, state["value_model"])
        else:
            self.value_model.load_state_dict(state["value_model"], strict=False)
        if "value_optimizer" in state:  # else loaded by the trainer with its own (`optimizers`)
            self.value_optimizer.load_state_dict(state["value_optimizer"])
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.reward_stats.load_state_dict(state["reward_stats"])
        saved_rows = state.get("rollout_rows", self.rollout_rows)
        if saved_rows != self.rollout_rows and self.d.is_main:
            print(f"ppo: rollouts now in chunks of {self.rollout_rows} answers, not {saved_rows} as before the resume "
                  f"(another number of processes): the run goes on, with other samples than it would have drawn")


def resolve_config(preset: str | None, overrides: dict, resume: str | None) -> tuple[PPOConfig, Path | None]:
    return resolve_run_config(PPOConfig, "ppo", preset, overrides, resume, needs={
        "policy": "CHECKPOINT (the SFT model)", "reward": "CHECKPOINT (the reward model)", "prompts": "FILE [FILE ...]"})


def build_ppo(config: PPOConfig, device: torch.device, resume_from: Path | None = None,
              d: Dist = Dist()) -> tuple[GPT, Tokenizer, PPOTask]:
    """The policy (from SFT, or the checkpoint to resume), its tokenizer, and the task holding the frozen
    reference and reward model, the value model and the prompts."""
    sft, tokenizer, sft_path = load_model(config.policy, device)
    if sft.config.head != "lm":
        raise UserError(f"{sft_path}: the policy starts from a language model (SFT), this checkpoint has a {sft.config.head} head")
    # a LoRA SFT run's adapters are part of the SFT policy: merged first, or "adapters off" would not be SFT
    sft, sft_path = merged_start(sft, tokenizer, sft_path, config)
    reward_model, reward = load_reward(config, tokenizer, device)
    if reward_model.config.max_seq_len < sft.config.max_seq_len and reward_model.config.head == "scalar":
        raise UserError(f"{config.reward}: the reward model's context ({reward_model.config.max_seq_len}) is "
                        f"shorter than the policy's ({sft.config.max_seq_len})")
    value_model = value_model_from(config.value_init, sft, reward_model)
    if value_model.config.max_seq_len < sft.config.max_seq_len:
        raise UserError(f"{config.reward}: its context ({value_model.config.max_seq_len}) is shorter than the policy's "
                        f"({sft.config.max_seq_len}), too short for the value model: use --value-init sft")
    value_model.set_dropout(0.0)
    if resume_from:
        policy = load_model(resume_from, device)[0]
    elif config.lora_r:  # the adapters go onto the SFT weights in place: the reference is them switched off
        policy = add_adapters(sft, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_targets, sft_path)
    else:
        policy = copy.deepcopy(sft)
    policy.set_dropout(0.0)  # PPO's ratios must be 1 before any update (see ppo_epochs)
    reference = WithoutAdapters(policy) if has_adapters(policy) else frozen(sft)
    if config.ptx_data:
        data_tokenizer = load_data_tokenizer(config.ptx_data)
        if not same_tokenizer(tokenizer, data_tokenizer):
            raise UserError(f"{config.ptx_data}: these shards were made with another tokenizer than the policy's")
    context = sft.config.max_seq_len
    train, val, _ = load_splits(load_prompts, config.prompts, config.val_prompts, config.val_fraction, config.seed,
                                key=lambda p: repr(p[1]))
    train_ids = prompt_ids(train, tokenizer, context, config.max_new_tokens)
    val_ids = prompt_ids(val, tokenizer, context, config.max_new_tokens)
    if not train_ids:
        raise UserError(f"no training prompts left after holding out {len(val_ids)}: give --val-prompts or lower --val-fraction")
    if d.is_main:
        print(f"ppo: {len(train):,} training and {len(val):,} held-out prompts; value model from {config.value_init}"
              + (f"; ptx from {config.ptx_data}" if config.ptx_data else ""))
    questions = {tuple(ids): messages[-1].content for (_, messages), ids in zip(train + val, train_ids + val_ids)}
    task = PPOTask(config, policy, reference, value_model, reward, tokenizer, train_ids, val_ids, device, questions, d)
    return policy, tokenizer, task


def train_ppo(config: PPOConfig, resume_from: Path | None = None) -> Path:
    """RLHF: the SFT policy learns to please the reward model with PPO-ptx; returns the run folder, whose
    checkpoints are the policy (a normal language model: `chatforge chat RUN` talks to it)."""
    def setup(device: torch.device, d: Dist):
        return build_ppo(config, device, resume_from, d)

    return run_stage(config, "ppo", setup, resume_from)


# --- the command: ppo eval --------------------------------------------------------------------------------

@dataclass
class PPOEvalConfig:
    policy: str = field(default="", metadata={"help": "the PPO policy: checkpoint or run folder", "required": True})
    reference: str = field(default="", metadata={"help": "the SFT policy it started from", "required": True})
    reward: str = field(default="", metadata={"help": "the reward model (or a classifier with --reward-label)", "required": True})
    reward_label: str = field(default="", metadata={"help": "with a classifier: the class whose score is the reward"})
    reward_kind: str = field(default="logprob", metadata={
        "help": "with a classifier: reward = logprob (log-probability) or logit of --reward-label"})
    prompts: list[str] = field(default_factory=list, metadata={
        "help": "held-out prompt files (.txt, or .jsonl/.parquet with 'prompt')", "required": True})
    max_new_tokens: int = field(default=64, metadata={"help": "longest answer"})
    seed: int = field(default=0, metadata={"help": "sampling seed, the same for both policies"})
    batch_size: int = field(default=16, metadata={"help": "prompts answered together"})
    out: str = field(default="ppo-eval", metadata={"help": "folder for ppo_eval.json and answers.jsonl"})
    device: str = field(default="auto", metadata={"help": DEVICE_HELP})

    def __post_init__(self):
        require_positive(self, "max_new_tokens", "batch_size")


def eval_ppo(config: PPOEvalConfig) -> dict:
    """`chatforge ppo eval`: both policies answer the held-out prompts with the same seed, the reward model
    scores every answer; writes `out`/ppo_eval.json and `out`/answers.jsonl, prints a table, returns the
    report."""
    device = pick_device(config.device)
    policy, tokenizer, policy_path = load_model(config.policy, device)
    reference, reference_tokenizer, reference_path = load_model(config.reference, device)
    for model, path in ((policy, policy_path), (reference, reference_path)):
        if model.config.head != "lm":
            raise UserError(f"{path}: not a language model (its head is {model.config.head!r})")
    if not same_tokenizer(tokenizer, reference_tokenizer):
        raise UserError(f"{reference_path}: its tokenizer differs from {policy_path}'s")
    _, reward = reward_from_checkpoint(config.reward, tokenizer, device, config.reward_label, config.reward_kind,
                                       config.batch_size)
    prompts, _ = load_prompts(config.prompts)
    ids = prompt_ids(prompts, tokenizer, policy.config.max_seq_len, config.max_new_tokens)
    report = compare_policies(frozen(policy), frozen(reference), reward, tokenizer, ids, config.max_new_tokens,
                              config.seed, config.batch_size)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(out / "answers.jsonl", report["answers"])
    save_json({k: v for k, v in report.items() if k != "answers"}, out / "ppo_eval.json")
    p, r = report["policy"], report["reference"]
    print(f"{report['prompts']:,} held-out prompts\n"
          f"{'':>10} {'reward':>8} {'length':>8} {'finished':>9}\n"
          f"{'PPO':>10} {p['reward']:>+8.3f} {p['length']:>8.1f} {p['finished']:>9.0%}\n"
          f"{'SFT':>10} {r['reward']:>+8.3f} {r['length']:>8.1f} {r['finished']:>9.0%}\n"
          f"win rate of PPO over SFT under the reward model: {report['win_rate']:.1%}\n"
          f"KL(PPO || SFT): {report['kl_per_answer']:.3f} nats per answer")
    print(f"-> {out}/ppo_eval.json, {out}/answers.jsonl")
    return report
