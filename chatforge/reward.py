"""Stage 3, the reward model: a score r(x, y) of answer y to prompt x, learned from people's rankings.

People rank K answers to a prompt; each of the C(K,2) pairs says "y_w is better than y_l". The loss is
InstructGPT's (Ouyang et al. 2022, equation 1):

    loss(θ) = -1/C(K,2) · E_{(x, y_w, y_l) ~ D} [ log σ(r_θ(x, y_w) − r_θ(x, y_l)) ]

done the way the paper does it: the K answers of a prompt are one batch element, each answer is forwarded
once, and all C(K,2) differences come from those K scores. The 1/C(K,2) makes every prompt weigh the same
however many answers it has. Options: a margin inside σ, and a centering term λ·E[r²] that keeps scores
near 0 (Eisenstein et al. 2023). Both are in `chatforge/objectives.py` (`ranking_loss`, `centering_penalty`).

The model is the SFT model with the LM head replaced by a scalar head, read at the <|end|> that closes the
answer. What it reads is built by one function, `comparisons.reward_ids`, from the answer's token ids as
they were sampled (`chatforge sample` stores them beside the text), in training, `reward eval`, `reward
score` and PPO alike; an answer cut off at the length limit is closed with an appended <|end|>
everywhere. When training ends, the mean score of the training answers (with `chatforge sample`, the SFT
model's own answers) is stored as the model's `score_offset`, so they average 0 before RL. InstructGPT
shifted its reward the same way, to its labelers' demonstrations.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from chatforge.checkpoint import load_model
from chatforge.comparisons import RankedAnswers, answers_to_score, load_groups
from chatforge.config import DEVICE_HELP, require_positive, save_json
from chatforge.data import load_splits
from chatforge.errors import UserError
from chatforge.files import atomic_write_jsonl
from chatforge.model import GPT
from chatforge.objectives import centering_penalty, ranking_loss
from chatforge.packing import pack_shared_prefix, packed_outputs
from chatforge.plots import plot_calibration
from chatforge.runtime import Dist, all_reduce_sum, pick_device
from chatforge.sources import parse_records
from chatforge.tokenizer import Tokenizer
from chatforge.train import (
    FineTuneConfig, FineTuneTask, fine_tuning_start, process_share, resolve_run_config, run_stage,
    set_max_steps_from_epochs,
)


@dataclass
class RewardConfig(FineTuneConfig):
    init: str = field(default="", metadata={"help": "SFT checkpoint (or run folder) to start from"})
    data: list[str] = field(default_factory=list, metadata={
        "help": "comparison files (.jsonl/.parquet): rankings {prompt, completions, ranking}, pairs "
                "{prompt, chosen, rejected}, or Anthropic-HH {chosen, rejected} dialogues"})
    val_fraction: float = field(default=0.1, metadata={"help": "share of --data prompts held out when no --val-data"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the training prompts (InstructGPT: 1); sets max_steps when > 0"})
    margin: float = field(default=0.0, metadata={"help": "required score gap: log σ(r_w − r_l − margin)"})
    center_coef: float = field(default=0.0, metadata={"help": "weight λ of the centering term λ·E[r²] (0: off; 0.01 is common)"})


# --- scores and the loss -------------------------------------------------------------------------------

def right_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids padded on the right, and each row's length."""
    lengths = torch.tensor([len(s) for s in sequences])
    ids = torch.full((len(sequences), int(lengths.max())), pad_id, dtype=torch.long)
    for row, s in enumerate(sequences):
        ids[row, : len(s)] = torch.as_tensor(np.asarray(s), dtype=torch.long)
    return ids, lengths


