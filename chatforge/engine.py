"""The generation engine that chat, serving, evaluation and PPO rollouts all use.

One batched loop over prompts of different lengths with the KV cache: one forward pass over all the
(left-padded) prompts, then one token per step for every unfinished sequence. Sequences that finish
leave the batch, so they stop costing compute; `n` samples of a prompt share its prefill. Logits become
tokens in one place, `sample_next_token` (greedy, temperature, top-k, top-p), after the repetition
penalty. Per-token log-probabilities (of the model's own distribution, before any sampling transform)
come back on request, as PPO needs them. `beam_search` is the deterministic alternative.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from chatforge.model import GPT


@dataclass
class SamplingParams:
    max_new_tokens: int = field(default=64, metadata={"help": "most tokens to generate"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature; 0 means greedy"})
    top_k: int = field(default=0, metadata={"help": "sample among the k most likely tokens (0: all)"})
    top_p: float = field(default=1.0, metadata={"help": "sample among the smallest set of tokens whose probability reaches p"})
    repetition_penalty: float = field(default=1.0, metadata={"help": "divide the logits of tokens already present by this (1: off)"})
    seed: int | None = field(default=None, metadata={"help": "random seed for reproducible sampling"})

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


@dataclass
class Completion:
    """One generated answer: its tokens, why it ended ("stop" or "length"), and optionally log-probs."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    finish_reason: str = "length"
    text: str | None = None  # decoded, cut before any stop string (when a tokenizer was given)


@dataclass(frozen=True)
class TokenEvent:
    """A streamed token: of prompt `prompt`, sample `sample`; `finish_reason` is set on its last token."""

    prompt: int
    sample: int
    token: int
    logprob: float | None = None
    finish_reason: str | None = None


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


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty: a token already in the sequence has its logit divided by `penalty` if positive,
    multiplied if negative. `seen` (B, V) is True for the tokens present."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the first stop string, and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def fit_context(prompt: Sequence[int], context: int) -> list[int]:
    """The prompt, truncated from the left if needed to leave room for at least one new token."""
    return list(prompt)[max(0, len(prompt) - (context - 1)):]


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
    pad = torch.tensor([width - len(p) for p in prompts])
    return ids.to(device), pad


@torch.inference_mode()
def generate_stream(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    *,
    n: int = 1,
    stop_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    tokenizer=None,
    logprobs: bool = False,
) -> Iterator[TokenEvent]:
    """Yield tokens as they are made, for `n` samples of each prompt, until a stop token (kept), a stop
    string in the decoded text (needs `tokenizer`; finish "stop" on the token completing it),
    `max_new_tokens` or the model's context (finish "length").

    A prompt longer than the context is truncated from the left to leave room for one new token.
    """
    if stop_strings and tokenizer is None:
        raise ValueError("stop strings need the tokenizer to decode the text")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt must hold at least one token")
    device = model.embed_tokens.weight.device
    context = model.config.max_seq_len
    prompts = [fit_context(p, context) for p in prompts]
    generator = torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    ids, pad = _left_pad(prompts, pad_id=0, device=device)
    budgets = [min(params.max_new_tokens, context - len(p)) for p in prompts]
    cache = model.new_cache(len(prompts), ids.shape[1] + max(budgets), pad=pad)
    was_training = model.training
    model.eval()
    try:
        last_logits = model(ids, cache, last_only=True)[:, -1]
        # rows: one per (prompt, sample); n samples share their prompt's prefill
        rows = [(p, s) for p in range(len(prompts)) for s in range(n)]
        if n > 1:
            index = torch.arange(len(prompts), device=device).repeat_interleave(n)
            cache.keep(index)
            last_logits = last_logits.index_select(0, index)
        seen = None
        if params.repetition_penalty != 1:
            seen = torch.zeros(len(rows), last_logits.shape[-1], dtype=torch.bool, device=device)
            for r, (p, _) in enumerate(rows):
                seen[r, torch.tensor(prompts[p], device=device)] = True
        made = [0] * len(rows)
        generated: list[list[int]] = [[] for _ in rows]  # only kept for stop strings
        tail_tokens = max((len(s) for s in stop_strings), default=0) + 8  # a token holds at least one character
        while rows:
            logits = last_logits if seen is None else apply_repetition_penalty(last_logits, seen, params.repetition_penalty)
            tokens = sample_next_token(logits, params, generator)
            token_logprobs = None
            if logprobs:
                token_logprobs = last_logits.float().log_softmax(-1).gather(1, tokens[:, None]).squeeze(1).tolist()
            is_stop = torch.isin(tokens, stop).tolist() if len(stop) else [False] * len(rows)
            keep = []
            for r, ((p, s), token) in enumerate(zip(rows, tokens.tolist())):
                made[r] += 1
                if stop_strings:  # only the tail can hold a stop string that the last token completed
                    generated[r].append(token)
                    tail = tokenizer.decode(generated[r][-tail_tokens:], skip_special=True)
                    is_stop[r] = is_stop[r] or cut_at_stop(tail, stop_strings)[1]
                finish = "stop" if is_stop[r] else "length" if made[r] >= budgets[p] else None
                yield TokenEvent(p, s, token, token_logprobs[r] if logprobs else None, finish)
                if finish is None:
                    keep.append(r)
            if len(keep) < len(rows):  # finished sequences leave the batch
                index = torch.tensor(keep, dtype=torch.long, device=device)
                cache.keep(index)
                tokens = tokens.index_select(0, index)
                seen = seen.index_select(0, index) if seen is not None else None
                rows, made, generated = [rows[r] for r in keep], [made[r] for r in keep], [generated[r] for r in keep]
            if not rows:
                break
            if seen is not None:
                seen[torch.arange(len(rows), device=device), tokens] = True
            last_logits = model(tokens[:, None], cache)[:, -1]
    finally:
        model.train(was_training)


