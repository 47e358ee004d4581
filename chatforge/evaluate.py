"""Evaluation: held-out perplexity in bits per byte, answers to questions, multiple choice by
log-likelihood (zero-shot and few-shot, so in-context learning is measured too), and one policy against
another (reward, win rate, KL, answer length: `ppo eval`, the demo's report).

Bits per byte rather than per token, so that models with different tokenizers compare:

    bpb = Σ_t −log p(x_t | x_<t) / (ln 2 · bytes of the text predicted)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from chatforge.chat_format import Message, render
from chatforge.data import TokenWindows
from chatforge.engine import Completion, SamplingParams, generate_batch
from chatforge.model import GPT
from chatforge.packing import pack_shared_prefix, shared_prefix
from chatforge.rollout import Reward, answer_texts, rollout, score_rollout
from chatforge.tokenizer import Tokenizer

LETTERS = "ABCD"


def token_bytes(tokenizer: Tokenizer) -> torch.Tensor:
    """Bytes of text each token id stands for (0 for special tokens). Byte-level BPE writes each byte as one
    character of its alphabet, so a token's string length is its byte count."""
    special = set(tokenizer.special.values())
    counts = torch.zeros(tokenizer.vocab_size, dtype=torch.long)
    for token, index in tokenizer.hf.get_vocab().items():
        if index not in special:
            counts[index] = len(token)
    return counts


@torch.no_grad()
def bits_per_byte(model: GPT, tokenizer: Tokenizer, data_dir: str, batches: int = 8, batch_size: int = 8,
                  seq_len: int | None = None) -> float:
    """Bits per byte of the validation split's first `batches` x `batch_size` windows."""
    seq_len = seq_len or model.config.max_seq_len
    windows = TokenWindows(data_dir, "val", seq_len, mode="sequential")
    device = model.embed_tokens.weight.device
    sizes = token_bytes(tokenizer)
    nats, size = 0.0, 0
    was_training = model.training
    model.eval()
    for i in range(batches):
        inputs, targets = windows.batch(i, batch_size)
        logits = model(inputs.to(device)).float()
        losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.to(device).flatten(), reduction="none")
        text = (sizes[targets] > 0).flatten().to(device)  # predicting <|bos|> is not predicting text
        nats += float(losses[text].sum())
        size += int(sizes[targets].sum())
    model.train(was_training)
    return nats / (math.log(2) * max(size, 1))