def last_token_outputs(model: torch.nn.Module, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The head's output for each right-padded row at its last real token (causal attention: the padding
    after it never changes it). ids (B, T), lengths (B,) -> (B,) scores, or (B, C) classifier logits."""
    outputs = model(ids)
    return outputs[torch.arange(len(lengths), device=outputs.device), lengths.to(outputs.device) - 1]


def reward_head(model: GPT, label: str | None = None, kind: str = "logprob") -> Callable[[torch.Tensor], torch.Tensor]:
    """How a model's last-token outputs become one reward per sequence: a reward model's score as it is;
    a classifier's log-probability (or logit) of class `label`, the classic "make the answers positive"
    reward."""
    if model.config.head == "scalar":
        return lambda outputs: outputs
    if model.config.head != "classifier":
        raise UserError(f"a {model.config.head!r} model gives no reward: use a reward model or a classifier")
    if label not in model.config.labels:
        raise UserError(f"a classifier's reward needs --label, one of its classes: {', '.join(model.config.labels)}")
    if kind not in ("logprob", "logit"):
        raise UserError(f"--kind must be 'logprob' or 'logit', got {kind!r}")
    index = model.config.labels.index(label)
    if kind == "logit":
        return lambda outputs: outputs[:, index]
    return lambda outputs: outputs.float().log_softmax(-1)[:, index]


def pairs_ordered(scores: torch.Tensor, ranking: Sequence[int]) -> tuple[int, int]:
    """(pairs the scores order as the ranking does, all C(K,2) pairs); a tie counts as wrong."""
    ordered = scores[torch.as_tensor(ranking, device=scores.device)]
    above = torch.ones(len(ranking), len(ranking), dtype=torch.bool, device=scores.device).triu(diagonal=1)
    return int(((ordered[:, None] - ordered[None, :])[above] > 0).sum()), int(above.sum())


class RewardTask(FineTuneTask):
    """Batches of `batch_size` prompts, each with all its answers; each micro-batch pads its answers on
    the right and reads every score at the answer's last token."""

    def __init__(self, config: RewardConfig, tokenizer: Tokenizer, train: list[RankedAnswers], val: list[RankedAnswers],
                 d: Dist, device: torch.device):
        super().__init__(config, tokenizer, train, val, d, device, [g.tokens for g in train], "prompts")
        mean_tokens = float(np.mean([g.tokens for g in train]))
        self.seq_len = round(mean_tokens / np.mean([len(g.sequences) for g in train]))
        self.tokens_per_step = round(mean_tokens * config.batch_size)

    def micro_batches(self, step: int, accumulation: int):
        groups = self.step_items(step)
        for part in process_share(groups, self.d, accumulation):
            yield self._collate(part), self.d.world_size / len(groups)

    def _collate(self, groups: list[RankedAnswers]):
        packed = pack_shared_prefix([g.sequences for g in groups], self.tokenizer.pad_id)
        return packed.to(self.device), [g.ranking for g in groups]

    def _group_scores(self, model, batch) -> list[torch.Tensor]:
        packed, _ = batch
        return list(packed_outputs(model, packed).float().split(packed.sizes))

    def loss(self, model, batch) -> torch.Tensor:
        """Σ over this micro-batch's prompts of (ranking loss + λ·E[r²]), times this process's share
        (world size / prompts in the step): the step's loss is the mean over its prompts."""
        collated, share = batch
        total = 0.0
        for scores, ranking in zip(self._group_scores(model, collated), collated[1]):
            total = total + ranking_loss(scores, ranking, self.config.margin)
            if self.config.center_coef:
                total = total + self.config.center_coef * centering_penalty(scores)
        return total * share

    def evaluate(self, model) -> dict[str, float]:
        if not self.val:  # nothing held out (a validation fraction of 0)
            return {}
        held_out = self.held_out()
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss sum, prompts, pairs right, pairs
        for start in range(0, len(held_out), self.config.micro_batch_size):
            batch = self._collate(held_out[start : start + self.config.micro_batch_size])
            for scores, ranking in zip(self._group_scores(model, batch), batch[1]):
                right, pairs = pairs_ordered(scores, ranking)
                sums += torch.tensor([ranking_loss(scores, ranking).item(), 1, right, pairs], device=self.device)
        loss, prompts, right, pairs = all_reduce_sum(sums, self.d).tolist()
        return {"val_loss": loss / max(prompts, 1), "val_accuracy": right / max(pairs, 1)}

    def finish(self, model: GPT) -> None:
        """Shift the scores so that the training answers average 0."""
        mine = self.train[self.d.rank :: self.d.world_size]
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for start in range(0, len(mine), self.config.micro_batch_size):
                scores = torch.cat(self._group_scores(model, self._collate(mine[start : start + self.config.micro_batch_size])))
                sums += torch.stack([scores.sum().double(), torch.tensor(len(scores), device=self.device, dtype=torch.float64)])
        model.train(was_training)
        total, count = all_reduce_sum(sums, self.d).tolist()
        model.config = dataclasses.replace(model.config, score_offset=model.config.score_offset + total / count)


