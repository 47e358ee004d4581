"""Evaluation: held-out perplexity in bits per byte, answers to questions, and multiple choice by
log-likelihood (zero-shot and few-shot, so in-context learning is measured too).

Bits per byte rather than per token, so that models with different tokenizers compare:

    bpb = Σ_t −log p(x_t | x_<t) / (ln 2 · bytes of the text predicted)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from chatforge.chat_format import Message, render
from chatforge.data import TokenWindows
from chatforge.engine import SamplingParams, generate_batch
from chatforge.model import GPT
from chatforge.tokenizer import END_OF_TURN, Tokenizer

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
        nats += float(losses.sum())
        size += int(sizes[targets].sum())
    model.train(was_training)
    return nats / (math.log(2) * max(size, 1))


def answer_questions(model: GPT, tokenizer: Tokenizer, questions: Sequence[str], max_new_tokens: int,
                     temperature: float = 0.0, seed: int = 0, batch_size: int = 32) -> list[str]:
    """The model's reply to each question as a one-turn chat (greedy by default)."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    stop = (tokenizer.special[END_OF_TURN],)
    replies = []
    for start in range(0, len(questions), batch_size):
        prompts = [render([Message("user", q)], tokenizer, add_generation_prompt=True)
                   for q in questions[start : start + batch_size]]
        for (completion,) in generate_batch(model, prompts, params, stop_ids=stop, tokenizer=tokenizer):
            replies.append(completion.text.strip())
    return replies


@dataclass
class MultipleChoice:
    """A question with four options, `answer` the index of the right one."""

    question: str
    options: list[str]
    answer: int

    def text(self) -> str:
        return self.question + "\n" + "\n".join(f"{LETTERS[i]}) {o}" for i, o in enumerate(self.options)) + \
            "\nAnswer with a letter."


@torch.no_grad()
def multiple_choice_accuracy(model: GPT, tokenizer: Tokenizer, items: Sequence[MultipleChoice],
                             shots: Sequence[MultipleChoice] = ()) -> float:
    """The share of items whose right letter is the most likely first token of the reply, with `shots`
    solved items as earlier turns of the conversation (few-shot; none: zero-shot)."""
    letters = [tokenizer.encode(letter)[0] for letter in LETTERS]
    examples = [m for shot in shots for m in (Message("user", shot.text()), Message("assistant", LETTERS[shot.answer]))]
    device = model.embed_tokens.weight.device
    context = model.config.max_seq_len
    was_training = model.training
    model.eval()
    right = 0
    for item in items:
        ids = render([*examples, Message("user", item.text())], tokenizer, add_generation_prompt=True)[-context:]
        logits = model(torch.tensor([ids], device=device), last_only=True)[0, -1]
        right += int(logits[letters].argmax()) == item.answer
    model.train(was_training)
    return right / max(len(items), 1)
