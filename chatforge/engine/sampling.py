"""How logits become tokens, and when an answer stops.

`sample_next_token` is the one place logits become tokens (greedy, temperature, top-k, top-p), after
the repetition penalty; `SamplingParams` holds those settings, and the beam search's, which replaces
sampling when `num_beams` > 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = field(default=64, metadata={"help": "most tokens to generate"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature; 0 means greedy"})
    top_k: int = field(default=0, metadata={"help": "sample among the k most likely tokens (0: all)"})
    top_p: float = field(default=1.0, metadata={"help": "sample among the smallest set of tokens whose probability reaches p"})
    repetition_penalty: float = field(default=1.0, metadata={"help": "divide the logits of tokens already present by this (1: off)"})
    seed: int | None = field(default=None, metadata={"help": "random seed for reproducible sampling"})
    num_beams: int = field(default=1, metadata={
        "help": "beam search with this many beams: the answers are the most likely continuations found, best "
                "first, and the sampling settings (temperature, top-k, top-p, penalty, seed) go unused (1: off)"})
    length_penalty: float = field(default=1.0, metadata={
        "help": "beam search ranks answers by their total log-prob / length^this (0: total log-prob; larger "
                "values favour longer answers)"})

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:  # written so that NaN fails too
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be at least 1, got {self.num_beams}")
        if not math.isfinite(self.length_penalty):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty}")


def sample_next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). Temperatures below 1e-5 are greedy (dividing by them overflows)."""
    if params.temperature < 1e-5:
        return argmax_rows(logits)
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first always stays)
        drop = probs.cumsum(dim=-1) - probs >= params.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return sample_categorical(logits.softmax(dim=-1), generator)


ARGMAX_BLOCK = 128


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """The index of each row's largest logit, (B, V) -> (B,), the first one on ties, as `argmax`. On CPU,
    `argmax` does not vectorise: over a batch of rows and a vocabulary of thousands it takes as long as
    whole layers of a small model's decoding step. The maxima of 128-wide blocks (a vectorised `amax`),
    then `argmax` over the few block maxima and within the winning block, take a fraction of that. One row,
    and vocabularies under 4 blocks or not a multiple of the block, use `argmax`."""
    rows, vocab = logits.shape
    if logits.device.type != "cpu" or rows < 2 or vocab % ARGMAX_BLOCK or vocab < 4 * ARGMAX_BLOCK:
        return logits.argmax(dim=-1)
    blocks = logits.reshape(rows, vocab // ARGMAX_BLOCK, ARGMAX_BLOCK)
    best = blocks.amax(dim=-1).argmax(dim=-1)
    return best * ARGMAX_BLOCK + blocks[torch.arange(rows, device=logits.device), best].argmax(dim=-1)


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of `probs` (B, V) by inverting its cumulative distribution: one uniform number per
    row. `torch.multinomial` draws an exponential number per vocabulary entry instead, a large share of a
    CPU decoding step at larger batches. float64, so that u·total stays below the total and a token of
    probability 0 (cut by top-k/top-p) is never chosen."""
    cdf = probs.double().cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device, generator=generator)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty: a token already in the sequence has its logit divided by `penalty` if positive,
    multiplied if negative. `seen` (B, V) is True for the tokens present."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the first stop string, and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


class StopStrings:
    """Stop strings, checked in the decoded text of an answer as its tokens come."""

    def __init__(self, stop_strings: Sequence[str], tokenizer):
        if stop_strings and tokenizer is None:
            raise ValueError("stop strings need the tokenizer to decode the text")
        self.strings, self.tokenizer = list(stop_strings), tokenizer
        self.tail_tokens = max((len(s) for s in self.strings), default=0) + 8  # a token holds at least one character

    def __bool__(self) -> bool:
        return bool(self.strings)

    def completed(self, tokens: Sequence[int]) -> bool:
        """Whether the last of `tokens` completed a stop string (only the text's tail can hold that one)."""
        tail = self.tokenizer.decode(list(tokens[-self.tail_tokens:]), skip_special=True)
        return cut_at_stop(tail, self.strings)[1]