def resolve_config(preset: str | None, overrides: dict, resume: str | None) -> tuple[RewardConfig, Path | None]:
    return resolve_run_config(RewardConfig, "reward", preset, overrides, resume, needs={
        "init": "CHECKPOINT (the SFT model)", "data": "FILE [FILE ...] (rankings)"})


def train_reward_model(config: RewardConfig, resume_from: Path | None = None) -> Path:
    """Train a reward model from an SFT checkpoint on ranked answers; returns the run folder."""

    def setup(device: torch.device, d: Dist):
        if resume_from is not None:
            model, tokenizer, _ = load_model(resume_from, device)
        else:
            sft_model, tokenizer, path = load_model(config.init, device)
            if sft_model.config.head != "lm":
                raise UserError(f"{config.init}: the reward model starts from a language model (SFT), "
                                f"this checkpoint has a {sft_model.config.head} head")
            model = fine_tuning_start(sft_model, tokenizer, path, config, head="scalar")
        max_len = model.config.max_seq_len
        train, val, skipped = load_splits(lambda paths: load_groups(paths, tokenizer, max_len, config.skip_invalid),
                                          config.data, config.val_data, config.val_fraction, config.seed,
                                          key=lambda g: g.key)  # a prompt ranked by several people: one side
        if d.is_main:
            pairs = sum(math.comb(len(g.sequences), 2) for g in train)
            truncated = sum(g.truncated for g in train + val)
            print(f"reward: {len(train):,} training prompts ({pairs:,} pairs), {len(val):,} held out"
                  + (f", {truncated:,} prompt(s) cut to the context (oldest turns first)" if truncated else "")
                  + (f", {skipped:,} invalid record(s) skipped" if skipped else ""))
        task = RewardTask(config, tokenizer, train, val, d, device)
        set_max_steps_from_epochs(config, task.steps_per_epoch)
        return model, tokenizer, task

    return run_stage(config, "reward", setup, resume_from)


# --- using a reward model ------------------------------------------------------------------------------

