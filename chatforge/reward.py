"""Stage 3, the reward model: a score r(x, y) of answer y to prompt x, learned from people's rankings.

People rank K answers to a prompt; each of the C(K,2) pairs says "y_w is better than y_l". The loss is
InstructGPT's (Ouyang et al. 2022, equation 1):

    loss(θ) = -1/C(K,2) · E_{(x, y_w, y_l) ~ D} [ log σ(r_θ(x, y_w) − r_θ(x, y_l)) ]

done the way the paper does it: the K answers of a prompt are one batch element, each answer is forwarded
once, and all C(K,2) differences come from those K scores. The 1/C(K,2) makes every prompt weigh the same
however many answers it has. Options: a margin inside σ, and a centering term λ·E[r²] that keeps scores
near 0 (Eisenstein et al. 2023). Both are in `chatforge/objectives.py` (`ranking_loss`, `centering_penalty`).

The model is the SFT model with the LM head replaced by a scalar head, read at the <|end|> that closes the
answer. What it reads is built by one function, `reward_ids`, from the answer's token ids as they were
sampled (`chatforge sample` stores them beside the text), in training, `reward eval`, `reward score` and
PPO alike; an answer cut off at the length limit is closed with an appended <|end|> everywhere. When
training ends, the mean score of the training answers (with `chatforge sample`, the SFT model's own
answers) is stored as the model's `score_offset`, so they average 0 before RL. InstructGPT shifted its
reward the same way, to its labelers' demonstrations.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from chatforge.chat_format import Message, check_conversation, check_text, prompt_messages, render
from chatforge.checkpoint import load_model
from chatforge.data import load_splits, parse_records
from chatforge.errors import UserError
from chatforge.model import GPT, with_head
from chatforge.objectives import centering_penalty, ranking_loss
from chatforge.runtime import Dist, all_reduce_sum
from chatforge.tokenizer import END_OF_TURN, Tokenizer
from chatforge.train import (
    FineTuneConfig, FineTuneTask, process_share, resolve_run_config, run_stage, set_max_steps_from_epochs,
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


# --- comparisons ---------------------------------------------------------------------------------------

@dataclass
class Comparison:
    """K answers to one prompt, ranked: `ranking` lists answer indices, best first. `answer_ids` and
    `finished` hold each answer's tokens as sampled and whether it ended (None: only the text is known)."""

    prompt: list[Message]
    answers: list[str]
    ranking: list[int]
    answer_ids: list[list[int]] | None = None
    finished: list[bool] | None = None


HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def hh_dialogue(text: str) -> list[Message]:
    """An Anthropic-HH dialogue ("\\n\\nHuman: ...\\n\\nAssistant: ...") as messages."""
    parts = HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise ValueError("expected a dialogue of '\\n\\nHuman: ' and '\\n\\nAssistant: ' turns")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [Message(roles[parts[i]], parts[i + 1].strip()) for i in range(1, len(parts), 2)]


def _dialogue(value) -> list[Message]:
    if isinstance(value, str):
        return hh_dialogue(value)
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        return [Message(m.get("role"), m.get("content")) for m in value]
    raise ValueError("'chosen' and 'rejected' must be dialogue strings or lists of {role, content} messages")