def answer_questions(model: GPT, tokenizer: Tokenizer, questions: Sequence[str], max_new_tokens: int,
                     temperature: float = 0.0, seed: int = 0, batch_size: int = 32) -> list[Completion]:
    """The model's reply to each question as a one-turn chat (greedy by default): its tokens as sampled,
    its finish reason and its text, stripped."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    stop = (tokenizer.end_id,)
    replies = []
    for start in range(0, len(questions), batch_size):
        prompts = [question_ids(q, tokenizer) for q in questions[start : start + batch_size]]
        for (completion,) in generate_batch(model, prompts, params, stop_ids=stop, tokenizer=tokenizer):
            completion.text = completion.text.strip()
            replies.append(completion)
    return replies


def question_ids(question: str, tokenizer: Tokenizer) -> list[int]:
    """A question as a one-turn chat, rendered for the assistant to answer."""
    return render([Message("user", question)], tokenizer, add_generation_prompt=True)


@dataclass
class MultipleChoice:
    """A question with four options, `answer` the index of the right one."""

    question: str
    options: list[str]
    answer: int

    def text(self) -> str:
        return self.question + "\n" + "\n".join(f"{LETTERS[i]}) {o}" for i, o in enumerate(self.options)) + \
            "\nAnswer with a letter."


    def reply(self, index: int) -> str:
        return f"{LETTERS[index]}) {self.options[index]}"


@torch.no_grad()
def continuation_logprobs(model: GPT, prefix: list[int], continuations: Sequence[list[int]]) -> list[float]:
    """Mean log-probability per token of each continuation after `prefix` (see `choice_logprobs`)."""
    return choice_logprobs(model, [(prefix, continuations)])[0]


@torch.no_grad()
def choice_logprobs(model: GPT, questions: Sequence[tuple[list[int], Sequence[list[int]]]],
                    batch_size: int = 8, per_row: int | None = None) -> list[list[float]]:
    """For each (prefix, continuations): the mean log-probability per token of each continuation after the
    prefix. Each question's prefix goes through the model once, each continuation after it
    (`pack_shared_prefix`); `batch_size` questions go through the model together, `per_row` of them in one
    row after the tokens their prefixes share (a few-shot prompt). By default 4 a row when the shared
    tokens outnumber a question's own, else 1: a longer row costs more attention than it saves otherwise.
    A prefix is cut from the left when a sequence would not fit the context."""
    context = model.config.max_seq_len
    device = model.embed_tokens.weight.device
    scores = []
    for first in range(0, len(questions), batch_size):
        groups, cut = [], []
        for prefix, continuations in questions[first : first + batch_size]:
            longest = max(map(len, continuations))
            if longest >= context:
                raise ValueError(f"a continuation of {longest} tokens leaves no room for its context ({context} tokens)")
            prefix = prefix[-(context - longest):]
            groups.append([prefix + c for c in continuations])
            cut.append((len(prefix), continuations))
        row_size = per_row
        if row_size is None:
            common = shared_prefix([group[0][:length] for group, (length, _) in zip(groups, cut)])
            row_size = 4 if common > np.mean([length - common + sum(map(len, cs)) for length, cs in cut]) else 1
        packed = pack_shared_prefix(groups, pad_id=0, groups_per_row=row_size).to(device)
        # the slot whose output predicts each continuation token: the one before it in the same sequence
        predicted_from = [packed.slots(k)[length - 1 : -1] for k, (length, continuations) in
                          enumerate((length, c) for length, cs in cut for c in cs)]
        head_from = min(slots[0] for slots in predicted_from)
        logprobs = model(packed.ids, positions=packed.positions, attend=packed.attend,
                         head_from=head_from).float().log_softmax(-1)
        k = 0
        for _, continuations in cut:
            scores.append([])
            for c in continuations:
                slots = torch.tensor(predicted_from[k], device=device) - head_from
                row = packed.layout[k][0]
                scores[-1].append(float(logprobs[row, slots, torch.tensor(c, device=device)].mean()))
                k += 1
    return scores


@torch.no_grad()
def multiple_choice_accuracy(model: GPT, tokenizer: Tokenizer, items: Sequence[MultipleChoice],
                             shots: Sequence[MultipleChoice] = ()) -> float:
    """The share of items whose right option is the most likely reply ("B) the option's text", by mean
    log-likelihood per token), with `shots` solved items as earlier turns of the conversation (few-shot;
    none: zero-shot)."""
    examples = [m for shot in shots for m in (Message("user", shot.text()), Message("assistant", shot.reply(shot.answer)))]
    end = tokenizer.end_id
    was_training = model.training
    model.eval()
    questions = [(render([*examples, Message("user", item.text())], tokenizer, add_generation_prompt=True),
                  [[*tokenizer.encode(item.reply(i)), end] for i in range(len(item.options))]) for item in items]
    right = sum(max(range(len(scores)), key=scores.__getitem__) == item.answer
                for scores, item in zip(choice_logprobs(model, questions), items))
    model.train(was_training)
    return right / max(len(items), 1)


@dataclass
class Cloze:
    """A text to complete with one of several continuations, `answer` the index of the right one."""

    context: str
    options: list[str]
    answer: int


@torch.no_grad()
def cloze_accuracy(model: GPT, tokenizer: Tokenizer, items: Sequence[Cloze], shots: str = "") -> float:
    """The share of items whose right continuation is the most likely (mean log-likelihood per token) after
    <|bos|> `shots` context: plain text, as in pretraining, so it measures what the model knows whatever
    it was fine-tuned to do; `shots` holds solved examples (few-shot) or nothing (zero-shot)."""
    was_training = model.training
    model.eval()
    questions = [(tokenizer.encode_document(shots + item.context), [tokenizer.encode(option) for option in item.options])
                 for item in items]
    right = sum(max(range(len(scores)), key=scores.__getitem__) == item.answer
                for scores, item in zip(choice_logprobs(model, questions), items))
    model.train(was_training)
    return right / max(len(items), 1)


# --- one policy against another -------------------------------------------------------------------------

def compare_policies(policy: GPT, reference: GPT, reward: Reward, tokenizer: Tokenizer, prompts: list[list[int]],
                     max_new_tokens: int, seed: int, batch_size: int = 16, score_batch_size: int = 8,
                     reference_too: bool = True) -> dict:
    """Both policies answer every prompt (the same seed, `batch_size` prompts at a time, scored
    `score_batch_size` at a time); the reward model scores each answer. Returns the mean reward of each, the win rate of `policy` over `reference` under the
    reward model (a tie counts half), the KL of `policy` to `reference` per answer (Σ_t log π/π_ref over
    `policy`'s own answers, the Monte Carlo estimate of KL(π ‖ π_ref)), answer lengths, and every answer.
    Without `reference_too`, only `policy` answers (its reward, KL and length)."""
    stop_id = tokenizer.end_id
    results: dict[str, dict[str, list]] = {}
    for name, model in (("policy", policy), ("reference", reference))[: 2 if reference_too else 1]:
        columns: dict[str, list] = {"reward": [], "kl": [], "length": [], "finished": [], "answer": []}
        for start in range(0, len(prompts), batch_size):
            part = prompts[start : start + batch_size]
            rows, answers, finished = rollout(model, part, 1, max_new_tokens, stop_id, seed + start)
            scored = score_rollout(model, reference, None, reward, rows, answers, finished, tokenizer.pad_id,
                                   score_batch_size)
            columns["reward"] += scored.scores.tolist()
            columns["kl"] += (scored.logprobs - scored.ref_logprobs).sum(1).tolist()
            columns["length"] += scored.batch.mask.sum(1).tolist()
            columns["finished"] += finished
            columns["answer"] += answer_texts(tokenizer, answers)
        results[name] = columns
    summary: dict = {"prompts": len(prompts)}
    for name, columns in results.items():
        summary[name] = {"reward": float(np.mean(columns["reward"])), "length": float(np.mean(columns["length"])),
                         "finished": float(np.mean(columns["finished"]))}
    summary["kl_per_answer"] = float(np.mean(results["policy"]["kl"]))
    answers = [{"prompt": tokenizer.decode(p, skip_special=True).strip(), "policy": a, "policy_reward": r}
               for p, a, r in zip(prompts, results["policy"]["answer"], results["policy"]["reward"])]
    if reference_too:
        mine, theirs = np.array(results["policy"]["reward"]), np.array(results["reference"]["reward"])
        summary["win_rate"] = float(np.mean((mine > theirs) + 0.5 * (mine == theirs)))
        for answer, text, score in zip(answers, results["reference"]["answer"], results["reference"]["reward"]):
            answer.update(reference=text, reference_reward=score)
    summary["answers"] = answers
    return summary