def generate_batch(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    *,
    n: int = 1,
    stop_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    tokenizer=None,
    logprobs: bool = False,
) -> list[list[Completion]]:
    """`n` completions for each prompt (see `generate_stream`); with a tokenizer, their text too."""
    out = [[Completion(logprobs=[] if logprobs else None) for _ in range(n)] for _ in prompts]
    events = generate_stream(model, prompts, params, n=n, stop_ids=stop_ids, stop_strings=stop_strings,
                             tokenizer=tokenizer, logprobs=logprobs)
    for event in events:
        completion = out[event.prompt][event.sample]
        completion.tokens.append(event.token)
        if logprobs:
            completion.logprobs.append(event.logprob)
        if event.finish_reason:
            completion.finish_reason = event.finish_reason
    if tokenizer is not None:
        for completion in (c for samples in out for c in samples):
            completion.text = cut_at_stop(tokenizer.decode(completion.tokens, skip_special=True), stop_strings)[0]
    return out


def stream(model: GPT, prompt: list[int], params: SamplingParams, stop_ids: Sequence[int] = ()) -> Iterator[int]:
    """Tokens of one completion of one prompt, as they are made."""
    for event in generate_stream(model, [prompt], params, stop_ids=stop_ids):
        yield event.token


def generate(model: GPT, prompt: list[int], params: SamplingParams, stop_ids: Sequence[int] = ()) -> list[int]:
    return list(stream(model, prompt, params, stop_ids))


@torch.inference_mode()
def beam_search(
    model: GPT,
    prompt: list[int],
    num_beams: int,
    max_new_tokens: int,
    *,
    stop_ids: Sequence[int] = (),
    length_penalty: float = 1.0,
) -> list[Completion]:
    """The `num_beams` most likely continuations, best first, ranked by sum of log-probs / length^penalty.

    All beams share the prompt's prefill and decode as one batch; a beam that emits a stop token is set
    aside as a finished hypothesis. With one beam this is greedy decoding.
    """
    if num_beams < 1 or max_new_tokens < 1 or not prompt:
        raise ValueError("beam search needs num_beams >= 1, max_new_tokens >= 1 and a non-empty prompt")
    device = model.embed_tokens.weight.device
    context = model.config.max_seq_len
    prompt = fit_context(prompt, context)
    budget = min(max_new_tokens, context - len(prompt))
    stop = set(stop_ids)
    cache = model.new_cache(1, len(prompt) + budget)
    was_training = model.training
    model.eval()
    try:
        logprobs = model(torch.tensor([prompt], device=device), cache, last_only=True)[:, -1].float().log_softmax(-1)
        beams: list[tuple[list[int], list[float]]] = [([], [])]  # tokens and their log-probs
        scores = torch.zeros(1, device=device)
        finished: list[tuple[float, Completion]] = []

        def rank(total: float, length: int) -> float:
            return total / max(1, length) ** length_penalty

        for step in range(budget):
            candidates = (scores[:, None] + logprobs).flatten()
            # enough candidates to refill every beam even if each stop token takes some
            top = candidates.topk(min((1 + len(stop)) * num_beams + num_beams, candidates.numel()))
            vocab = logprobs.shape[-1]
            keep_rows, next_beams, next_scores, next_tokens = [], [], [], []
            for score, flat in zip(top.values.tolist(), top.indices.tolist()):
                row, token = divmod(flat, vocab)
                tokens, token_logprobs = beams[row]
                tokens, token_logprobs = tokens + [token], token_logprobs + [logprobs[row, token].item()]
                if token in stop or step == budget - 1:
                    finished.append((rank(score, len(tokens)), Completion(tokens, token_logprobs,
                                                                          "stop" if token in stop else "length")))
                else:
                    keep_rows.append(row)
                    next_beams.append((tokens, token_logprobs))
                    next_scores.append(score)
                    next_tokens.append(token)
                if len(next_beams) == num_beams:
                    break
            finished.sort(key=lambda f: f[0], reverse=True)
            best_open = rank(next_scores[0], step + 1) if next_scores else float("-inf")
            if not next_beams or (len(finished) >= num_beams and finished[num_beams - 1][0] >= best_open):
                break  # Hugging Face's heuristic: no open beam now beats the finished ones
            cache.keep(torch.tensor(keep_rows, device=device))
            beams, scores = next_beams, torch.tensor(next_scores, device=device)
            logprobs = model(torch.tensor(next_tokens, device=device)[:, None], cache)[:, -1].float().log_softmax(-1)
        finished.sort(key=lambda f: f[0], reverse=True)
        return [c for _, c in finished[:num_beams]]
    finally:
        model.train(was_training)