def _answer(value, name: str) -> str:
    """An answer given as text, or as the conversational format's [{"role": "assistant", "content": ...}]."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) and value[0].get("role") == "assistant":
        value = value[0].get("content")
    if not isinstance(value, str):
        raise ValueError(f"{name!r} must be a string (or one assistant message)")
    return value


def comparison_from_record(record: dict) -> Comparison:
    """A checked comparison from any of the accepted formats; ValueError names what is wrong."""
    if "completions" in record or "ranking" in record:
        prompt = prompt_messages(record.get("prompt"))
        answers, ranking = record.get("completions"), record.get("ranking")
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise ValueError("'completions' must be a list of strings")
        if (not isinstance(ranking, list) or not all(type(r) is int for r in ranking)
                or sorted(ranking) != list(range(len(answers)))):
            raise ValueError(f"'ranking' must list every completion index 0..{len(answers) - 1} once, best first")
    elif "chosen" in record and "rejected" in record:
        if "prompt" in record:
            prompt = prompt_messages(record["prompt"])
            answers = [_answer(record["chosen"], "chosen"), _answer(record["rejected"], "rejected")]
        else:  # whole dialogues that differ in their last answer (Anthropic HH)
            chosen, rejected = _dialogue(record["chosen"]), _dialogue(record["rejected"])
            for dialogue in (chosen, rejected):
                check_conversation(dialogue)
            if chosen[:-1] != rejected[:-1]:
                raise ValueError("'chosen' and 'rejected' differ before their last answer")
            prompt, answers = chosen[:-1], [chosen[-1].content, rejected[-1].content]
        ranking = [0, 1]
    else:
        raise ValueError("expected {prompt, completions, ranking}, {prompt, chosen, rejected} or {chosen, rejected}")
    if len(answers) < 2:
        raise ValueError("a comparison needs at least 2 answers")
    for i, answer in enumerate(answers):  # an empty answer may be ranked (last, usually): it is what models do
        check_text(answer, f"answer {i}")
    ids, finished = sampled_tokens(record, len(answers), "completion_ids", "finish_reasons")
    return Comparison(prompt, answers, list(ranking), ids, finished)


# --- what a reward model reads ----------------------------------------------------------------------------

def reward_ids(prompt_ids: Sequence[int], answer_ids: Sequence[int], finished: bool, end_id: int) -> list[int]:
    """The token ids a reward model reads, for every use of it (training, `reward eval`, `reward score`,
    the pipeline and PPO): the prompt as rendered for the assistant to answer, the answer's tokens as they
    were sampled (never re-encoded from its text, which can split into other tokens), and <|end|>, where the
    score is read. A finished answer already ends in the <|end|> it sampled (one stopped by another stop
    token gets one appended). An answer that did not finish (cut off at the length limit) gets one appended,
    so that every score is read at the position the head learned to score; PPO subtracts its explicit
    `unfinished_penalty` from such an answer's score besides. An answer said to be cut off that ends in
    <|end|> is a ValueError: its record is inconsistent."""
    ended = bool(answer_ids) and answer_ids[-1] == end_id
    if ended and not finished:
        raise ValueError("an answer ending in <|end|> is said to be cut off ('length')")
    return [*prompt_ids, *answer_ids] + ([] if ended else [end_id])


def sampled_tokens(record: dict, count: int, ids_field: str, reasons_field: str) -> tuple[list[list[int]] | None, list[bool] | None]:
    """(token ids as sampled, finished) of a record's `count` answers, from `ids_field` (lists of token ids)
    and `reasons_field` ("stop" or "length" each) as `chatforge sample` writes them; (None, None) when the
    record has only text. ValueError names what is wrong."""
    ids, reasons = record.get(ids_field), record.get(reasons_field)
    if reasons is not None and (not isinstance(reasons, list) or len(reasons) != count
                                or not all(r in ("stop", "length") for r in reasons)):
        raise ValueError(f"{reasons_field!r} must list 'stop' or 'length' for each of the {count} answers")
    if ids is None:
        return None, None if reasons is None else [r == "stop" for r in reasons]
    if (not isinstance(ids, list) or len(ids) != count
            or not all(isinstance(a, list) and all(type(t) is int and t >= 0 for t in a) for a in ids)):
        raise ValueError(f"{ids_field!r} must hold a list of token ids for each of the {count} answers")
    return ids, [True] * count if reasons is None else [r == "stop" for r in reasons]


def encode_answers(prompt: list[Message], answers: list[str], answer_ids: list[list[int]] | None,
                   finished: list[bool] | None, tokenizer: Tokenizer, made_with: str | None) -> list[list[int]]:
    """`reward_ids` of each answer to `prompt`: from its sampled token ids when there are some, else from
    its text, encoded once (a written answer counts as finished unless its finish reason says otherwise).
    `made_with` is the fingerprint of the tokenizer that sampled the ids (None: not recorded). Ids that do
    not decode to their answer's text are refused: the reward model would learn from other answers than
    the ones ranked."""
    end = tokenizer.special[END_OF_TURN]
    if answer_ids is not None:
        if made_with is not None and made_with != tokenizer.fingerprint:
            raise ValueError(f"its token ids were sampled with another tokenizer ({made_with}, this model's is "
                             f"{tokenizer.fingerprint}): drop 'completion_ids' to encode the text instead")
        for i, (text, ids) in enumerate(zip(answers, answer_ids)):
            if any(t >= tokenizer.vocab_size for t in ids):
                raise ValueError(f"answer {i}: a token id is outside the model's vocabulary ({tokenizer.vocab_size} tokens)")
            if tokenizer.decode(ids, skip_special=True).strip() != text.strip():
                raise ValueError(f"answer {i}: its completion_ids do not decode to its text")
    else:
        answer_ids = [tokenizer.encode(a) for a in answers]
    finished = finished or [True] * len(answers)
    prompt_ids = render(prompt, tokenizer, add_generation_prompt=True)
    return [reward_ids(prompt_ids, a, f, end) for a, f in zip(answer_ids, finished)]


def text_ids(text: str, tokenizer: Tokenizer) -> list[int]:
    """What a classifier reads: <|bos|> text <|eos|>, classified at the <|eos|>."""
    return [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id]


@dataclass
class RankedAnswers:
    """A tokenized comparison: one sequence per answer (the prompt's `prompt_tokens` tokens, then the
    answer), the ranking (indices, best first), and a key naming the prompt."""

    sequences: list[np.ndarray]
    ranking: list[int]
    where: str
    prompt_tokens: int = 0
    key: str = ""

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.sequences)


def load_groups(paths: list[str], tokenizer: Tokenizer, max_seq_len: int, skip_invalid: bool) -> tuple[list[RankedAnswers], int]:
    """Tokenized comparisons of `paths`, and how many invalid records were skipped."""

    def parse(record: dict) -> tuple[Comparison, list[list[int]]]:
        comparison = comparison_from_record(record)
        sequences = encode_answers(comparison.prompt, comparison.answers, comparison.answer_ids, comparison.finished,
                                   tokenizer, record.get("tokenizer"))
        longest = max(map(len, sequences))
        if longest > max_seq_len:
            raise ValueError(f"{longest} tokens, longer than the model's context ({max_seq_len})")
        return comparison, sequences

    items, skipped = parse_records(paths, parse, skip_invalid, "comparison")
    groups = [RankedAnswers([np.array(s, dtype=np.int64) for s in sequences], c.ranking, where,
                    prompt_tokens=len(render(c.prompt, tokenizer, add_generation_prompt=True)),
                    key=repr([(m.role, m.content) for m in c.prompt]))
              for where, (c, sequences) in items]
    return groups, skipped


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
        ids, lengths = right_pad([s for g in groups for s in g.sequences], self.tokenizer.pad_id)
        return ids.to(self.device), lengths, [len(g.sequences) for g in groups], [g.ranking for g in groups]

    def _group_scores(self, model, batch) -> list[torch.Tensor]:
        ids, lengths, sizes, _ = batch
        return list(last_token_outputs(model, ids, lengths).float().split(sizes))

    def loss(self, model, batch) -> torch.Tensor:
        """Σ over this micro-batch's prompts of (ranking loss + λ·E[r²]), times this process's share
        (world size / prompts in the step): the step's loss is the mean over its prompts."""
        collated, share = batch
        total = 0.0
        for scores, ranking in zip(self._group_scores(model, collated), collated[3]):
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
            for scores, ranking in zip(self._group_scores(model, batch), batch[3]):
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
            sft_model, tokenizer, _ = load_model(config.init, device)
            if sft_model.config.head != "lm":
                raise UserError(f"{config.init}: the reward model starts from a language model (SFT), "
                                f"this checkpoint has a {sft_model.config.head} head")
            model = with_head(sft_model, "scalar")
        max_len = model.config.max_seq_len
        train, val, skipped = load_splits(lambda paths: load_groups(paths, tokenizer, max_len, config.skip_invalid),
                                          config.data, config.val_data, config.val_fraction, config.seed,
                                          key=lambda g: g.key)  # a prompt ranked by several people: one side
        if d.is_main:
            pairs = sum(math.comb(len(g.sequences), 2) for g in train)
            print(f"reward: {len(train):,} training prompts ({pairs:,} pairs), {len(val):,} held out"
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
    sequences = [s for g in groups for s in g.sequences]
    flat = score_sequences(model, sequences, pad_id, batch_size)
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


def answers_to_score(record: dict, model: GPT, tokenizer: Tokenizer) -> list[list[int]]:
    """What `model` reads for each answer of a record to score: {prompt, completion} or {prompt,
    completions: [...]}, with the sampled token ids and finish reasons when the record has them
    (`completion_ids` and `finish_reasons`, or `completion_ids` and `finish_reason` for one completion).
    A reward model reads `reward_ids`; a classifier (trained on plain text) the answer's text alone."""
    prompt = prompt_messages(record.get("prompt"))
    one = "completion" in record
    answers = [record["completion"]] if one else record.get("completions")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError("expected 'completion' (a string) or 'completions' (a list of strings)")
    for i, answer in enumerate(answers):
        check_text(answer, f"answer {i}")
    if model.config.head == "classifier":
        return [text_ids(a, tokenizer) for a in answers]
    if one:  # one completion: its fields hold one value each
        fields = {key: [record[key]] for key in ("completion_ids", "finish_reason") if key in record}
        ids, finished = sampled_tokens(fields, 1, "completion_ids", "finish_reason")
    else:
        ids, finished = sampled_tokens(record, len(answers), "completion_ids", "finish_reasons")
    return encode_answers(prompt, answers, ids, finished, tokenizer, record.get("tokenizer"))