@torch.inference_mode()
def score_sequences(model: GPT, sequences: Sequence[Sequence[int]], pad_id: int, batch_size: int = 16,
                    to_reward: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[float]:
    """The reward of each token sequence (prompt and answer, rendered), in batches of similar length;
    `to_reward` (see `reward_head`) turns a classifier's outputs into rewards."""
    to_reward = to_reward or reward_head(model)
    was_training = model.training
    model.eval()
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    scores = [0.0] * len(sequences)
    device = model.embed_tokens.weight.device
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        ids, lengths = right_pad([sequences[i] for i in rows], pad_id)
        for row, score in zip(rows, to_reward(last_token_outputs(model, ids.to(device), lengths)).float().tolist()):
            scores[row] = score
    model.train(was_training)
    return scores


@torch.inference_mode()
def score_groups(model: GPT, groups: Sequence[Sequence[Sequence[int]]], pad_id: int, batch_size: int = 16) -> list[float]:
    """The reward of each sequence of each group (the answers to one prompt), flattened: groups packed with
    their shared prompt once (`pack_shared_prefix`), about `batch_size` sequences per forward pass."""
    was_training = model.training
    model.eval()
    device = model.embed_tokens.weight.device
    scores, start = [], 0
    while start < len(groups):
        end, answers = start, 0
        while end < len(groups) and (end == start or answers + len(groups[end]) <= batch_size):
            answers += len(groups[end])
            end += 1
        scores += packed_outputs(model, pack_shared_prefix(groups[start:end], pad_id).to(device)).float().tolist()
        start = end
    model.train(was_training)
    return scores


def calibration_bins(predicted: list[float], won: list[bool], bins: int = 10) -> list[dict]:
    """Pairs binned by predicted P(win): each bin's mean prediction, observed win rate and count."""
    out = []
    for b in range(bins):
        inside = [(p, w) for p, w in zip(predicted, won) if b / bins <= p < (b + 1) / bins or (b == bins - 1 and p == 1)]
        out.append({"predicted": float(np.mean([p for p, _ in inside])) if inside else (b + 0.5) / bins,
                    "observed": float(np.mean([w for _, w in inside])) if inside else 0.0, "count": len(inside)})
    return out


def expected_calibration_error(bins: list[dict]) -> float:
    """Σ_bins (count / total) · |observed − predicted|."""
    total = sum(b["count"] for b in bins)
    return sum(b["count"] * abs(b["observed"] - b["predicted"]) for b in bins) / max(total, 1)


def evaluate_rankings(model: GPT, groups: list[RankedAnswers], pad_id: int, batch_size: int = 16) -> dict:
    """Held-out pairwise accuracy, calibration, and how much the reward follows answer length (in tokens).

    Calibration shows each pair in an order fixed by a hash (the winner first about half of the time), so
    that "predicted P(first wins) = σ(r₁ − r₂)" can be compared with how often the first did win.
    """
    flat = score_groups(model, [g.sequences for g in groups], pad_id, batch_size)
    right = pairs = 0
    predicted, won = [], []
    offset = 0
    for g in groups:
        scores = flat[offset : offset + len(g.sequences)]
        offset += len(g.sequences)
        for i, j in itertools.combinations(range(len(g.ranking)), 2):
            winner, loser = g.ranking[i], g.ranking[j]
            right += scores[winner] > scores[loser]
            pairs += 1
            winner_first = hash_bit(g.key, g.ranking[i], g.ranking[j])
            first, second = (winner, loser) if winner_first else (loser, winner)
            predicted.append(0.5 * (1 + math.tanh((scores[first] - scores[second]) / 2)))  # σ, without overflow
            won.append(winner_first)
    lengths = [len(s) - g.prompt_tokens for g in groups for s in g.sequences]  # the answers' tokens
    bins = calibration_bins(predicted, won)
    return {
        "prompts": len(groups), "pairs": pairs, "accuracy": right / max(pairs, 1),
        "mean_reward": float(np.mean(flat)), "std_reward": float(np.std(flat)),
        "length_correlation": float(np.corrcoef(flat, lengths)[0, 1]) if np.std(lengths) and np.std(flat) else 0.0,
        "calibration_error": expected_calibration_error(bins), "calibration": bins,
    }


def hash_bit(*key) -> bool:
    """A fixed coin flip per key (no RNG state, the same in every run)."""
    return hashlib.blake2b(repr(key).encode(), digest_size=1).digest()[0] & 1 == 1


# --- the commands: reward eval, reward score -----------------------------------------------------------

@dataclass
class RewardEvalConfig:
    checkpoint: str = field(default="", metadata={"help": "reward model checkpoint, or its run folder", "positional": True})
    data: list[str] = field(default_factory=list, metadata={
        "help": "held-out comparison files (formats as for `reward train`)", "required": True})
    out: str = field(default="reward-eval", metadata={"help": "folder for reward_eval.json and calibration.png"})
    skip_invalid: bool = field(default=False, metadata={"help": "count and skip invalid records instead of stopping"})
    batch_size: int = field(default=16, metadata={"help": "answers per forward pass"})
    device: str = field(default="auto", metadata={"help": DEVICE_HELP})

    def __post_init__(self):
        require_positive(self, "batch_size")


@dataclass
class RewardScoreConfig:
    checkpoint: str = field(default="", metadata={"help": "reward model checkpoint, or its run folder", "positional": True})
    input: str = field(default="", metadata={
        "help": "JSONL file of {prompt, completion} or {prompt, completions}", "required": True})
    out: str = field(default="", metadata={"help": "JSONL file to write (the records with their rewards)", "required": True})
    label: str = field(default="", metadata={
        "help": "with a classifier (`chatforge classify train`): the class whose score is the reward"})
    kind: str = field(default="logprob", metadata={
        "help": "with a classifier: reward = logprob (log-probability) or logit of --label"})
    skip_invalid: bool = field(default=False, metadata={"help": "count and skip invalid records instead of stopping"})
    batch_size: int = field(default=16, metadata={"help": "answers per forward pass"})
    device: str = field(default="auto", metadata={"help": DEVICE_HELP})

    def __post_init__(self):
        require_positive(self, "batch_size")
        if self.kind not in ("logprob", "logit"):
            raise ValueError(f"kind must be logprob or logit, got {self.kind!r}")


def load_scorer(checkpoint: str, device: str) -> tuple[GPT, Tokenizer, Path]:
    """A reward model or a classifier (whose class can be the reward), for scoring."""
    model, tokenizer, path = load_model(checkpoint, pick_device(device))
    if model.config.head == "lm":
        raise UserError(f"{path}: a language model, not a reward model or classifier")
    return model, tokenizer, path


def eval_reward_model(config: RewardEvalConfig) -> dict:
    """`chatforge reward eval`: accuracy, calibration and length bias on held-out rankings, written to
    `out`/reward_eval.json and `out`/calibration.png; the report."""
    model, tokenizer, path = load_scorer(config.checkpoint, config.device)
    if model.config.head != "scalar":
        raise UserError(f"{path}: `reward eval` measures reward models; evaluate a classifier with `classify eval`")
    groups, skipped = load_groups(config.data, tokenizer, model.config.max_seq_len, config.skip_invalid)
    report = {**evaluate_rankings(model, groups, tokenizer.pad_id, config.batch_size),
              "truncated": sum(g.truncated for g in groups), "skipped": skipped}
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    save_json(report, out / "reward_eval.json")
    plot_calibration(report["calibration"], out / "calibration.png", f"calibration: {config.checkpoint}")
    print(f"{report['prompts']:,} prompts, {report['pairs']:,} pairs: accuracy {report['accuracy']:.1%}, "
          f"calibration error {report['calibration_error']:.3f}, reward {report['mean_reward']:+.3f} "
          f"± {report['std_reward']:.3f}, correlation with length {report['length_correlation']:+.2f}"
          + (f"; {report['truncated']:,} prompt(s) cut to the context" if report["truncated"] else "")
          + (f"; {skipped:,} invalid record(s) skipped" if skipped else ""))
    if abs(report["length_correlation"]) > 0.5:
        print("warning: the reward follows answer length closely; PPO may learn to game it with long (or short) answers")
    print(f"-> {out}/reward_eval.json, {out}/calibration.png")
    return report


def score_answers(config: RewardScoreConfig) -> int:
    """`chatforge reward score`: each record of `input` with its answers' rewards, written to `out`; the
    number of answers scored."""
    model, tokenizer, _ = load_scorer(config.checkpoint, config.device)
    to_reward = reward_head(model, config.label or None, config.kind)
    context = model.config.max_seq_len

    def parse(record: dict) -> tuple[dict, list[list[int]]]:
        sequences = answers_to_score(record, model, tokenizer)
        if max(map(len, sequences)) > context:
            raise ValueError(f"{max(map(len, sequences))} tokens, longer than the model's context ({context})")
        return record, sequences

    items, skipped = parse_records([config.input], parse, config.skip_invalid, what="answer")
    sequences = [s for _, (_, seqs) in items for s in seqs]
    scores = iter(score_sequences(model, sequences, tokenizer.pad_id, config.batch_size, to_reward))
    records = []
    for _, (record, seqs) in items:
        rewards = [next(scores) for _ in seqs]
        records.append({**record, **({"reward": rewards[0]} if "completion" in record else {"rewards": rewards})})
    Path(config.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(config.out, records)
    print(f"scored {len(sequences):,} answer(s) -> {config.out}"
          + (f" ({skipped:,} invalid record(s) skipped)" if skipped else ""))
    return len(sequences)
