"""Generation with the KV cache: one forward pass over the prompt, then one token per step.

`sample_next_token` is the single place where logits become a token (greedy, temperature, top-k,
top-p); `stream` yields tokens as they are made, `generate` collects them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from chatforge.model import GPT


@dataclass
class SamplingParams:
    max_new_tokens: int = field(default=64, metadata={"help": "most tokens to generate"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature; 0 means greedy"})
    top_k: int = field(default=0, metadata={"help": "sample among the k most likely tokens (0: all)"})
    top_p: float = field(default=1.0, metadata={"help": "sample among the smallest set of tokens whose probability reaches p"})
    seed: int | None = field(default=None, metadata={"help": "random seed for reproducible sampling"})

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


def sample_next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,)."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
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
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def stream(model: GPT, prompt: list[int], params: SamplingParams, stop_ids: tuple[int, ...] = ()) -> Iterator[int]:
    """Yield new tokens for one prompt until a stop token, max_new_tokens or the context is full.

    The prompt is truncated from the left if it leaves no room in the context.
    """
    if not prompt:
        raise ValueError("the prompt must hold at least one token")
    device = model.embed_tokens.weight.device
    context = model.config.max_seq_len
    prompt = prompt[-(context - 1):]
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    budget = min(params.max_new_tokens, context - len(prompt))
    cache = model.new_cache(1, len(prompt) + budget)
    was_training = model.training
    model.eval()
    try:
        logits = model(torch.tensor([prompt], device=device), cache)[:, -1]
        for i in range(budget):
            token = sample_next_token(logits, params, generator)
            value = int(token.item())
            yield value
            if value in stop_ids or i == budget - 1:
                break
            logits = model(token.view(1, 1), cache)[:, -1]
    finally:
        model.train(was_training)


def generate(model: GPT, prompt: list[int], params: SamplingParams, stop_ids: tuple[int, ...] = ()) -> list[int]:
    return list(stream(model, prompt, params, stop_ids))
